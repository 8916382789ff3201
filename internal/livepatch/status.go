// Package livepatch drives the running kernel's livepatch interface
// (Documentation/livepatch/livepatch.rst): it loads and unloads livepatch
// modules, follows the per-task transition through /sys/kernel/livepatch
// and /proc/<pid>/patch_state, names the tasks that hold a transition up,
// rolls a stalled transition back, and reports the kernel's patch state.
package livepatch

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kmod"
)

// Kernel is the running kernel, seen through its pseudo filesystems.
type Kernel struct {
	// Root prefixes /sys and /proc; empty means the real ones. Tests point
	// it at a captured copy.
	Root   string
	Logger *slog.Logger
	// Poll is how often a transition's state is read; 100ms if zero.
	Poll time.Duration
	// finit loads a module from its open file; finit_module(2) when nil.
	// Unit tests stand in for the kernel's loader here.
	finit func(*os.File) error
}

// Status is the kernel's livepatch state, as `stitch status` reports it.
type Status struct {
	Release   string  `json:"release"`
	BuildID   string  `json:"build_id"` // GNU build-id of the running kernel image
	Livepatch bool    `json:"livepatch_supported"`
	Patches   []Patch `json:"patches"`
	Taint     Taint   `json:"taint"`
	// Signing is the kernel's module signature policy; nil if /proc/keys
	// could not be read.
	Signing *Signing `json:"module_signing,omitempty"`
}

// Patch is one entry of /sys/kernel/livepatch.
type Patch struct {
	Name       string   `json:"name"`
	Enabled    bool     `json:"enabled"`
	Transition bool     `json:"transition"`
	Replace    bool     `json:"replace"`
	Objects    []Object `json:"objects"`
}

// Object is a patched object: "vmlinux" or a module name.
type Object struct {
	Name string `json:"name"`
	// Patched is whether the object is loaded and its functions are
	// redirected; a module that is not loaded yet is not patched.
	Patched   bool       `json:"patched"`
	Functions []Function `json:"functions"`
}

// Function is a patched function; Sympos tells duplicates of a local
// name apart (0: the name is unique in its object).
type Function struct {
	Name   string `json:"name"`
	Sympos int    `json:"sympos"`
}

func (k *Kernel) path(p string) string     { return filepath.Join(k.Root, p) }
func (k *Kernel) klpDir() string           { return k.path("/sys/kernel/livepatch") }
func (k *Kernel) patchDir(n string) string { return filepath.Join(k.klpDir(), n) }

// moduleLoaded says whether the kernel has a module of that name loaded,
// whatever became of its patch.
func (k *Kernel) moduleLoaded(name string) bool {
	_, err := os.Stat(k.path("/sys/module/" + name))
	return err == nil
}

// Supported reports whether the kernel has livepatch support.
func (k *Kernel) Supported() error {
	if fi, err := os.Stat(k.klpDir()); err != nil || !fi.IsDir() {
		return fmt.Errorf("%w: %s does not exist (kernel built without CONFIG_LIVEPATCH, or sysfs not mounted)", ErrUnsupported, k.klpDir())
	}
	return nil
}

// Release returns the running kernel's release, as uname -r prints it.
func Release() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// BuildID returns the running kernel's GNU build-id, from
// /sys/kernel/notes: what a patch's manifest must name.
func (k *Kernel) BuildID() (string, error) {
	notes, err := os.ReadFile(k.path("/sys/kernel/notes"))
	if err != nil {
		return "", fmt.Errorf("read kernel build-id: %w", err)
	}
	id, err := kmod.BuildID(notes)
	if err != nil {
		return "", fmt.Errorf("read kernel build-id from %s: %w", k.path("/sys/kernel/notes"), err)
	}
	return id, nil
}

// Status reads the whole livepatch state.
func (k *Kernel) Status() (*Status, error) {
	st := &Status{Patches: []Patch{}}
	var err error
	if st.Release, err = Release(); err != nil {
		return nil, err
	}
	if st.Taint, err = k.Taint(); err != nil {
		return nil, err
	}
	if st.BuildID, err = k.BuildID(); err != nil {
		return nil, err
	}
	st.Signing, _ = k.Signing()
	if k.Supported() != nil {
		return st, nil
	}
	st.Livepatch = true
	ents, err := os.ReadDir(k.klpDir())
	if err != nil {
		return nil, fmt.Errorf("read livepatch state: %w", err)
	}
	for _, e := range ents {
		p, err := k.Patch(e.Name())
		if errors.Is(err, ErrUnknownPatch) {
			continue // removed while we looked
		}
		if err != nil {
			return nil, err
		}
		st.Patches = append(st.Patches, *p)
	}
	return st, nil
}

