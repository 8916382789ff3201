// SPDX-License-Identifier: GPL-2.0
/*
 * The fix: ip6mr queued unresolved packets and reports with their dst
 * still attached (a dst reference that outlives the device); it drops
 * the dst (skb_dst_drop) in ip6mr_cache_report and
 * ip6mr_cache_unresolved. It also creates the "ip6_mrt_cache" slab cache
 * with SLAB_ACCOUNT, so that multicast routing cache entries are charged
 * to the memory cgroup of whoever creates them.
 *
 * Why hooks: the SLAB_ACCOUNT part is in ip6_mr_init, __init code that
 * ran at boot: the cache exists without the flag, and every allocation
 * from it depends on its flags. Stitch refuses the __init change without
 * hooks (naming mrt_cachep and kmem_cache_create).
 *
 * Why the flag is not redone live: the flag lives in struct kmem_cache,
 * whose SLUB layout is private to mm/ (mm/slab.h is not in the kernel's
 * headers, so a module cannot include it), and the cache may be merged
 * with other caches of the same size (CONFIG_SLAB_MERGE_DEFAULT=y), whose
 * allocations must not become accounted; a new cache cannot replace it
 * either, since objects allocated from the old one are freed through
 * mrt_cachep. The running kernel keeps ip6_mrt_cache as it was, without
 * accounting: the state before the fix, not a new hazard. The pre-patch
 * callback says so in the kernel log; the accounting comes with the next
 * boot of a kernel built from the fix.
 *
 * STITCH_CARRIES_INIT(ip6_mr_init) lets Stitch patch the rest of the fix,
 * the dst drops, which is the memory-safety part.
 */
#include <linux/printk.h>
#include <stitch/hooks.h>

STITCH_CARRIES_INIT(ip6_mr_init);

static int note_mrt_cache(struct klp_object *obj)
{
	pr_notice("ip6mr: ip6_mrt_cache keeps its boot-time flags; SLAB_ACCOUNT comes with the next boot of the fixed kernel\n");
	return 0;
}
STITCH_PRE_PATCH(vmlinux, note_mrt_cache);
