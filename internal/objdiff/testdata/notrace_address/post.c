#include "common.h"
/* A static notrace helper whose address setup passes on (a callback
 * registered elsewhere): the copy it registered cannot be found. */
#define helper static noinline __attribute__((noclone)) notrace
extern void register_cb(int (*cb)(int));
helper int on_event(int x) { return sink(x + 2); }
void setup(void) { register_cb(on_event); }
int fire(int x) { return on_event(x); }
