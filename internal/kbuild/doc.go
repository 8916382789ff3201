// Package kbuild drives the kernel's own build system: it prepares a kernel
// source tree that matches a distro kernel, compiles single objects in it,
// builds external modules against a linux-headers tree, and ports fixes
// to a kernel's source with GNU patch (Port: clean, offset, fuzz, already
// contained, or failing hunks).
package kbuild
