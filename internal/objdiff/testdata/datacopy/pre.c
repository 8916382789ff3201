#include "common.h"
/* Writable table that only limit reads (by index): a new copy is safe. */
static int limits[4] __attribute__((section(".data..read_mostly"))) = { 10, 20, 30, 40 };
int limit(int i) { return sink(limits[i & 3]); }
int other(int x) { return sink(x); }
