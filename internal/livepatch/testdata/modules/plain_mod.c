// SPDX-License-Identifier: GPL-2.0
/* An ordinary module: apply must refuse it as not a livepatch. */
#include <linux/module.h>

static int __init plain_mod_init(void)
{
	return 0;
}

static void __exit plain_mod_exit(void)
{
}

module_init(plain_mod_init);
module_exit(plain_mod_exit);
MODULE_LICENSE("GPL");
