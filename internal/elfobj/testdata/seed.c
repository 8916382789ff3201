/* Compiled with kernel-like flags at test time: the seed of the fuzz
 * corpus and the object the reader's tests inspect. */
extern int sink(int);
static int calls;
static char flag;
static const char *names[] = { "zero", "one" };

static __attribute__((noinline)) int helper(int x)
{
	calls++;
	return sink(x + calls);
}

int (*hook)(int) = helper;

int entry(int x)
{
	if (flag)	/* cmpb $0, flag(%rip): the field is followed by an immediate */
		return 0;
	return helper(x) + sink(names[x & 1][0]);
}

void set_flag(char v)
{
	flag = v;
}
