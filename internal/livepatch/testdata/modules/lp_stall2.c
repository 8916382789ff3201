// SPDX-License-Identifier: GPL-2.0
/*
 * Test livepatch of stall2_helper: its transition stalls (stitch-old
 * sleeps in stall2_old) and so does its reverse transition (stitch-new,
 * switched early, sleeps in the new stall2_trap until it is stopped).
 */
#include <linux/module.h>
#include <linux/livepatch.h>
#include <linux/kthread.h>
#include <linux/delay.h>

static int lp_stall2_old(void)
{
	return 1;
}

static int lp_stall2_trap(void)
{
	while (!kthread_should_stop())
		msleep_interruptible(50);
	return 1;
}

static struct klp_func funcs[] = {
	{ .old_name = "stall2_old", .new_func = lp_stall2_old },
	{ .old_name = "stall2_trap", .new_func = lp_stall2_trap },
	{ }
};

static struct klp_object objs[] = {
	{ .name = "stall2_helper", .funcs = funcs },
	{ }
};

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int __init lp_stall2_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit lp_stall2_exit(void)
{
}

module_init(lp_stall2_init);
module_exit(lp_stall2_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
