package kmod

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// ErrNoModule means no module file, built-in module or alias answers to a
// name.
var ErrNoModule = errors.New("no such module")

// Index is what modprobe consults in a kernel's module directory
// (/lib/modules/RELEASE): modules.dep for files and dependencies,
// modules.alias for the names the kernel asks for (request_module's
// "fs-xfs", "crypto-crc32c"), modules.softdep for the modules a module
// wants loaded first without linking to them, and modules.builtin for the
// modules compiled into the kernel.
type Index struct {
	Dir     string
	deps    map[string][]string // module name -> dependency files, nearest first
	files   map[string]string   // module name -> file relative to Dir
	aliases []alias
	softPre map[string][]string
	builtin map[string]bool
}

type alias struct{ pattern, module string }

// OpenIndex reads the indexes of a module directory. modules.dep is
// required; the others may be missing.
func OpenIndex(dir string) (*Index, error) {
	x := &Index{Dir: dir, deps: map[string][]string{}, files: map[string]string{},
		softPre: map[string][]string{}, builtin: map[string]bool{}}
	err := eachLine(filepath.Join(dir, "modules.dep"), true, func(l string) {
		file, rest, ok := strings.Cut(l, ":")
		if !ok {
			return
		}
		n := ModuleName(file)
		x.files[n] = file
		x.deps[n] = strings.Fields(rest)
	})
	if err != nil {
		return nil, err
	}
	err = eachLine(filepath.Join(dir, "modules.alias"), false, func(l string) {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "alias" {
			x.aliases = append(x.aliases, alias{pattern: f[1], module: Normalize(f[2])})
		}
	})
	if err != nil {
		return nil, err
	}
	err = eachLine(filepath.Join(dir, "modules.softdep"), false, func(l string) {
		f := strings.Fields(l)
		if len(f) < 3 || f[0] != "softdep" {
			return
		}
		pre := false
		for _, w := range f[2:] {
			switch w {
			case "pre:":
				pre = true
			case "post:":
				pre = false
			default:
				if pre {
					n := Normalize(f[1])
					x.softPre[n] = append(x.softPre[n], w)
				}
			}
		}
	})
	if err != nil {
		return nil, err
	}
	err = eachLine(filepath.Join(dir, "modules.builtin"), false, func(l string) {
		x.builtin[ModuleName(l)] = true
	})
	return x, err
}

func eachLine(name string, required bool, f func(string)) error {
	fh, err := os.Open(name)
	if errors.Is(err, os.ErrNotExist) && !required {
		return nil
	}
	if err != nil {
		return fmt.Errorf("module index: %w", err)
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		if l := sc.Text(); l != "" && !strings.HasPrefix(l, "#") {
			f(l)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("module index %s: %w", name, err)
	}
	return nil
}

// Normalize spells a module name the way the kernel does: '-' and '_'
// are the same character in module names.
func Normalize(name string) string { return strings.ReplaceAll(name, "-", "_") }

// ModuleName is the name of the module in file (path/to/foo-bar.ko[.xz]).
func ModuleName(file string) string {
	base := path.Base(file)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return Normalize(base)
}

// File is the module file of a module name, relative to Dir.
func (x *Index) File(module string) (string, bool) {
	f, ok := x.files[Normalize(module)]
	return f, ok
}

// A Load is one module file to load, relative to Index.Dir. An optional
// load may fail without failing the whole: soft dependencies, and the
// modules of an alias that several modules answer to (crc32c_intel needs a
// CPU feature, crc32c_generic does not), where one is enough.
type Load struct {
	File     string
	Optional bool
}

// Resolve turns a name (a module name or an alias) into the module files
// to load, in loading order: soft pre-dependencies, then hard
// dependencies, then the module. A built-in module needs nothing and
// gives an empty list.
func (x *Index) Resolve(name string) ([]Load, error) {
	mods, builtin := x.lookup(name)
	if len(mods) == 0 && !builtin {
		return nil, fmt.Errorf("%w %q in %s (not in modules.dep, modules.builtin or modules.alias)", ErrNoModule, name, x.Dir)
	}
	var order []Load
	seen := map[string]bool{}
	for _, m := range mods {
		x.appendOrder(&order, seen, m, len(mods) > 1)
	}
	return order, nil
}

// lookup finds the modules a name stands for: the module of that name,
// or every module with a matching alias, as modprobe does.
func (x *Index) lookup(name string) (mods []string, builtin bool) {
	n := Normalize(name)
	if _, ok := x.files[n]; ok {
		return []string{n}, false
	}
	if x.builtin[n] {
		return nil, true
	}
	for _, a := range x.aliases {
		if ok, _ := path.Match(a.pattern, name); ok && !slices.Contains(mods, a.module) {
			mods = append(mods, a.module)
		}
	}
	return mods, false
}

// appendOrder adds module m's files after everything it needs.
func (x *Index) appendOrder(order *[]Load, seen map[string]bool, m string, optional bool) {
	if seen[m] {
		return
	}
	seen[m] = true
	file, ok := x.files[m]
	if !ok {
		return // built in: nothing to load
	}
	// A soft dependency may be an alias ("crc32c"); one that resolves to
	// nothing is not an error, as for modprobe.
	for _, pre := range x.softPre[m] {
		mods, _ := x.lookup(pre)
		for _, p := range mods {
			x.appendOrder(order, seen, p, true)
		}
	}
	// modules.dep lists every dependency, nearest first, so the farthest
	// loads first.
	deps := x.deps[m]
	for i := len(deps) - 1; i >= 0; i-- {
		x.appendOrder(order, seen, ModuleName(deps[i]), optional)
	}
	*order = append(*order, Load{File: file, Optional: optional})
}
