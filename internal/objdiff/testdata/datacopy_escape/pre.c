#include "common.h"
/* Writable table whose address reaches other code (a registration): the
 * running kernel's copy stays in use, a new copy would not reach it. */
struct table { int min, max; };
static struct table limits = { 10, 20 };
void register_table(struct table *t);
void setup(void) { register_table(&limits); }
int limit(int i) { return sink(limits.max + i); }
