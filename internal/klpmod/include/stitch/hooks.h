/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Stitch's fix author's kit: what a hooks file (stitch build --hooks
 * FILE.c) and a fix's own code may use. See docs/fix-author.md.
 *
 * Callbacks: STITCH_PRE_PATCH(object, fn) and its three siblings attach
 * fn to the klp_object of object (vmlinux, or a module's name with
 * underscores) as a klp_callbacks member; Stitch reads which the hooks
 * define and wires them into the livepatch registration. A pre-patch
 * callback returning an error makes the kernel refuse the patch (for a
 * module loaded later: refuse the module).
 *
 * Data: STITCH_UPDATES_DATA(symbol) declares that the hooks update an
 * initialised variable the fix changes (see below).
 *
 * Init and exit code: STITCH_CARRIES_INIT(fn) declares that the hooks
 * take care of a changed __init or __exit function; stitch_replace_exit
 * and stitch_restore_exit install a module's fixed exit function.
 *
 * Shadow variables: STITCH_SHADOW(name, id, type) gives typed accessors
 * for data attached to an existing object (a field a fix adds to a
 * struct), over the kernel's klp_shadow_* API. Stitch frees every shadow
 * variable declared this way (klp_shadow_free_all) in vmlinux's
 * post-unpatch callback, after the author's own, unless the patch is
 * replaced by a cumulative one (which inherits them).
 */
#ifndef _STITCH_HOOKS_H
#define _STITCH_HOOKS_H

#include <linux/compiler.h>
#include <linux/gfp.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/stddef.h>

/*
 * Each callback becomes a global function whose name tells Stitch its
 * kind and object; calling fn through it checks fn's type.
 */
#define __STITCH_CALLBACK_INT(kind, object, fn)					\
	int __stitch_##kind##__##object(struct klp_object *obj);		\
	int __stitch_##kind##__##object(struct klp_object *obj)			\
	{ return fn(obj); }
#define __STITCH_CALLBACK_VOID(kind, object, fn)				\
	void __stitch_##kind##__##object(struct klp_object *obj);		\
	void __stitch_##kind##__##object(struct klp_object *obj)		\
	{ fn(obj); }

/* int fn(struct klp_object *): before the object is patched; an error aborts. */
#define STITCH_PRE_PATCH(object, fn)	__STITCH_CALLBACK_INT(pre_patch, object, fn)
/* void fn(struct klp_object *): once the transition to the patch is done. */
#define STITCH_POST_PATCH(object, fn)	__STITCH_CALLBACK_VOID(post_patch, object, fn)
/* void fn(struct klp_object *): before the transition back starts. */
#define STITCH_PRE_UNPATCH(object, fn)	__STITCH_CALLBACK_VOID(pre_unpatch, object, fn)
/* void fn(struct klp_object *): once no task runs the patched code. */
#define STITCH_POST_UNPATCH(object, fn)	__STITCH_CALLBACK_VOID(post_unpatch, object, fn)

/*
 * STITCH_UPDATES_DATA(symbol) says that the hooks update the initialised
 * variable `symbol` in place (a pre-patch callback sets the value the fix
 * gives it, a post-unpatch callback puts the old one back), so that the
 * fix may change its initialiser: Stitch refuses such a change otherwise.
 * Only a writable variable whose size the fix keeps qualifies.
 */
#define STITCH_UPDATES_DATA(symbol)						\
	static const char __stitch_updates_##symbol[]				\
		__used __section(".stitch.data") __aligned(1) = #symbol

/*
 * STITCH_REDIRECTS(fn) says that the hooks re-point every pointer to the
 * function fn that the running kernel holds in data (an ops table entry)
 * to the patch's copy of fn, STITCH_NEW(fn), when the patch goes on, and
 * back when it goes off. fn is a changed function ftrace cannot redirect
 * (no __fentry__ call: an inline function, a file built without -pg),
 * so the calls through those pointers would still run the old code:
 * Stitch refuses the change otherwise. Declare fn with its type (extern)
 * to use STITCH_NEW(fn).
 */
#define STITCH_REDIRECTS(fn)							\
	static const char __stitch_redirects_##fn[]				\
		__used __section(".stitch.redirects") __aligned(1) = #fn
