#include "common.h"
/* The fix adds a third warning between the two: gcc renumbers the flags,
 * and none need be told from another (the patch carries fresh ones). */

int tcon(int x)
{
	ONCE(x > 1);
	ONCE(x < -5);
	ONCE(x > 2);
	return x;
}
