#include "common.h"
/* A paravirt call site as 6.1 records it (struct paravirt_patch_site). */
#define PVSITE() asm volatile("771: call *pv_op(%%rip)\n772:\n" \
	".pushsection .parainstructions,\"a\"\n .balign 8\n" \
	" .quad 771b\n .byte 3\n .byte 772b-771b\n .balign 8\n" \
	".popsection" ::: "memory")
int through_pv(int x) { PVSITE(); return sink(x + 1); }
