#include "common.h"
extern void report(int, int) __attribute__((cold));
int check(int x)
{
	if (__builtin_expect(x < 0, 0)) {
		report(x, 1);
		report(x, 2);
		return -1;
	}
	return sink(x);
}
