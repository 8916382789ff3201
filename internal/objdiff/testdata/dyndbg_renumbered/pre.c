#include "common.h"
/* g goes, h comes: each with debug records of the same base names, which
 * an edit renumbers. */
int f(int x) { pr_debug("f"); return sink(x); }
int g(int x) { pr_debug("g1"); sink(x); pr_debug("g2"); return sink(x + 1); }
