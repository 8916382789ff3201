#include "common.h"
int first(int x) { static int seen; seen++; return sink(x + seen); }
int counter(int x) { static int calls; calls += 2 * x; return sink(calls); }
int other(void) { static int calls; return sink(++calls); }
int last(void) { static int calls; return sink(--calls); }
