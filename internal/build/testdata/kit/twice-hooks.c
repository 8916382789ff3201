// SPDX-License-Identifier: GPL-2.0
/* Uses a name 6.1's vmlinux defines twice: the build must refuse it. */
#include <linux/sysfs.h>
#include <stitch/hooks.h>

extern struct attribute_group attr_group;

static int use_it(struct klp_object *obj)
{
	return attr_group.name ? 0 : -ENOENT;
}
STITCH_PRE_PATCH(vmlinux, use_it);
