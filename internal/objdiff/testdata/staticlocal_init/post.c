#include "common.h"
int counter(int x) { static int calls = 5; calls += x; return sink(calls); }
