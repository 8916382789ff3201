// SPDX-License-Identifier: GPL-2.0
/*
 * The fix: null_blk freed a device's zones in null_free_dev, which runs
 * after the configfs item is gone, so a zone_readonly/zone_offline write
 * could race with the free; it now frees them in null_del_dev and takes
 * the lock in the two store functions.
 *
 * Why hooks: null_init (init_module) is __init code and changed only
 * because the compiler inlined null_free_dev into it: its error path
 * (null_create_dev failed) no longer calls null_free_zoned_dev. Stitch
 * cannot tell from the objects which paths of an init function ran, so
 * it refuses the change without a declaration.
 *
 * Why nothing needs a live change: that error path makes the module's
 * init fail, and a module whose init failed is freed with all it set up:
 * no state of a loaded null_blk comes from it. When null_blk loads after
 * the patch, its init is the old code; its error path then frees a
 * device's zones twice at most, and null_free_zoned_dev sets dev->zones
 * to NULL after kvfree, so the second call frees nothing (the fixed
 * null_add_dev and null_del_dev free them first). No callbacks: the
 * declaration alone lets Stitch patch the rest of the fix.
 */
#include <stitch/hooks.h>

STITCH_CARRIES_INIT(null_init);
