// SPDX-License-Identifier: GPL-2.0
/* A pre-patch callback that fails: the kernel must refuse the patch. */
#include <linux/errno.h>
#include <linux/printk.h>
#include <stitch/hooks.h>

static int refuse(struct klp_object *obj)
{
	pr_info("stitch refuse hooks: pre-patch refuses\n");
	return -EPERM;
}
STITCH_PRE_PATCH(vmlinux, refuse);
