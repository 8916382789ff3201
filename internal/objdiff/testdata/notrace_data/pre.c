#include "common.h"
/* A static notrace helper that only a writable ops table points to, as
 * sctp_v4_xmit is reached through sctp_af_inet. */
#define helper static noinline __attribute__((noclone)) notrace
helper int op_xmit(int x) { return sink(x ^ 1); }
struct ops { int (*xmit)(int); };
struct ops inet_ops = { .xmit = op_xmit };
