package klpmod

import (
	"bytes"
	"context"
	"debug/elf"
	"embed"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/kbuild"
)

// The fix author's kit: the headers a hooks file and a fix's own code
// include (stitch/hooks.h, and the adapters for kpatch's macros), and
// how Stitch finds what they declare in compiled objects.

//go:embed include
var includeFS embed.FS

// ErrHooks means the fix author's hooks (a hooks file, or callbacks in
// the fix) cannot go into the patch as written; the error says why.
var ErrHooks = errors.New("hooks refused")

// The callback kinds the generator treats apart, of
// contract.CallbackKinds (the members of struct klp_callbacks).
const (
	PrePatch    = "pre_patch"
	PostUnpatch = "post_unpatch"
)

// CallbackKinds are the callback kinds, in the order the kernel runs them.
var CallbackKinds = contract.CallbackKinds

// HooksSource is the file name the fix author's hooks file gets in the
// module's build directory.
const HooksSource = "stitch_hooks.c"

// IncludeDir is the directory, under a module's build directory, that
// holds the kit's headers; WriteIncludes writes them anywhere else (the
// include path of the fix's post build).
const IncludeDir = "include"

// WriteIncludes writes the kit's headers into dir: stitch/hooks.h,
// kpatch-macros.h and kpatch-syscall.h. Put dir on the include path
// (-I dir) of whatever compiles hooks or a fix that uses them.
func WriteIncludes(dir string) error {
	return fs.WalkDir(includeFS, "include", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, strings.TrimPrefix(path, "include"))
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		b, err := includeFS.ReadFile(path)
		if err != nil {
			return err
		}
		return writeIfChanged(dst, b)
	})
}

// writeIfChanged writes a file unless it already holds b: kbuild compiles
// again whatever depends on a file newer than its object.
func writeIfChanged(path string, b []byte) error {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, b) {
		return nil
	}
	return os.WriteFile(path, b, 0o644)
}

// Callback is one klp callback found in a compiled object.
type Callback struct {
	Kind string // PrePatch, ...
	// Object is the klp object it is for, when the object says (a hooks
	// file names it); empty for a kpatch-style callback, which is for
	// the object its file is linked into.
	Object string
	Func   string // the function's symbol
}

// Kit is what a compiled object declares with the kit's macros.
type Kit struct {
	Callbacks []Callback
	// Shadows are the ids of the shadow variables declared with
	// STITCH_SHADOW, freed when the patch is reverted.
	Shadows []uint64
	// Updates are the variables the hooks update in place
	// (STITCH_UPDATES_DATA): the fix may change their initialisers.
	Updates []string
	// Redirects are the functions whose pointers in data the hooks
	// re-point to the patch's copies (STITCH_REDIRECTS).
	Redirects []string
	// Carries are the __init and __exit functions whose change the hooks
	// take care of (STITCH_CARRIES_INIT): the patch leaves them out.
	Carries []string
}

// Sections of an object that hold the kit's records: they are metadata
// for Stitch, never carried into the patch as data.
const (
	callbackSecPrefix = ".stitch.callbacks."
	shadowSec         = ".stitch.shadow"
	dataSec           = ".stitch.data"
	redirectsSec      = ".stitch.redirects"
	initSec           = ".stitch.init"
	// NewPrefix starts the name STITCH_NEW(fn) refers to: the global
	// alias the patch gives its copy of fn.
	NewPrefix         = "__stitch_new__"
	callbackSymPrefix = "__stitch_"
)

// KitSection tells whether a section holds only the kit's records.
func KitSection(name string) bool {
	return strings.HasPrefix(name, callbackSecPrefix) || name == shadowSec || name == dataSec || name == redirectsSec || name == initSec
}

// appendNames adds the NUL-separated names of a kit section to list,
// each once.
func appendNames(list []string, data []byte) []string {
	for _, name := range strings.Split(string(data), "\x00") {
		if name != "" && !slices.Contains(list, name) {
			list = append(list, name)
		}
	}
	return list
}

