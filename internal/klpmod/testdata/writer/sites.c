/* Two functions, each with an ORC entry (six bytes of its number, in
 * .orc_unwind beside the .orc_unwind_ip entry, as objtool writes them)
 * and a paravirt call site (6.1's struct paravirt_patch_site). */
#define SITES(n) asm volatile("1: nop\n" \
	".pushsection .orc_unwind_ip,\"a\"\n .long 1b - .\n.popsection\n" \
	".pushsection .orc_unwind,\"a\"\n .fill 6, 1, " #n "\n.popsection\n" \
	"771: .fill " #n "+5, 1, 0x90\n772:\n" \
	".pushsection .parainstructions,\"a\"\n .balign 8\n" \
	" .quad 771b\n .byte 3\n .byte 772b-771b\n .balign 8\n.popsection")
int first(int x) { SITES(1); return x + 1; }
int second(int x) { SITES(2); return x + 2; }
