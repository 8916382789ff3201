// SPDX-License-Identifier: GPL-2.0
/*
 * Hooks of pipe.patch (docs/fix-author.md): the fix lowers the initial
 * value of pipe_max_size, which the running kernel set long ago. The
 * pre-patch callback makes the same change in place, the post-unpatch
 * callback undoes it; neither touches a value an administrator chose.
 */
#include <linux/compiler.h>
#include <linux/printk.h>
#include <stitch/hooks.h>

#define OLD_MAX 1048576
#define NEW_MAX 524288

/* Static in fs/pipe.c: reached through a klp relocation. */
extern unsigned int pipe_max_size;

STITCH_UPDATES_DATA(pipe_max_size);

static bool lowered;

static int lower_pipe_max_size(struct klp_object *obj)
{
	if (READ_ONCE(pipe_max_size) == OLD_MAX) {
		WRITE_ONCE(pipe_max_size, NEW_MAX);
		lowered = true;
	}
	pr_info("stitch pipe hooks: pipe-max-size %u\n", READ_ONCE(pipe_max_size));
	return 0;
}
STITCH_PRE_PATCH(vmlinux, lower_pipe_max_size);

static void restore_pipe_max_size(struct klp_object *obj)
{
	if (lowered && READ_ONCE(pipe_max_size) == NEW_MAX)
		WRITE_ONCE(pipe_max_size, OLD_MAX);
	lowered = false;
	pr_info("stitch pipe hooks: pipe-max-size %u\n", READ_ONCE(pipe_max_size));
}
STITCH_POST_UNPATCH(vmlinux, restore_pipe_max_size);
