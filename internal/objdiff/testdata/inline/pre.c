#include "common.h"
static inline int clamp(int x) { return x > 255 ? 255 : x; }
/* A bystander: inlined into a changed function, but unchanged. */
static inline int twice(int x) { return sink(x) * 2; }
int set_a(int x) { return twice(clamp(x)); }
int set_b(int x) { return sink(clamp(x) + 1); }
int set_c(int x) { return sink(x * 2); }
