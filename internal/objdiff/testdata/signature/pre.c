#include "common.h"
/* A handler a table points to; the fix adds a parameter and points the
 * table at a wrapper, but the running table still calls the old one. */
static __attribute__((__noinline__, __noclone__)) int handler(int x) { return sink(x); }
int (*const handlers[])(int) __attribute__((used)) = { handler };
