/* A loop bounded by the address just past a static array, as
 * fs/erofs/zdata.c walks its pcluster_pool: the relocation's target is
 * the end of the array, which no symbol's extent covers. */
struct slot { long a, b; };
/* gcc places these in reverse order: pool last, nothing after its end. */
static struct slot pool[24] __attribute__((section(".data..read_mostly")));
static struct slot first[4] __attribute__((section(".data..read_mostly")));

extern void use(struct slot *);

void walk(struct slot *from)
{
	struct slot *p;

	for (p = from; p < pool + 24; p++)
		use(p);
	use(first);
}
