#include "common.h"
/* As SYSCALL_DEFINE expands: the body is a static inline function, which
 * the kernel's "inline" makes notrace, emitted out of line and called by
 * the traceable entry point. */
static noinline notrace long do_sys_setattr(int x) { return sink(x > 0 ? x : 0); }
long sys_setattr(int x) { return do_sys_setattr(x); }
/* A notrace helper that an ops table points to cannot be handled so. */
static noinline notrace int op_run(int x) { return sink(x * 3); }
struct ops { int (*run)(int); };
const struct ops table_ops = { .run = op_run };
