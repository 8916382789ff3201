// SPDX-License-Identifier: GPL-2.0
/*
 * Two kernel threads for a livepatch whose rollback stalls too.
 * stitch-old sleeps inside stall2_old() until the module is removed: a
 * patch of it cannot finish its transition. stitch-new calls
 * stall2_trap() now and then, from outside it; once switched to the
 * patch it runs the patch's version, which does not return until the
 * module is removed: the reverse transition cannot finish either.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/delay.h>

static struct task_struct *old_thread, *new_thread;

noinline int stall2_old(void)
{
	while (!kthread_should_stop())
		msleep_interruptible(50);
	return 0;
}

noinline int stall2_trap(void)
{
	barrier(); /* a call with an effect: never optimised away */
	return 0;
}

static int old_fn(void *data)
{
	return stall2_old();
}

static int new_fn(void *data)
{
	while (!kthread_should_stop()) {
		stall2_trap();
		msleep_interruptible(20);
	}
	return 0;
}

static int __init stall2_helper_init(void)
{
	old_thread = kthread_run(old_fn, NULL, "stitch-old");
	if (IS_ERR(old_thread))
		return PTR_ERR(old_thread);
	new_thread = kthread_run(new_fn, NULL, "stitch-new");
	if (IS_ERR(new_thread)) {
		kthread_stop(old_thread);
		return PTR_ERR(new_thread);
	}
	return 0;
}

static void __exit stall2_helper_exit(void)
{
	kthread_stop(new_thread);
	kthread_stop(old_thread);
}

module_init(stall2_helper_init);
module_exit(stall2_helper_exit);
MODULE_LICENSE("GPL");
