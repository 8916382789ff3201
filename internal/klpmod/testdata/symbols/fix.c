/* The post-fix object of a fix that adds a static local before the
 * existing one (renumbering it: xstats.1 here, xstats.0 in the running
 * kernel), a new global function that another file of the fix calls,
 * and a call to a new function of that other file. */
extern int printf(const char *, ...);
extern char *other_new(void);


int stats_format(char *buf, int i)
{
	static int calls;
	static const struct { const char *desc; int end; } xstats[] = {
		{ "extent_alloc", 4 }, { "abt", 8 },
	};
	calls++;
	return printf("%s %d %s %d", xstats[i].desc, xstats[i].end, other_new(), calls);
}

char *new_helper(void)
{
	return "kpatch";
}
