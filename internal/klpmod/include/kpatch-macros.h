/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Stitch's adapter for patches written for kpatch-build, which put
 * kpatch's macros in the patched source file (#include "kpatch-macros.h").
 * Written for Stitch from kpatch's documented behaviour; see
 * docs/fix-author.md for how each macro maps.
 *
 * A callback macro records the function in a section of the compiled
 * object (.stitch.callbacks.KIND). Stitch reads the record, carries the
 * function into the livepatch module and makes it the klp_callbacks
 * member of the klp_object the file belongs to (vmlinux, or the module
 * kbuild links the file into).
 */
#ifndef _STITCH_KPATCH_MACROS_H
#define _STITCH_KPATCH_MACROS_H

#include <linux/compiler.h>
#include <linux/jiffies.h>
#include <linux/printk.h>
#include <linux/livepatch.h>
#include "kpatch-syscall.h"

/* kpatch's callbacks take the klp_object, under kpatch's name for it. */
typedef struct klp_object patch_object;

typedef int (*kpatch_pre_patch_call_t)(patch_object *obj);
typedef void (*kpatch_post_patch_call_t)(patch_object *obj);
typedef void (*kpatch_pre_unpatch_call_t)(patch_object *obj);
typedef void (*kpatch_post_unpatch_call_t)(patch_object *obj);

/* One typed pointer per callback: the compiler checks fn's signature. */
#define __STITCH_KPATCH_CALLBACK(kind, type, fn)				\
	static type __stitch_kpatch_##kind					\
		__used __section(".stitch.callbacks." #kind) __aligned(8) = (fn)

#define KPATCH_PRE_PATCH_CALLBACK(fn)	\
	__STITCH_KPATCH_CALLBACK(pre_patch, kpatch_pre_patch_call_t, fn)
#define KPATCH_POST_PATCH_CALLBACK(fn)	\
	__STITCH_KPATCH_CALLBACK(post_patch, kpatch_post_patch_call_t, fn)
#define KPATCH_PRE_UNPATCH_CALLBACK(fn)	\
	__STITCH_KPATCH_CALLBACK(pre_unpatch, kpatch_pre_unpatch_call_t, fn)
#define KPATCH_POST_UNPATCH_CALLBACK(fn)	\
	__STITCH_KPATCH_CALLBACK(post_unpatch, kpatch_post_unpatch_call_t, fn)

/*
 * Stitch decides by itself what changed: a function whose code differs
 * only in line numbers is not patched, and one it cannot patch is refused
 * with the reason. The ignore macros therefore change nothing; the
 * sections they name are discarded when the module links.
 */
#define KPATCH_IGNORE_SECTION(sec)						\
	static const char *__UNIQUE_ID(stitch_kpatch_ignore_section)		\
		__used __section(".discard.stitch.kpatch_ignore") = (sec)
#define KPATCH_IGNORE_FUNCTION(fn)						\
	static void *__stitch_kpatch_ignore_##fn				\
		__used __section(".discard.stitch.kpatch_ignore") = (fn)

/*
 * Skipping the consistency model's stack check is never done by Stitch:
 * a patch that asks for it does not build.
 */
#define KPATCH_FORCE_UNSAFE(fn)							\
	_Static_assert(0, "KPATCH_FORCE_UNSAFE(" #fn "): Stitch never skips livepatch's consistency model; see docs/fix-author.md")

/*
 * printk in a branch of its own, so that the call (printk is __cold)
 * does not make the code around it cold and reshuffle the function.
 */
#define KPATCH_PRINTK(fmt, ...)							\
	({ if (jiffies) printk(fmt, ##__VA_ARGS__); })
#define KPATCH_PRINTK_DEFERRED(fmt, ...)					\
	({ if (jiffies) printk_deferred(fmt, ##__VA_ARGS__); })

/*
 * An indirect call through the static call's current target, for a key
 * the patch module cannot link to (one in another module).
 */
#define KPATCH_STATIC_CALL(name)						\
	((typeof(&STATIC_CALL_TRAMP(name)))(STATIC_CALL_KEY(name).func))

#endif /* _STITCH_KPATCH_MACROS_H */
