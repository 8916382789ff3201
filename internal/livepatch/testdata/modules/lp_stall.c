// SPDX-License-Identifier: GPL-2.0
/* Test livepatch of stall_helper_wait(): its transition stalls. */
#include <linux/module.h>
#include <linux/livepatch.h>

static int lp_stall_wait(void)
{
	return 1;
}

static struct klp_func funcs[] = {
	{ .old_name = "stall_helper_wait", .new_func = lp_stall_wait },
	{ }
};

static struct klp_object objs[] = {
	{ .name = "stall_helper", .funcs = funcs },
	{ }
};

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int __init lp_stall_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit lp_stall_exit(void)
{
}

module_init(lp_stall_init);
module_exit(lp_stall_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
