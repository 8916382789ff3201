// SPDX-License-Identifier: GPL-2.0
/* Uses a variable no kernel has: the build must refuse it. */
#include <stitch/hooks.h>

extern int stitch_no_such_variable;

static int use_it(struct klp_object *obj)
{
	return stitch_no_such_variable;
}
STITCH_PRE_PATCH(vmlinux, use_it);
