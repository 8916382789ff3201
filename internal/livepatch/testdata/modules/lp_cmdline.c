// SPDX-License-Identifier: GPL-2.0
/* Test livepatch: /proc/cmdline prints a marker while this patch is on. */
#include <linux/module.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int lp_cmdline_show(struct seq_file *m, void *v)
{
	seq_puts(m, "stitch-test: cmdline patched\n");
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = lp_cmdline_show },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },	/* .name NULL: vmlinux */
	{ }
};

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int __init lp_cmdline_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit lp_cmdline_exit(void)
{
}

module_init(lp_cmdline_init);
module_exit(lp_cmdline_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
