/*
 * The post-fix side of a small "kernel file" for the diff-object writer's
 * tests, compiled with the kernel's code-generation flags.
 */
static int counter;
int exported_thing(int);
int hidden_global(int);

__attribute__((noinline)) static int helper(int x)
{
	return x * 3 + counter;
}

__attribute__((section(".init.text"), noinline)) static int setup(void)
{
	return 1;
}

int changed(int x)
{
	counter++;
	if (x > 100)
		return hidden_global(x);
	return helper(x) + exported_thing(x) + (int)__builtin_strlen(__func__) +
	       __builtin_printf("changed %d\n", x);
}

int uses_init(void)
{
	return (long)&setup > 0;
}