// Patch reads one patch's state.
func (k *Kernel) Patch(name string) (*Patch, error) {
	dir := k.patchDir(name)
	enabled, err := readBool(filepath.Join(dir, "enabled"))
	if gone(err) {
		return nil, fmt.Errorf("%w: %q (see 'stitch status' for the loaded patches)", ErrUnknownPatch, name)
	}
	if err != nil {
		return nil, err
	}
	p := &Patch{Name: name, Enabled: enabled, Objects: []Object{}}
	if p.Transition, err = readBool(filepath.Join(dir, "transition")); err != nil && !gone(err) {
		return nil, err
	}
	p.Replace, _ = readBool(filepath.Join(dir, "replace")) // absent before 5.x

	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read patch %s: %w", name, err)
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		obj := Object{Name: e.Name(), Functions: []Function{}}
		objDir := filepath.Join(dir, e.Name())
		obj.Patched, _ = readBool(filepath.Join(objDir, "patched"))
		fns, err := os.ReadDir(objDir)
		if err != nil {
			continue // the patch is going away
		}
		for _, f := range fns {
			if !f.IsDir() {
				continue
			}
			// Function directories are "<name>,<sympos>".
			fn, pos, _ := strings.Cut(f.Name(), ",")
			n, _ := strconv.Atoi(pos)
			obj.Functions = append(obj.Functions, Function{Name: fn, Sympos: n})
		}
		p.Objects = append(p.Objects, obj)
	}
	return p, nil
}

// inTransition returns the name of the patch in transition, if any: the
// kernel runs one transition at a time.
func (k *Kernel) inTransition() (string, error) {
	ents, err := os.ReadDir(k.klpDir())
	if err != nil {
		return "", fmt.Errorf("read livepatch state: %w", err)
	}
	for _, e := range ents {
		if on, err := readBool(filepath.Join(k.klpDir(), e.Name(), "transition")); err == nil && on {
			return e.Name(), nil
		}
	}
	return "", nil
}

// gone tells a read of a sysfs file that failed because its kobject is
// gone: ENOENT once it is, ENODEV while the kernel removes it (a patch
// freed at the end of its reverse transition).
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENODEV)
}

func readBool(path string) (bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	switch strings.TrimSpace(string(b)) {
	case "1":
		return true, nil
	case "0":
		return false, nil
	}
	return false, fmt.Errorf("%s: unexpected content %q", path, b)
}

// Taint is /proc/sys/kernel/tainted, decoded.
type Taint struct {
	Value uint64      `json:"value"`
	Flags []TaintFlag `json:"flags"`
}

// TaintFlag is one set taint bit, named as in Documentation/admin-guide/tainted-kernels.rst.
type TaintFlag struct {
	Bit    int    `json:"bit"`
	Letter string `json:"letter"`
	Means  string `json:"means"`
	// Relevant marks the flags that matter to live patching: the ones a
	// patch sets (K, O, E) and the ones that tell of trouble after it (W, D, L).
	Relevant bool `json:"relevant"`
}

var taintFlags = [...]struct{ letter, means string }{
	{"P", "proprietary module loaded"},
	{"F", "module force-loaded"},
	{"S", "kernel running on an out-of-specification system"},
	{"R", "module force-unloaded"},
	{"M", "machine check exception"},
	{"B", "bad page referenced"},
	{"U", "taint requested by user space"},
	{"D", "kernel died recently (oops or BUG)"},
	{"A", "ACPI table overridden"},
	{"W", "kernel issued a warning"},
	{"C", "staging driver loaded"},
	{"I", "platform firmware bug worked around"},
	{"O", "out-of-tree module loaded"},
	{"E", "unsigned module loaded"},
	{"L", "soft lockup occurred"},
	{"K", "kernel has been live patched"},
	{"X", "auxiliary taint (distribution-defined)"},
	{"T", "built with struct randomization plugin"},
	{"N", "in-kernel test has been run"},
}

// Taint reads the kernel's taint flags.
func (k *Kernel) Taint() (Taint, error) {
	b, err := os.ReadFile(k.path("/proc/sys/kernel/tainted"))
	if err != nil {
		return Taint{}, fmt.Errorf("read taint: %w", err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return Taint{}, fmt.Errorf("read taint: %w", err)
	}
	return DecodeTaint(v), nil
}

// DecodeTaint names the set bits of a taint value.
func DecodeTaint(v uint64) Taint {
	t := Taint{Value: v, Flags: []TaintFlag{}}
	for bit := 0; bit < 64; bit++ {
		if v&(1<<bit) == 0 {
			continue
		}
		f := TaintFlag{Bit: bit, Letter: "?", Means: "unknown taint bit"}
		if bit < len(taintFlags) {
			f.Letter, f.Means = taintFlags[bit].letter, taintFlags[bit].means
		}
		f.Relevant = strings.Contains("KOEWDL", f.Letter)
		t.Flags = append(t.Flags, f)
	}
	return t
}

// String is the kernel's compact form, e.g. "OEK".
func (t Taint) String() string {
	var b strings.Builder
	for _, f := range t.Flags {
		b.WriteString(f.Letter)
	}
	return b.String()
}

// sortedTasks orders tasks by pid for stable reports.
func sortedTasks(ts []Task) []Task {
	sort.Slice(ts, func(i, j int) bool { return ts[i].PID < ts[j].PID })
	return ts
}
