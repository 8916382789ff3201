#include "common.h"
int report(int x) { pr_debug("value"); return sink(x); }
