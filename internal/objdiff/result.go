// Package objdiff compares a pre-fix and a post-fix build of one kernel
// object (both compiled with -ffunction-sections -fdata-sections) and says
// what the fix changed at the machine-code level: which functions changed,
// which are new, which data is new, and which changes a livepatch cannot
// carry, each with the reason.
//
// The vocabulary follows the kernel's livepatch documentation and
// objtool's klp diff: symbols of the two objects are correlated first
// (by name, seeing through compiler-made suffixes and numbered static
// locals), then each correlated function is compared by its bytes and by
// what its relocations point to, never by raw section offsets.
package objdiff

import "errors"

// ErrNoObject means an input could not be read as an object; the wrapped
// error from elfobj says why.
var ErrNoObject = errors.New("cannot read object")

// Result is the difference between a pre and a post object. It is meant
// to be stored in build manifests, so it marshals to JSON as is.
type Result struct {
	Changed []Func `json:"changed"`
	New     []Func `json:"new"`
	// Removed are functions of the pre object with no counterpart.
	Removed []string `json:"removed"`
	NewData []Data   `json:"new_data"`
	// LineOnly are functions whose code differs only in __LINE__
	// constants (a WARN or BUG moved); they are not changes.
	LineOnly []string `json:"line_only"`
	// Unsafe lists every change a livepatch cannot carry.
	Unsafe       []Problem     `json:"unsafe"`
	Explanations []Explanation `json:"explanations"`
	// Renamed maps a file-local symbol of the post object to its
	// counterpart in the pre object where the names differ: gcc numbers
	// function-local statics (count.1) and clones (foo.constprop.0) per
	// file, so an edit elsewhere renumbers them. The running kernel has
	// the pre-fix name.
	Renamed map[string]string `json:"renamed,omitempty"`
	// Notrace lists the changed functions without a __fentry__ call that
	// the patch carries as new copies, and how the running kernel will
	// reach the copies instead of the old code.
	Notrace []NotraceRoute `json:"notrace,omitempty"`
}

// NotraceRoute is a changed function that ftrace cannot redirect (no
// __fentry__ call), carried as a new copy: every path to it in the
// running kernel goes through Callers, which the patch replaces so that
// they call the copy, or through the pointers in Data, which the fix's
// hooks must re-point (the build refuses it otherwise).
type NotraceRoute struct {
	Func    string   `json:"func"`
	Callers []string `json:"callers"`
	Data    []string `json:"data,omitempty"`
}

// PreName is the pre object's name of a post object's symbol.
func (r *Result) PreName(post string) string {
	if n, ok := r.Renamed[post]; ok {
		return n
	}
	return post
}

// Patchable tells whether every change can be live-patched.
func (r *Result) Patchable() bool { return len(r.Unsafe) == 0 }

// Func is a changed or new function, as the module generator needs it.
type Func struct {
	// Name is the symbol in the post object.
	Name string `json:"name"`
	// PreName is the symbol in the pre object when it differs (a
	// renumbered .constprop clone, say).
	PreName string `json:"pre_name,omitempty"`
	Section string `json:"section"`
	Local   bool   `json:"local"`
	Size    uint64 `json:"size"`
	// Parent is set for a part the compiler split out of a function
	// (foo.cold): it is entered by jumps from Parent, not called, so it
	// is carried with Parent rather than patched on its own.
	Parent string `json:"parent,omitempty"`
	// Refs are the symbols the function's relocations point to.
	Refs []Ref `json:"refs"`
	// Notrace marks a changed function that ftrace cannot redirect (no
	// __fentry__ call): it is listed as new because the patch carries a
	// copy of it, and the functions that use it are replaced instead.
	Notrace bool `json:"notrace,omitempty"`
}

// Ref is a symbol a changed or new function refers to.
type Ref struct {
	Name string `json:"name"`
	// Local: a file-local symbol of the object. Unless the patch carries
	// it, the livepatch module reaches it through a klp relocation.
	Local bool `json:"local"`
	// Defined: defined in this object (otherwise an external symbol).
	Defined bool `json:"defined"`
	// Func: the symbol is a function.
	Func bool `json:"func"`
	// Section: a reference to a section with no symbol at that place
	// (string literals, jump tables); Name is the section's name.
	Section bool `json:"section,omitempty"`
	// New: the symbol has no counterpart in the pre object, so the patch
	// must carry it.
	New bool `json:"new,omitempty"`
}

// Data is a data object the patch carries: new, or a new version of
// constant data.
type Data struct {
	Name    string `json:"name"`
	Section string `json:"section"`
	Local   bool   `json:"local"`
	Size    uint64 `json:"size"`
	// Replaces names the pre object's version of changed constant data
	// that only replaced functions use: they get the new copy.
	Replaces string `json:"replaces,omitempty"`
	// Why says why changed writable data may be carried as a new copy.
	Why string `json:"why,omitempty"`
}

// Kinds of unsafe change.
const (
	KindData        = "changed-data" // initialised data or a variable's size changed
	KindStaticLocal = "static-local" // a function's static variable changed
	KindInit        = "init-code"    // __init or __exit code changed
	KindNoFentry    = "no-fentry"    // changed function without a __fentry__ call
	// KindNoFentryData: a changed function without a __fentry__ call
	// that writable data points to; hooks that re-point the data
	// (STITCH_REDIRECTS) make it patchable.
	KindNoFentryData = "no-fentry-data"
	KindTypeLayout   = "type-layout"  // a struct or union changed layout
	KindUncorrelated = "uncorrelated" // a symbol could not be matched with certainty
	// KindSpecialSection: the object has a special section its kernel's
	// layout does not describe (the Symbol is the section).
	KindSpecialSection = "special-section"
)

// Problem is one change that cannot be live-patched.
type Problem struct {
	Kind   string `json:"kind"`
	Symbol string `json:"symbol"`
	Reason string `json:"reason"`
	// ExitOnly marks a changed __exit function that no code of the
	// object calls (only its module_exit record points to it): built
	// into vmlinux it never runs, so the change needs nothing live.
	ExitOnly bool `json:"exit_only,omitempty"`
}

// Explanation says that changed functions changed because a function
// inlined into them changed.
type Explanation struct {
	Inlined string   `json:"inlined"`
	Changed []string `json:"changed"`
}
