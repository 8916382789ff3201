#include "common.h"
#define __exit __attribute__((section(".exit.text"), cold, no_instrument_function))
/* An exit function that the init function's error path also calls. */
static int state;
static void __exit noinline teardown(void) { sink(state); state = 0; }
int __init setup(void) { state = sink(1); if (state < 0) { teardown(); return -1; } return 0; }
static void (*exitcall)(void) __attribute__((section(".exitcall.exit"), used)) = teardown;
