#include "common.h"
int add(int x) { return sink(x + 2); }
int other(int x) { return sink(x * 3); }
