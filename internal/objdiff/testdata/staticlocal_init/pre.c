#include "common.h"
int counter(int x) { static int calls = 1; calls += x; return sink(calls); }
