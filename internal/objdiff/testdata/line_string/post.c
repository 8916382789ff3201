
#include "common.h"
#define __stringify_1(x) #x
#define __stringify(x) __stringify_1(x)
extern void report(const char *what, unsigned long size);
/* The fortified memcpy's message names its call site as FILE:LINE. */
#define checked_copy(d, s, n) do { if ((n) > sizeof(d)) \
	report("field \"" #d "\" at " __FILE__ ":" __stringify(__LINE__), (n)); \
	__builtin_memcpy(&(d), (s), (n)); } while (0)
struct msg { char bytes[16]; };
int fill(struct msg *m, const char *src, unsigned long n)
{
	checked_copy(m->bytes, src, n);
	return sink(n);
}
