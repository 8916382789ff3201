// Package kallsyms tells where every symbol of a target kernel lives
// without a debug-info package: it extracts vmlinux from the boot image
// (bzImage), decodes the kallsyms tables the kernel keeps of itself in
// .rodata, reads /proc/kallsyms of a running kernel and the symbol tables
// of module .ko files, and hands out the bytes of a function for
// comparison with a build (run-pre matching).
//
// Symbols of one object are counted in kallsyms order, as livepatch does:
// sympos N is the Nth symbol of that name in that object, and sympos 0
// means the name is unique there (kernel/livepatch/core.c,
// klp_find_object_symbol).
package kallsyms

import (
	"errors"
	"fmt"
	"runtime/debug"
)

// Errors a caller can test for with errors.Is.
var (
	// ErrFormat means the input is malformed or not what it claims to be.
	ErrFormat = errors.New("malformed input")
	// ErrUnsupported means a valid input in a form this package does not
	// read (another compression, a kernel without base-relative kallsyms).
	ErrUnsupported = errors.New("unsupported")
	// ErrNotFound means no symbol of that name (or position) exists.
	ErrNotFound = errors.New("symbol not found")
	// ErrAmbiguous means sympos 0 was asked of a name that is not unique.
	ErrAmbiguous = errors.New("symbol name not unique")
)

// Vmlinux is the Object name of the kernel image's own symbols.
const Vmlinux = "vmlinux"

// recoverInto turns a panic from parsing hostile input (an index this
// package or debug/elf did not guard) into an error.
func recoverInto(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: parser panic: %v\n%s", ErrFormat, r, debug.Stack())
	}
}
