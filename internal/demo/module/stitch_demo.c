// SPDX-License-Identifier: GPL-2.0
/*
 * The demo's livepatch: /proc/cmdline answers with a new line, proving
 * the running kernel's code was replaced without a reboot.
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int stitch_demo_cmdline_show(struct seq_file *m, void *v)
{
	seq_puts(m, "stitch demo: this kernel was patched live\n");
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = stitch_demo_cmdline_show },
	{ }
};

static struct klp_object objs[] = {
	{ .name = NULL /* vmlinux */, .funcs = funcs },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int __init stitch_demo_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit stitch_demo_exit(void)
{
}

module_init(stitch_demo_init);
module_exit(stitch_demo_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Stitch demo livepatch for cmdline_proc_show");
MODULE_INFO(livepatch, "Y");
