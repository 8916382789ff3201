#include "common.h"
/*
 * An edit above the functions moves every __LINE__ below it.
 */
int checked(int x) { BUG_ON(x > 100); WARN_ON(x < 0); pr_debug("checked"); return sink(x); }
int plain(int x) { return sink(x); }
