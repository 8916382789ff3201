/*
 * Jump labels as the kernel emits them (arch/x86/include/asm/jump_label.h):
 * a NOP at the site and a __jump_table entry naming the key.
 */
struct static_key { int enabled; };
extern struct static_key __tracepoint_stitch_test;
extern struct static_key feature_key;

#define JUMP_LABEL(key, label)						\
	asm goto("1: .byte 0x0f,0x1f,0x44,0x00,0x00\n\t"		\
		 ".pushsection __jump_table, \"aw\"\n\t"			\
		 ".balign 8\n\t"						\
		 ".long 1b - ., %l[" #label "] - .\n\t"			\
		 ".quad " #key " - .\n\t"					\
		 ".popsection" : : : : label)

int traced(int x)
{
	JUMP_LABEL(__tracepoint_stitch_test, trace);
	return x + 1;
trace:
	return x + 2;
}

int featured(int x)
{
	JUMP_LABEL(feature_key, on);
	return x * 3;
on:
	return x * 4;
}

/* A static call site (arch/x86/include/asm/static_call.h, objtool). */
extern char __SCT__stitch_call[], __SCK__stitch_call[];

int called(int x)
{
	asm volatile("1: call __SCT__stitch_call\n\t"
		     ".pushsection .static_call_sites, \"a\"\n\t"
		     ".long 1b - ., __SCK__stitch_call - .\n\t"
		     ".popsection");
	return x;
}

/*
 * The same call where objtool runs at link time (6.12 with IBT): the object
 * has no .static_call_sites, only the call and, from static_call()'s
 * __STATIC_CALL_ADDRESSABLE, a reference to the key that the kernel's
 * build discards.
 */
int called_late(int x)
{
	asm volatile("call __SCT__stitch_call\n\t"
		     ".pushsection .discard.addressable, \"aw\"\n\t"
		     ".quad __SCK__stitch_call\n\t"
		     ".popsection");
	return x;
}
