#include "common.h"
/* Two WARN_ONCE flags in one function, both named __already_done. */

int tcon(int x)
{
	ONCE(x > 1);
	ONCE(x > 2);
	return x;
}
