// SPDX-License-Identifier: GPL-2.0
/*
 * The fix: removes SMC's TCP ULP ("smc", setsockopt(TCP_ULP) turning a
 * TCP socket into an SMC one, whose socket swap was unsafe), sets up the
 * close work in smc_sock_alloc for every socket, locks clcsock in
 * smc_getname, and takes a net reference for the clcsock in smc_create.
 *
 * Why hooks: smc_init (init_module) registered the ULP at load, and
 * smc_exit (cleanup_module) unregisters it at unload; the fix drops
 * both. Both are __init/__exit code livepatch cannot redirect, and the
 * ULP registered by the old init is live state: Stitch refuses the two
 * changes without hooks.
 *
 * What the hooks do (STITCH_CARRIES_INIT for smc_init and smc_exit):
 * - smc's pre-patch callback (run at apply if smc is loaded) points
 *   smc's mod->exit at fixed_smc_exit, the fixed exit code, and, under
 *   the same module_mutex section, unregisters the ULP: the live state
 *   the fixed init would have left. setsockopt(TCP_ULP, "smc") then
 *   fails with ENOENT, as on a kernel built from the fix.
 * - smc's post-unpatch callback (at revert) registers the ULP again and
 *   restores the old exit, which unregisters it at unload; after an
 *   unload while patched (the fixed exit ran, the ULP was not
 *   registered) it only forgets the swap.
 * - smc loaded after the patch runs its old init, which registers the
 *   ULP: its old exit stays (it unregisters it), and the ULP stays until
 *   smc is reloaded without the patch or the kernel is rebooted; the
 *   patched functions apply to it as usual.
 */
#include <linux/module.h>
#include <linux/workqueue.h>
#include <net/sock.h>
#include <net/tcp.h>
#include <stitch/hooks.h>

STITCH_CARRIES_INIT(smc_init);
STITCH_CARRIES_INIT(smc_exit);

/* smc's own symbols, reached through klp relocations. */
extern struct tcp_ulp_ops smc_ulp_ops;
extern struct workqueue_struct *smc_tcp_ls_wq, *smc_hs_wq, *smc_close_wq;
extern struct proto smc_proto, smc_proto6;
extern struct pernet_operations smc_net_ops, smc_net_stat_ops;
extern void smc_core_exit(void);
extern void smc_ib_unregister_client(void);
extern void smc_pnet_exit(void);
extern void smc_nl_exit(void);
extern void smc_clc_exit(void);

/* The fix's smc_exit: no ULP to unregister. */
static void fixed_smc_exit(void)
{
	pr_info("smc: fixed exit: no TCP ULP to unregister\n");
	static_branch_disable(&tcp_have_smc);
	sock_unregister(PF_SMC);
	smc_core_exit();
	smc_ib_unregister_client();
	destroy_workqueue(smc_close_wq);
	destroy_workqueue(smc_tcp_ls_wq);
	destroy_workqueue(smc_hs_wq);
	proto_unregister(&smc_proto6);
	proto_unregister(&smc_proto);
	smc_pnet_exit();
	smc_nl_exit();
	smc_clc_exit();
	unregister_pernet_subsys(&smc_net_stat_ops);
	unregister_pernet_subsys(&smc_net_ops);
	rcu_barrier();
}

static void drop_ulp(void)
{
	tcp_unregister_ulp(&smc_ulp_ops);
	pr_info("smc: TCP ULP \"smc\" unregistered\n");
}

static void restore_ulp(void)
{
	int err = tcp_register_ulp(&smc_ulp_ops);

	if (err)
		pr_warn("smc: cannot register TCP ULP \"smc\" again: %d\n", err);
}

static struct stitch_exit exit_fix = {
	.fixed = fixed_smc_exit,
	.installed = drop_ulp,
	.restoring = restore_ulp,
};

static int install_exit(struct klp_object *obj)
{
	return stitch_replace_exit(obj, &exit_fix);
}
STITCH_PRE_PATCH(smc, install_exit);

static void restore_exit(struct klp_object *obj)
{
	stitch_restore_exit(obj, &exit_fix);
}
STITCH_POST_UNPATCH(smc, restore_exit);
