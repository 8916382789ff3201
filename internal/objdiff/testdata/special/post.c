#include "common.h"
/* ... and as a WARN (flags 1): only the table entry differs. */
#define TRAP(c, flags) do { if (c) asm volatile("1: ud2\n" \
	".pushsection __bug_table,\"aw\"\n" \
	"2: .long 1b - 2b\n .long %c0 - 2b\n .word %c1\n .word " #flags "\n" \
	".popsection" :: "i" (__FILE__), "i" (__LINE__)); } while (0)
int checked(int x) { TRAP(x > 100, 1); return sink(x); }
