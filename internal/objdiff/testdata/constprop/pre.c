#include "common.h"
static noinline int scale(int x, int factor) { return sink(x * factor + 1); }
int a(int x) { return scale(x, 7); }
int b(int x) { return scale(x + 1, 7); }
