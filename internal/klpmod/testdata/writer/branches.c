/*
 * Static branches on keys the kernel does not export, as
 * arch/x86/include/asm/jump_label.h emits them in 6.1: the site is a
 * 5-byte NOP (arch_static_branch) or a `jmp` the assembler may make
 * short (arch_static_branch_jump, and the JUMP_LABEL_HACK form objtool
 * turns into a NOP of the same size); the entry's key field carries the
 * branch sense in its low bit. Each site also gets an ORC entry (made-up
 * bytes) just before it, as objtool writes them.
 */
#include <stdbool.h>

struct static_key { int enabled; void *entries; };
struct static_key_false { struct static_key key; };

extern struct static_key_false feature_key;
/* A key local to the file, as DO_ONCE's ___once_key. */
static struct static_key_false local_key = { { 1, (void *)1 } };

extern int slow(int);

#define JUMP_TABLE_ENTRY						\
	".pushsection __jump_table, \"aw\"\n\t"				\
	".balign 8\n\t"							\
	".long 1b - .\n\t"						\
	".long %l[l_yes] - .\n\t"					\
	".quad %c0 + %c1 - .\n\t"					\
	".popsection\n\t"

#define ORC_HERE(tag)							\
	asm volatile("2:\n\t"						\
		     ".pushsection .orc_unwind_ip, \"a\"\n\t"		\
		     ".long 2b - .\n\t"					\
		     ".popsection\n\t"					\
		     ".pushsection .orc_unwind, \"a\"\n\t"		\
		     ".byte " #tag ",0x22,0x33,0x44,0x55,0x66\n\t"	\
		     ".popsection")

static inline __attribute__((always_inline)) bool
branch_nop5(struct static_key *key, bool branch)
{
	asm goto("1: .byte 0x0f,0x1f,0x44,0x00,0x00\n\t" JUMP_TABLE_ENTRY
		 : : "i" (key), "i" (branch) : : l_yes);
	return false;
l_yes:
	return true;
}

static inline __attribute__((always_inline)) bool
branch_jmp(struct static_key *key, bool branch)
{
	asm goto("1: jmp %l[l_yes]\n\t" JUMP_TABLE_ENTRY
		 : : "i" (key), "i" (branch) : : l_yes);
	return false;
l_yes:
	return true;
}

static inline __attribute__((always_inline)) bool
branch_nop2(struct static_key *key, bool branch)
{
	asm goto("1: .byte 0x66,0x90\n\t" JUMP_TABLE_ENTRY
		 : : "i" (key), "i" (branch) : : l_yes);
	return false;
l_yes:
	return true;
}

/* static_branch_unlikely(&feature_key): a 5-byte NOP, branch 0. */
int unlikely_feature(int x)
{
	ORC_HERE(0x11);
	if (__builtin_expect(branch_nop5(&feature_key.key, false), 0))
		return slow(x) + 7;
	return x + 1;
}

/* static_branch_likely(&feature_key): a jmp, branch 1; near its target,
 * so a 2-byte one. */
int likely_feature(int x)
{
	ORC_HERE(0x12);
	if (__builtin_expect(!branch_jmp(&feature_key.key, true), 1))
		return x * 3;
	return x - 5;
}

/* DO_ONCE's test of its local key (static_branch_unlikely). */
int once_user(int x)
{
	ORC_HERE(0x13);
	if (__builtin_expect(branch_nop5(&local_key.key, false), 0))
		return slow(x);
	return x;
}

/* A 2-byte site with more than 127 bytes of code after it: the
 * instructions after it move into the stub. */
int far_site(int x)
{
	ORC_HERE(0x15);
	if (__builtin_expect(branch_nop2(&feature_key.key, false), 0))
		return slow(x);
	asm volatile("movl $0x2a, %%r11d\n\t.skip 200, 0x90" : : : "r11");
	return x;
}

/* The same, but a jump follows the site, and the unwind state changes
 * at it (ORC_HERE): nothing can move. */
int far_jump(int x)
{
	ORC_HERE(0x17);
	if (__builtin_expect(branch_nop2(&feature_key.key, false), 0))
		return slow(x);
	asm volatile("jmp 4f\n\t.skip 200, 0x90\n4:");
	return x;
}

/* static_branch_likely with its target more than 127 bytes away: a
 * 5-byte jmp. */
int long_jmp(int x)
{
	ORC_HERE(0x14);
	if (__builtin_expect(!branch_jmp(&feature_key.key, true), 1)) {
		asm volatile(".skip 200, 0x90");
		return x * 3;
	}
	return x - 5;
}

/* A 2-byte site out of reach whose next instruction is where the
 * branch's block comes back to: the instruction before it moves. */
int far_join(int x)
{
	ORC_HERE(0x16);
	asm volatile("movl $0x2b, %%r10d" : : : "r10");
	if (__builtin_expect(branch_nop2(&feature_key.key, false), 0))
		asm volatile("movl $0x2c, %%r10d" : : : "r10");
	asm volatile(".skip 200, 0x90");
	return x;
}
