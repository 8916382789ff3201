#include "common.h"
static noinline int check(int x) { return x > 10 ? sink(-x) : x; }
int handle(int x) { return sink(check(x)); }
