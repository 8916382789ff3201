/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Stitch's adapter for kpatch's syscall macros (KPATCH_SYSCALL_DEFINEn),
 * written for Stitch from kpatch's documented behaviour.
 *
 * kpatch needs its own syscall wrappers because the body of a syscall,
 * __do_sys_NAME, is an inline function of the kernel's SYSCALL_DEFINE
 * and so has no fentry call for ftrace to redirect. Stitch handles that
 * case itself: when the compiler keeps such a function out of line, the
 * patch carries a copy of it and replaces its callers, the syscall's
 * entry stubs (__x64_sys_NAME, __ia32_sys_NAME), which do have one. So
 * each KPATCH_SYSCALL_DEFINEn is the kernel's SYSCALL_DEFINEn, and the
 * syscall's metadata and trace events stay exactly the kernel's.
 */
#ifndef _STITCH_KPATCH_SYSCALL_H
#define _STITCH_KPATCH_SYSCALL_H

#define KPATCH_SYSCALL_DEFINE0(name)		SYSCALL_DEFINE0(name)
#define KPATCH_SYSCALL_DEFINE1(name, ...)	SYSCALL_DEFINE1(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE2(name, ...)	SYSCALL_DEFINE2(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE3(name, ...)	SYSCALL_DEFINE3(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE4(name, ...)	SYSCALL_DEFINE4(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE5(name, ...)	SYSCALL_DEFINE5(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE6(name, ...)	SYSCALL_DEFINE6(name, __VA_ARGS__)

#endif /* _STITCH_KPATCH_SYSCALL_H */
