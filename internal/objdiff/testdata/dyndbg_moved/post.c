#include "common.h"
/* The fix moves the message into a helper: the record's __func__ string
 * becomes "stop_locked" and goes with the changed code. */
static noinline int stop_locked(int x) { pr_debug("stopping"); return sink(x); }
int stop(int x) { return stop_locked(x + 1); }
