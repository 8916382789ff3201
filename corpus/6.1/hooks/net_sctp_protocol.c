// SPDX-License-Identifier: GPL-2.0
/*
 * Hooks of net_sctp_protocol (net/sctp/protocol.c).
 *
 * The fix: sctp_free_addr_wq() shuts the address-work timer down for
 * good (timer_shutdown_sync) instead of deleting it under the lock, and
 * sctp_v4_xmit() sends UDP-encapsulated packets with bottom halves
 * disabled, as udp_tunnel_xmit_skb() expects.
 *
 * Why hooks: sctp_v4_xmit() is a static inline function, which the
 * kernel makes notrace: it has no __fentry__ call, so ftrace cannot
 * redirect it. Nothing calls it directly; every IPv4 transmission goes
 * through the ops table sctp_af_inet (tp->af_specific->sctp_xmit in
 * sctp_packet_transmit). The patch carries a copy of the fixed function
 * (STITCH_NEW(sctp_v4_xmit)), and these hooks point the table's entry to
 * it while the patch is on (STITCH_REDIRECTS tells the build so).
 *
 * - pre-patch (sctp): swaps sctp_af_inet.sctp_xmit from the old function
 *   to the copy; refuses the patch (-EBUSY) if the entry holds anything
 *   else, as something else has re-pointed it.
 * - post-unpatch (sctp): puts the old function back, then waits until no
 *   task can still be running the copy (synchronize_rcu_tasks: each task
 *   has passed a voluntary context switch), since the copy goes away with
 *   the patch module. Both run again when the sctp module loads or
 *   unloads while the patch is on.
 */
#include <linux/atomic.h>
#include <linux/printk.h>
#include <linux/rcupdate.h>
#include <net/sctp/sctp.h>
#include <stitch/hooks.h>

/* Both static in net/sctp/protocol.c: klp relocations to sctp. */
extern struct sctp_af sctp_af_inet;
extern int sctp_v4_xmit(struct sk_buff *skb, struct sctp_transport *t);

STITCH_REDIRECTS(sctp_v4_xmit);

typedef int (*sctp_xmit_fn)(struct sk_buff *skb, struct sctp_transport *t);

static int point_to_copy(struct klp_object *obj)
{
	sctp_xmit_fn old = cmpxchg(&sctp_af_inet.sctp_xmit, sctp_v4_xmit, STITCH_NEW(sctp_v4_xmit));

	if (old != sctp_v4_xmit) {
		pr_err("stitch: sctp_af_inet.sctp_xmit is %ps, not sctp_v4_xmit: not patching\n", old);
		return -EBUSY;
	}
	return 0;
}
STITCH_PRE_PATCH(sctp, point_to_copy);

static void point_back(struct klp_object *obj)
{
	cmpxchg(&sctp_af_inet.sctp_xmit, STITCH_NEW(sctp_v4_xmit), sctp_v4_xmit);
	synchronize_rcu_tasks();
}
STITCH_POST_UNPATCH(sctp, point_back);
