#include "common.h"
/* Two counters of one name in one function. */
int twin(int x)
{
	if (x > 0) {
		static int count;
		return sink(count += x);
	}
	{
		static int count;
		return sink(count -= x);
	}
}
