#include "common.h"
int handle(int x) { return sink(x); }