/* The address of the patch's copy of fn (the fixed code), of fn's type. */
#define STITCH_NEW(fn)								\
	({ extern typeof(fn) __stitch_new__##fn; &__stitch_new__##fn; })

/*
 * STITCH_SHADOW(name, id, type) declares a shadow variable of type
 * `type` under klp shadow id `id` (an unsigned long the patch's shadow
 * variables do not share with other patches' unless they mean the same
 * field), and these helpers, each taking the object it is attached to:
 *
 *   type *name_get(obj)                   NULL if obj has none yet
 *   type *name_alloc(obj, gfp)            NULL if obj has one already
 *   type *name_get_or_alloc(obj, gfp)     the existing one, or a new zeroed one
 *   void  name_free(obj)                  when obj goes away
 *
 * The record in section .stitch.shadow tells Stitch the id, so that the
 * patch frees them all when it is reverted.
 */
#define STITCH_SHADOW(name, id, type)						\
	static const unsigned long __stitch_shadow_##name			\
		__used __section(".stitch.shadow") __aligned(8) = (id);		\
	static inline type *name##_get(void *obj)				\
	{ return klp_shadow_get(obj, (id)); }					\
	static inline type *name##_alloc(void *obj, gfp_t gfp)			\
	{ return klp_shadow_alloc(obj, (id), sizeof(type), gfp, NULL, NULL); }	\
	static inline type *name##_get_or_alloc(void *obj, gfp_t gfp)		\
	{ return klp_shadow_get_or_alloc(obj, (id), sizeof(type), gfp, NULL, NULL); } \
	static inline void name##_free(void *obj)				\
	{ klp_shadow_free(obj, (id), NULL); }

/* The kernel's API under Stitch's names, for a constructor or destructor. */
#define STITCH_SHADOW_GET(obj, id)				klp_shadow_get(obj, id)
#define STITCH_SHADOW_ALLOC(obj, id, size, gfp, ctor, data)	klp_shadow_alloc(obj, id, size, gfp, ctor, data)
#define STITCH_SHADOW_GET_OR_ALLOC(obj, id, size, gfp, ctor, data) \
	klp_shadow_get_or_alloc(obj, id, size, gfp, ctor, data)
#define STITCH_SHADOW_FREE(obj, id, dtor)			klp_shadow_free(obj, id, dtor)
#define STITCH_SHADOW_FREE_ALL(id, dtor)			klp_shadow_free_all(id, dtor)

/*
 * STITCH_CARRIES_INIT(fn) says that the hooks take care of the fix's
 * change to __init or __exit function fn (or to init_module or
 * cleanup_module, its alias): a callback redoes on the live state what
 * the changed init code would have done differently, or installs the
 * fixed exit code (stitch_replace_exit), or the comment above the
 * declaration proves that nothing after boot depends on the change.
 * Stitch refuses a changed __init or __exit function otherwise, and
 * never patches one: its code has run, or runs at unload.
 */
#define STITCH_CARRIES_INIT(fn)							\
	static const char __stitch_carries_##fn[]				\
		__used __section(".stitch.init") __aligned(1) = #fn

/*
 * The exit function a module runs at unload (mod->exit, its
 * cleanup_module) is notrace __exit code that livepatch cannot redirect.
 * stitch_replace_exit, called from the module's pre-patch callback,
 * points mod->exit at a fixed copy in the livepatch module;
 * stitch_restore_exit, from its post-unpatch callback, puts the old one
 * back. The fixed copy lives in the livepatch module, so the helper
 * holds a reference on it while mod->exit points there: after a
 * cumulative patch replaced this one (whose unpatch callbacks then do
 * not run), the old livepatch module stays loaded rather than leave the
 * target a dangling exit pointer. module_mutex orders the swap with
 * delete_module, which reads mod->exit only after it made the module
 * GOING under that mutex: a module already GOING keeps its old exit.
 * A module that loads after the patch runs its old init, and keeps the
 * old exit that matches it unless at_load says the fixed one fits too.
 */
/* Not in linux/module.h; a klp relocation reaches vmlinux's. */
extern struct mutex module_mutex;

struct stitch_exit {
	void (*fixed)(void);	/* the fixed exit function, in the hooks */
	/*
	 * Optional, run under module_mutex, so that no unload comes between
	 * them and the swap: installed right after mod->exit became fixed
	 * (undo what the old init did that the fixed exit no longer undoes);
	 * restoring right before the old exit comes back, only while the
	 * module stays loaded (redo it, for the old exit to undo).
	 */
	void (*installed)(void);
	void (*restoring)(void);
	/*
	 * Also replace the exit of a module that loads after the patch
	 * (pre-patch runs while it is COMING, before its init, which is
	 * the old code): only when the fixed exit undoes the old init too.
	 */
	bool at_load;
	void (*old)(void);	/* set while mod->exit is replaced */
};

static inline int stitch_replace_exit(struct klp_object *obj, struct stitch_exit *e)
{
	struct module *mod = obj->mod;

	if (!mod || !e->fixed)
		return -EINVAL;
	mutex_lock(&module_mutex);
	/*
	 * A COMING module's init has not run yet: it is the old init, whose
	 * effects the old exit undoes, so the old exit stays unless at_load.
	 */
	if (!e->old && mod->exit && (mod->state == MODULE_STATE_LIVE ||
				     (e->at_load && mod->state == MODULE_STATE_COMING))) {
		__module_get(THIS_MODULE);
		e->old = mod->exit;
		WRITE_ONCE(mod->exit, e->fixed);
		if (e->installed)
			e->installed();
	}
	mutex_unlock(&module_mutex);
	return 0;
}

static inline void stitch_restore_exit(struct klp_object *obj, struct stitch_exit *e)
{
	struct module *mod = obj->mod;
	bool put = false;

	mutex_lock(&module_mutex);
	if (e->old) {
		if (e->restoring && mod && mod->state != MODULE_STATE_GOING)
			e->restoring();
		if (mod && mod->exit == e->fixed)
			WRITE_ONCE(mod->exit, e->old);
		e->old = NULL;
		put = true;
	}
	mutex_unlock(&module_mutex);
	if (put)
		module_put(THIS_MODULE);
}

#endif /* _STITCH_HOOKS_H */
