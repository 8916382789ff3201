package build

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// ErrNoSymbol means a symbol the patch needs is not in the target kernel,
// or cannot be told apart from others of its name.
var ErrNoSymbol = errors.New("symbol not in the target kernel")

// Kernel is a target kernel seen from the build machine: its image (with
// the kallsyms tables decoded from it), its modules, and its exports. No
// debug-info package and no running copy are needed.
type Kernel struct {
	release string
	buildID string
	image   *kallsyms.Image
	mods    *kallsyms.Modules
	opened  map[string]*kallsyms.Module
	symvers kbuild.Symvers
	layout  *layout.Layout
}

// OpenKernel reads what the build needs of the kernel of profile p: its
// boot image (decoded; the vmlinux extracted from it is kept in cache),
// its modules, and the exports listed in its headers' Module.symvers.
func OpenKernel(ctx context.Context, p *kernel.Profile, cache string, log *slog.Logger) (*Kernel, error) {
	k := &Kernel{release: p.Release, opened: map[string]*kallsyms.Module{}}
	var err error
	if k.symvers, err = kbuild.ReadSymvers(p.HeadersDir); err != nil {
		return nil, err
	}
	if k.image, err = kallsyms.OpenImage(ctx, p.BootImage, cache, log); err != nil {
		return nil, fmt.Errorf("kernel image %s: %w", p.BootImage, err)
	}
	if k.buildID, err = imageBuildID(k.image.Path); err != nil {
		return nil, fmt.Errorf("kernel image %s: %w", p.BootImage, err)
	}
	// The special sections' formats come from the kernel itself: one it
	// cannot tell them for is refused here, before anything is built.
	if k.layout, err = layout.FromVmlinux(k.image.Path); err != nil {
		return nil, fmt.Errorf("kernel image %s: %w", p.BootImage, err)
	}
	k.mods = kallsyms.NewModules(p.Modules, log)
	// Index the modules now, under ctx; the lookups later only read the
	// index and single files.
	if _, err := k.mods.Defining(ctx, ""); err != nil {
		return nil, fmt.Errorf("modules of %s: %w", p.Release, err)
	}
	return k, nil
}

func imageBuildID(vmlinux string) (string, error) {
	f, err := elf.Open(vmlinux)
	if err != nil {
		return "", err
	}
	defer f.Close()
	notes := f.Section(".notes")
	if notes == nil {
		return "", fmt.Errorf("vmlinux has no .notes section")
	}
	d, err := notes.Data()
	if err != nil {
		return "", err
	}
	return kmod.BuildID(d)
}

// Release is the kernel's uname -r.
func (k *Kernel) Release() string { return k.release }

// BuildID is the GNU build-id of the kernel image.
func (k *Kernel) BuildID() string { return k.buildID }

// Layout is the kernel's special-section layout, read from its BTF.
func (k *Kernel) Layout() *layout.Layout { return k.layout }

// Exported tells which object exports name, by its klp object name
// (Module.symvers names a module by its build path, drivers/hv/hv_vmbus).
func (k *Kernel) Exported(name string) (string, bool) {
	e, ok := k.symvers[name]
	if !ok {
		return "", false
	}
	return kmod.ModuleName(e.Module), true
}

// table returns the symbols of object: the image's for vmlinux, the .ko's
// for a module.
func (k *Kernel) table(object string) (*kallsyms.Table, error) {
	if object == kallsyms.Vmlinux {
		return k.image.Table, nil
	}
	m, err := k.module(object)
	if err != nil {
		return nil, err
	}
	return m.Table, nil
}

func (k *Kernel) module(name string) (*kallsyms.Module, error) {
	if m, ok := k.opened[name]; ok {
		return m, nil
	}
	m, err := k.mods.Open(context.Background(), name) // indexed already
	if err != nil {
		return nil, err
	}
	k.opened[name] = m
	return m, nil
}

