/*
 * WARN_ONCE's flag (include/linux/once_lite.h): a file-local bool in
 * .data.once on 6.1, .data..once since 6.3; a file has one per use, all
 * named __already_done.
 */
extern int printk(const char *fmt, ...);

#define ONCE(sec, x) ({							\
	static _Bool __attribute__((section(sec))) __already_done;	\
	if ((x) && !__already_done) {					\
		__already_done = 1;					\
		printk("once\n");					\
	}								\
})

int old_once(int x) { ONCE(".data.once", x > 1); return x; }
int new_once(int x) { ONCE(".data..once", x > 2); return x; }
int other_once(int x) { ONCE(".data..once", x > 3); return x; }
