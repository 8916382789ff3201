#include "common.h"
/* The fix adds a third counter of that name between the two. */
int twin(int x)
{
	if (x > 0) {
		static int count;
		return sink(count += x);
	}
	if (x == 0) {
		static int count;
		return sink(++count);
	}
	{
		static int count;
		return sink(count -= x);
	}
}