// FindKit reads the kit's declarations in a compiled object: callbacks
// recorded by kpatch-macros.h (a pointer per callback in
// .stitch.callbacks.KIND), callbacks defined by stitch/hooks.h (global
// functions named __stitch_KIND__OBJECT), shadow variable ids
// (.stitch.shadow), and lists of names: the variables updated in place
// (.stitch.data), the functions whose pointers the hooks re-point
// (.stitch.redirects) and the init/exit functions the hooks carry
// (.stitch.init).
func FindKit(obj []byte) (*Kit, error) {
	o, err := elfobj.Parse(obj)
	if err != nil {
		return nil, err
	}
	k := &Kit{}
	for _, sec := range o.Sections {
		switch {
		case sec.Name == shadowSec:
			if len(sec.Data)%8 != 0 {
				return nil, fmt.Errorf("%w: section %s is %d bytes, not a list of 8-byte shadow ids", ErrHooks, sec.Name, len(sec.Data))
			}
			for off := 0; off < len(sec.Data); off += 8 {
				id := binary.LittleEndian.Uint64(sec.Data[off:])
				if !slices.Contains(k.Shadows, id) {
					k.Shadows = append(k.Shadows, id)
				}
			}
		case sec.Name == dataSec:
			k.Updates = appendNames(k.Updates, sec.Data)
		case sec.Name == redirectsSec:
			k.Redirects = appendNames(k.Redirects, sec.Data)
		case sec.Name == initSec:
			k.Carries = appendNames(k.Carries, sec.Data)
		case strings.HasPrefix(sec.Name, callbackSecPrefix):
			kind := strings.TrimPrefix(sec.Name, callbackSecPrefix)
			if !slices.Contains(CallbackKinds, kind) {
				return nil, fmt.Errorf("%w: section %s: no callback kind %q (want one of %s)", ErrHooks, sec.Name, kind, strings.Join(CallbackKinds, ", "))
			}
			for off := uint64(0); off+8 <= uint64(len(sec.Data)); off += 8 {
				rels := sec.RelocsIn(off, off+8)
				if len(rels) != 1 || rels[0].Type != elf.R_X86_64_64 {
					return nil, fmt.Errorf("%w: %s+%#x: a callback record is one pointer to a function", ErrHooks, sec.Name, off)
				}
				fn, addend := rels[0].Target()
				if fn == nil || !fn.Func() || !fn.Defined() || addend != 0 {
					return nil, fmt.Errorf("%w: %s+%#x: the %s callback is not a function of this file", ErrHooks, sec.Name, off, kind)
				}
				k.Callbacks = append(k.Callbacks, Callback{Kind: kind, Func: fn.Name})
			}
		}
	}
	for _, s := range o.Symbols {
		if s == nil || !s.Func() || !s.Defined() || s.Local() || !strings.HasPrefix(s.Name, callbackSymPrefix) {
			continue
		}
		kind, object, ok := strings.Cut(strings.TrimPrefix(s.Name, callbackSymPrefix), "__")
		if !ok || !slices.Contains(CallbackKinds, kind) {
			continue
		}
		if !validName(object) {
			return nil, fmt.Errorf("%w: callback %s: %q is not an object name (vmlinux, or a module's name with underscores)", ErrHooks, s.Name, object)
		}
		k.Callbacks = append(k.Callbacks, Callback{Kind: kind, Object: object, Func: s.Name})
	}
	sort.Slice(k.Shadows, func(i, j int) bool { return k.Shadows[i] < k.Shadows[j] })
	return k, nil
}

// CompiledHooks is the fix author's hooks file compiled for the target.
type CompiledHooks struct {
	Kit
	// Undefined are the symbols the hooks use and do not define: each
	// must be exported by the kernel, or be resolved by a klp
	// relocation (Link's rename).
	Undefined []string
}

// CompileHooks compiles the hooks file src in dir, a module's build
// directory, against the headers tree, with the kit's headers on its
// include path, and reads what it declares and what it uses. Generate
// later adds the rest of the module to dir; kbuild then reuses the object.
func CompileHooks(ctx context.Context, headers, dir, name string, src []byte, progress io.Writer) (*CompiledHooks, error) {
	if err := writeHooksDir(dir, src); err != nil {
		return nil, err
	}
	// The Kbuild file Generate writes, but with only the hooks in it:
	// kbuild compiles one object of an external module given its name,
	// with the same flags (KBUILD_MODNAME: name) as in the module.
	if err := os.WriteFile(filepath.Join(dir, "Kbuild"), []byte(kbuildFile(name, nil, true)), 0o644); err != nil {
		return nil, err
	}
	obj := strings.TrimSuffix(HooksSource, ".c") + ".o"
	path, err := kbuild.CompileModuleObject(ctx, headers, dir, obj, progress)
	if err != nil {
		return nil, fmt.Errorf("%w: compile the hooks file: %w", ErrHooks, err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := FindKit(raw)
	if err != nil {
		return nil, fmt.Errorf("hooks file: %w", err)
	}
	h := &CompiledHooks{Kit: *k}
	for _, c := range h.Callbacks {
		if c.Object == "" {
			return nil, fmt.Errorf("%w: the hooks file uses a kpatch callback macro (%s %s): in a hooks file, name the object with STITCH_%s(object, fn)", ErrHooks, c.Kind, c.Func, strings.ToUpper(c.Kind))
		}
	}
	f, err := elf.NewFile(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadModule, path, err)
	}
	syms, err := f.Symbols()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadModule, path, err)
	}
	for _, s := range syms {
		if s.Section == elf.SHN_UNDEF && s.Name != "" {
			h.Undefined = append(h.Undefined, s.Name)
		}
	}
	sort.Strings(h.Undefined)
	return h, nil
}

// writeHooksDir puts the hooks file and the kit's headers into a
// module's build directory.
func writeHooksDir(dir string, src []byte) error {
	if err := WriteIncludes(filepath.Join(dir, IncludeDir)); err != nil {
		return err
	}
	return writeIfChanged(filepath.Join(dir, HooksSource), src)
}

// kbuildFile is the Kbuild file of module name: the registration, the
// diff objects, and the hooks file with the kit's headers on its include
// path.
func kbuildFile(name string, objs []string, hooks bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Generated by Stitch.\nobj-m := %s.o\n", name)
	all := append([]string{"stitch_hook.o"}, objs...)
	if hooks {
		all = append(all, strings.TrimSuffix(HooksSource, ".c")+".o")
		fmt.Fprintf(&b, "ccflags-y += -I$(src)/%s\n", IncludeDir)
	}
	fmt.Fprintf(&b, "%s-y := %s\n", name, strings.Join(all, " "))
	return b.String()
}
