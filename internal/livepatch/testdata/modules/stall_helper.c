// SPDX-License-Identifier: GPL-2.0
/*
 * A kernel thread that sleeps inside stall_helper_wait() until the module
 * is removed. A livepatch of that function can never finish its
 * transition: the thread never leaves the function.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/delay.h>

static struct task_struct *thread;

noinline int stall_helper_wait(void)
{
	while (!kthread_should_stop())
		msleep_interruptible(50);
	return 0;
}

static int stall_helper_fn(void *data)
{
	return stall_helper_wait();
}

static int __init stall_helper_init(void)
{
	thread = kthread_run(stall_helper_fn, NULL, "stitch-stall");
	return PTR_ERR_OR_ZERO(thread);
}

static void __exit stall_helper_exit(void)
{
	kthread_stop(thread);
}

module_init(stall_helper_init);
module_exit(stall_helper_exit);
MODULE_LICENSE("GPL");
