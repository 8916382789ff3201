#include "common.h"
int first(int x) { return sink(x); }
int counter(int x) { static int calls; calls += x; return sink(calls); }
int other(void) { static int calls; return sink(++calls); }
