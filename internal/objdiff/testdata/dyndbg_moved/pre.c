#include "common.h"
/* The message is printed by stop itself. */
int stop(int x) { pr_debug("stopping"); return sink(x); }
