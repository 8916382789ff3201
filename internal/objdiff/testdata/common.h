/* Kernel-like helpers for the fixtures, without the kernel's headers. */
#define noinline __attribute__((noinline))
#define notrace __attribute__((no_instrument_function))
#define __init __attribute__((section(".init.text"), cold))
extern int sink(int);
extern void warn_file_line(const char *file, int line);
/* x86's BUG_ON(): ud2 plus a __bug_table entry holding __LINE__. */
#define BUG_ON(c) do { if (c) asm volatile("1: ud2\n" \
	".pushsection __bug_table,\"aw\"\n" \
	"2: .long 1b - 2b\n .long %c0 - 2b\n .word %c1\n .word 0\n" \
	".popsection" :: "i" (__FILE__), "i" (__LINE__)); } while (0)
/* A WARN that passes __FILE__ and __LINE__ as arguments. */
#define WARN_ON(c) do { if (c) warn_file_line(__FILE__, __LINE__); } while (0)
/* Dynamic debug: a record holding __LINE__ in section __dyndbg. */
struct ddebug {
	const char *modname, *function, *filename, *format;
	unsigned int lineno:18, class_id:6, flags:8;
} __attribute__((aligned(8)));
extern void debug_print(struct ddebug *);
#define pr_debug(fmt) do { static struct ddebug __attribute__((section("__dyndbg"))) \
	descriptor = { "m", __func__, __FILE__, fmt, __LINE__, 0, 0 }; \
	debug_print(&descriptor); } while (0)

/* WARN_ONCE's flag (include/linux/once_lite.h; .data..once since 6.3). */
#define ONCE(x) ({							\
	static _Bool __attribute__((section(".data..once"))) __already_done; \
	if ((x) && !__already_done) {					\
		__already_done = 1;					\
		sink(0);						\
	}								\
})
