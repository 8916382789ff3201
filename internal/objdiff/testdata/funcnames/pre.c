#include "common.h"
/* __func__.N strings are referenced only from data (debug records). */
int alpha(int x) { pr_debug("alpha"); return sink(x); }
int beta(int x) { pr_debug("beta"); return sink(x + 1); }
