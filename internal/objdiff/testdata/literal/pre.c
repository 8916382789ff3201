#include "common.h"

/* A table of compound literals, as drivers list device ids. */
struct ids {
	const char *const *names;
	int min, max;
};

static const struct ids table[] = {
	{ (const char *const[]){ "LEN0033", 0 }, 1024, 5052 },
	{ (const char *const[]){ "LEN0042", 0 }, 1232, 5710 },
};

/* Listed after the table: a new id here moves the table's strings. */
static const char *const smbus_ids[] = { "AAA0001", 0 };

extern int match(const char *const *names);

int lookup(int i)
{
	return match(table[i & 1].names);
}

int smbus(void)
{
	return match(smbus_ids);
}
