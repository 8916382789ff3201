#include "common.h"
/* Static notrace helpers (the kernel's inline) that only direct calls
 * reach: scale from the traceable entry_a and the notrace scale_twice,
 * which entry_b calls. */
#define helper static noinline __attribute__((noclone)) notrace
helper int scale(int x) { return sink(x * 3); }
helper int scale_twice(int x) { return scale(scale(x)); }
int entry_a(int x) { return scale(x) + 1; }
int entry_b(int x) { return scale_twice(x) - 1; }