// Defines tells whether object has a symbol called name.
func (k *Kernel) Defines(object, name string) bool {
	t, err := k.table(object)
	return err == nil && len(t.Lookup(object, name)) > 0
}

// Statics names object's data symbols (not code) whose names are base
// plus compiler-made numbers (xstats.0 for xstats): the candidates for a
// function-local static whose number in the target differs from the
// pre-fix object's.
func (k *Kernel) Statics(object, base string) []string {
	t, err := k.table(object)
	if err != nil {
		return nil
	}
	var out []string
	for _, sy := range t.Symbols() {
		if sy.Object == object && !sy.IsText() && sy.Name != base && strings.HasPrefix(sy.Name, base+".") &&
			objdiff.BaseName(sy.Name) == base && !slices.Contains(out, sy.Name) {
			out = append(out, sy.Name)
		}
	}
	return out
}

// CodeMatcher tells whether code, a function's bytes in the target
// (possibly followed by alignment padding), is the pre-fix code:
// fingerprint.Fingerprint is one. An error that does not wrap
// fingerprint.ErrMismatch means the matcher itself failed.
type CodeMatcher interface {
	MatchPadded(code []byte) error
}

// Sympos finds name in object. When the name repeats, the occurrences
// whose code pre accepts are the candidates (all of them when pre is
// nil: data, or a symbol of another object): the pre-fix code decides.
// Among several candidates, the one nearest to the other symbols of the
// same source file (near) wins: the kernel and its modules were linked
// object file by object file, so a file's symbols sit together.
func (k *Kernel) Sympos(object, name string, near []string, pre CodeMatcher) (int, error) {
	t, err := k.table(object)
	if err != nil {
		return 0, err
	}
	if object != kallsyms.Vmlinux {
		if m, err := k.module(object); err == nil && m.Shadowed(name) {
			return 0, fmt.Errorf("%w: %s in %s also names init code or data of the module, which livepatch counts while the module loads but not after: the reference cannot be resolved reliably", ErrUnpatchable, name, object)
		}
	}
	occ := t.Lookup(object, name)
	switch len(occ) {
	case 0:
		return 0, fmt.Errorf("%w: %s in %s", ErrNoSymbol, name, object)
	case 1:
		return 0, nil
	}
	cands := occ
	if pre != nil {
		if cands, err = k.byCode(object, name, occ, pre); err != nil {
			return 0, err
		}
		if len(cands) == 1 {
			return cands[0].Sympos, nil
		}
	}
	// Where the symbols sit: addresses in vmlinux; for a module, whose
	// addresses are offsets into different sections, positions in its
	// symbol table (a file's local symbols stay together there too).
	where := func(sy kallsyms.Symbol) uint64 { return sy.Addr }
	if object != kallsyms.Vmlinux {
		index := map[kallsyms.Symbol]uint64{}
		for i, sy := range t.Symbols() {
			index[sy] = uint64(i)
		}
		where = func(sy kallsyms.Symbol) uint64 { return index[sy] }
	}
	var anchors []uint64
	for _, n := range near {
		if a := t.Lookup(object, n); len(a) == 1 && n != name {
			anchors = append(anchors, where(a[0]))
		}
	}
	if len(anchors) == 0 {
		if pre != nil {
			return 0, fmt.Errorf("%w: %s is defined %d times in %s, %d of them with the pre-fix code (sympos %s), and nothing else of its file is unique enough to tell which", ErrNoSymbol, name, len(occ), object, len(cands), positions(cands))
		}
		return 0, fmt.Errorf("%w: %s is defined %d times in %s and nothing else of its file is unique enough to tell which", ErrNoSymbol, name, len(occ), object)
	}
	best, bestDist := 0, ^uint64(0)
	for _, sy := range cands {
		for _, a := range anchors {
			w := where(sy)
			if d := max(w, a) - min(w, a); d < bestDist {
				best, bestDist = sy.Sympos, d
			}
		}
	}
	return best, nil
}

