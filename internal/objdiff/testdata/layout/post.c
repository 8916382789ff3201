#include "common.h"
struct conn { int state; long flags; int refs; };
int conn_get(struct conn *c) { c->refs++; return sink(c->state); }
int unrelated(int x) { return sink(x); }
