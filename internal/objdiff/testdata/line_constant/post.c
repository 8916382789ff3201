
#include "common.h"
int checked(int x)
{
	WARN_ON(x < 0);
	warn_file_line(__FILE__, 65);
	return sink(x);
}