// byCode returns the occurrences of name whose code pre accepts; none is
// a run-pre failure that says why each differs.
func (k *Kernel) byCode(object, name string, occ []kallsyms.Symbol, pre CodeMatcher) ([]kallsyms.Symbol, error) {
	var match []kallsyms.Symbol
	var why []string
	for _, sy := range occ {
		code, err := k.Code(object, name, sy.Sympos)
		if err == nil {
			err = pre.MatchPadded(code)
			if err != nil && !errors.Is(err, fingerprint.ErrMismatch) {
				return nil, fmt.Errorf("pre-fix code of %s: %w", name, err)
			}
		}
		if err != nil {
			why = append(why, fmt.Sprintf("sympos %d: %v", sy.Sympos, err))
			continue
		}
		match = append(match, sy)
	}
	if len(match) == 0 {
		return nil, fmt.Errorf("%w: %s is defined %d times in %s and none has the pre-fix code (%s)", ErrRunPre, name, len(occ), object, strings.Join(why, "; "))
	}
	return match, nil
}

func positions(syms []kallsyms.Symbol) string {
	var p []string
	for _, sy := range syms {
		p = append(p, strconv.Itoa(sy.Sympos))
	}
	return strings.Join(p, ", ")
}

// Code returns a function's bytes in the target before boot-time
// rewriting: from the image for vmlinux (up to the next symbol, so
// possibly with alignment padding), or from the module's object file.
func (k *Kernel) Code(object, name string, sympos int) ([]byte, error) {
	if object == kallsyms.Vmlinux {
		b, _, err := k.image.Bytes(name, sympos)
		return b, err
	}
	m, err := k.module(object)
	if err != nil {
		return nil, err
	}
	b, _, err := m.Bytes(name, sympos)
	return b, err
}

// ErrNotInKernel means a compiled object is not where kbuild's facts put
// it in the target kernel: the tree is not configured like the kernel,
// or the object is not linked into it (a library member nothing uses).
var ErrNotInKernel = errors.New("object not in the target kernel")

// Locate tells which objects of the kernel (vmlinux, or modules) hold
// the code of a compiled object, from what kbuild recorded when it
// compiled it, and checks that against the kernel: each module must be
// one of the kernel's, and some of funcs (the functions the object
// defines) must be in each object found. Function names decide nothing
// here: a static name may be defined by many objects.
func (k *Kernel) Locate(f kbuild.ObjectFacts, funcs []string) ([]string, error) {
	ctx := context.Background() // the modules are indexed already
	for _, n := range f.ModNames {
		p, err := k.mods.Path(ctx, n)
		switch {
		case !f.Module && err == nil && f.ModFile != "" && strings.HasSuffix(p, "/"+f.ModFile+".ko"):
			return nil, fmt.Errorf("%w: %s, but the kernel has that code as module %s (%s): the tree is not configured like this kernel", ErrNotInKernel, f, n, p)
		case f.Module && err != nil:
			if p, ok, _ := k.mods.Builtin(ctx, n); ok {
				return nil, fmt.Errorf("%w: %s, but the kernel has %s built in (%s in modules.builtin): the tree is not configured like this kernel", ErrNotInKernel, f, n, p)
			}
			return nil, fmt.Errorf("%w: %s, but %v", ErrNotInKernel, f, err)
		}
	}
	objs := f.Objects()
	for _, o := range objs {
		if err := k.holds(o, f, funcs); err != nil {
			return nil, err
		}
	}
	return objs, nil
}

// holds checks that object has at least one of funcs as a function.
func (k *Kernel) holds(object string, f kbuild.ObjectFacts, funcs []string) error {
	if len(funcs) == 0 {
		return nil
	}
	t, err := k.table(object)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrNotInKernel, f, err)
	}
	for _, fn := range funcs {
		for _, sy := range t.Lookup(object, fn) {
			if sy.IsText() {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: %s, but none of its %d functions (%s) is in %s: it is not linked into this kernel", ErrNotInKernel, f, len(funcs), strings.Join(head(funcs, 5), ", "), object)
}
