// SPDX-License-Identifier: GPL-2.0
/* Test livepatch whose new cmdline_proc_show warns each time it runs. */
#include <linux/module.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int lp_warn_show(struct seq_file *m, void *v)
{
	WARN(1, "stitch-test: lp_warn called\n");
	seq_puts(m, "stitch-test: warned\n");
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = lp_warn_show },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{ }
};

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int __init lp_warn_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit lp_warn_exit(void)
{
}

module_init(lp_warn_init);
module_exit(lp_warn_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
