#include "common.h"
/* __ADDRESSABLE keeps a symbol alive by taking its address in
 * .discard.addressable, which the kernel's link throws away. */
#define ADDRESSABLE(sym, n) static void *__attribute__((used, section(".discard.addressable"))) \
	__UNIQUE_ID___addressable_##sym##n = (void *)&sym
static int __init setup(void) { return sink(1); }
ADDRESSABLE(setup, 12);
int clear(int x) { return sink(x); }
