#include "common.h"
#define __exit __attribute__((section(".exit.text"), cold, no_instrument_function))
/* An exit function only its module_exit record points to. */
static int state;
int __init setup(void) { state = sink(1); return 0; }
static void __exit teardown(void) { sink(state + 1); }
static void (*exitcall)(void) __attribute__((section(".exitcall.exit"), used)) = teardown;
int run(int x) { return sink(x + state); }
