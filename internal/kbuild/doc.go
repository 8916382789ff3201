// Package kbuild drives the kernel's own build system: it prepares a kernel
// source tree that matches a distro kernel, compiles single objects in it,
// and builds external modules against a linux-headers tree.
package kbuild
