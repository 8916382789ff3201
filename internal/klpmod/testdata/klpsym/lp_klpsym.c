// SPDX-License-Identifier: GPL-2.0
/*
 * A livepatch that uses a variable and a function the kernel does not
 * export: Stitch must turn the references into klp relocations after
 * linking (the test renames them to their klp symbols).
 */
#include <linux/module.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

extern char *saved_command_line;
int uptime_proc_show(struct seq_file *m, void *v);

static int lp_klpsym_show(struct seq_file *m, void *v)
{
	seq_printf(m, "stitch-klp: %s\n", saved_command_line);
	return uptime_proc_show(m, v);
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = lp_klpsym_show },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{ }
};

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int __init lp_klpsym_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit lp_klpsym_exit(void)
{
}

module_init(lp_klpsym_init);
module_exit(lp_klpsym_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
