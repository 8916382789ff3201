#include "common.h"
int table[4] = { 1, 2, 3, 4 };
int lookup(int i) { return sink(table[i & 3]); }
int count(void) { return sink(0); }
