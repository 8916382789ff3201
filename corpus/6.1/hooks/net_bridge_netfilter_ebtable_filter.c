// SPDX-License-Identifier: GPL-2.0
/*
 * The fix: ebtable_filter's module exit unregistered its pernet ops before
 * its table template, so a network namespace created in between could
 * instantiate the "filter" table again after the module's last per-net
 * exit ran. The fix swaps the two calls in ebtable_filter_fini.
 *
 * Why hooks: ebtable_filter_fini is __exit code (cleanup_module), notrace
 * and called only through the module's mod->exit at unload: livepatch
 * cannot redirect it, and Stitch refuses the change without hooks.
 *
 * What the hooks do: fixed_ebtable_filter_fini is the fixed exit code.
 * The pre-patch callback of ebtable_filter (run at apply if it is loaded,
 * else when it loads) points its mod->exit at it (stitch_replace_exit);
 * the post-unpatch callback (at revert, or after the unload) restores the
 * old one. STITCH_CARRIES_INIT(ebtable_filter_fini) tells Stitch the
 * hooks carry the exit change. The fixed exit logs one line, so that a
 * test (TestInitDataGuest) sees which exit code ran.
 */
#include <linux/netfilter_bridge/ebtables.h>
#include <net/net_namespace.h>
#include <stitch/hooks.h>

STITCH_CARRIES_INIT(ebtable_filter_fini);

/* Statics of ebtable_filter, reached through klp relocations. */
extern const struct ebt_table frame_filter;
extern struct pernet_operations frame_filter_net_ops;

/*
 * ebt_unregister_template is an export of ebtables (EXPORT_SYMBOL), not of
 * vmlinux: linking it would make the livepatch module depend on ebtables,
 * and symbol_get refuses symbols that are not EXPORT_SYMBOL_GPL (6.1.y
 * stable). The hooks reach it through a klp relocation instead: the
 * empty pre-patch callback of ebtables gives the patch a klp_object for
 * ebtables, whose relocations livepatch resolves when ebtables is loaded,
 * which it is whenever ebtable_filter (which depends on it) is.
 */
extern void ebt_unregister_template(const struct ebt_table *t);

static int ebtables_object(struct klp_object *obj)
{
	return 0;
}
STITCH_PRE_PATCH(ebtables, ebtables_object);

static void fixed_ebtable_filter_fini(void)
{
	pr_info("ebtable_filter: fixed exit: table template first, then pernet ops\n");
	ebt_unregister_template(&frame_filter);
	unregister_pernet_subsys(&frame_filter_net_ops);
}

/* The fixed exit undoes the (unchanged) init as well: also at load. */
static struct stitch_exit exit_fix = {
	.fixed = fixed_ebtable_filter_fini,
	.at_load = true,
};

static int install_exit(struct klp_object *obj)
{
	return stitch_replace_exit(obj, &exit_fix);
}
STITCH_PRE_PATCH(ebtable_filter, install_exit);

static void restore_exit(struct klp_object *obj)
{
	stitch_restore_exit(obj, &exit_fix);
}
STITCH_POST_UNPATCH(ebtable_filter, restore_exit);
