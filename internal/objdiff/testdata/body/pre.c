#include "common.h"
int add(int x) { return sink(x + 1); }
int other(int x) { return sink(x * 3); }
