#include "common.h"
/* g goes, h comes: each with debug records of the same base names, which
 * an edit renumbers. */
int e(int x) { pr_debug("e"); return sink(x - 1); }
int f(int x) { pr_debug("f"); return sink(x); }
int h(int x) { pr_debug("h"); return sink(x + 2); }
