#include "common.h"
int table[4] = { 1, 2, 3, 5 };
static int limit = 8;
int lookup(int i) { return sink(table[i & 3]); }
int count(void) { return sink(limit++); }
