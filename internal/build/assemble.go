package build

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/klpmod"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// Errors a caller can test for with errors.Is.
var (
	// ErrRunPre means the pre-fix code is not the target kernel's code:
	// the build environment is not the one that built this kernel.
	ErrRunPre = errors.New("run-pre matching failed")
	// ErrUnpatchable means the fix changes something a livepatch cannot
	// carry; the error lists each reason.
	ErrUnpatchable = errors.New("fix cannot be live-patched")
	// ErrNothing means the fix changes no function's code.
	ErrNothing = errors.New("fix changes no code")
)

// Target is the kernel a patch is built for, as the build needs to see it.
type Target interface {
	Release() string
	BuildID() string
	// Exported returns the object ("vmlinux" or a module) that exports
	// name, if the kernel exports it.
	Exported(name string) (object string, ok bool)
	// Sympos returns the position livepatch needs to find symbol name of
	// object: 0 when the name is unique there. Duplicates are told apart
	// by their code (pre, the pre-fix code, if not nil), then by near,
	// the names of other symbols of the same source file.
	Sympos(object, name string, near []string, pre CodeMatcher) (int, error)
	// Code returns the bytes of function name of object in the target,
	// possibly followed by alignment padding.
	Code(object, name string, sympos int) ([]byte, error)
	// Defines reports whether object has a symbol called name.
	Defines(object, name string) bool
	// Layout is the kernel's special-section layout.
	Layout() *layout.Layout
}

// compiled is one object of the fix: compiled before and after, diffed,
// and located in the target.
type compiled struct {
	Source string // e.g. fs/proc/cmdline.c
	Object string // klp object: vmlinux or a module
	Pre    []byte
	Post   []byte
	Diff   *objdiff.Result
	Funcs  []string // the functions the pre-fix object defines
}

// assemble checks the compiled objects against the target (run-pre),
// writes the diff objects and the registration into dir, links the module
// and returns it with its manifest.
func assemble(ctx context.Context, headers, dir, name string, replace bool, fixes []*Fix, objs []compiled, t Target, progress io.Writer) (string, *contract.Manifest, error) {
	var problems []string
	for _, c := range objs {
		for _, p := range c.Diff.Unsafe {
			problems = append(problems, fmt.Sprintf("%s: %s: %s", c.Source, p.Symbol, p.Reason))
		}
	}
	if len(problems) > 0 {
		return "", nil, fmt.Errorf("%w:\n  %s", ErrUnpatchable, strings.Join(problems, "\n  "))
	}

	m := &contract.Manifest{
		Version: contract.ManifestVersion, Name: name, Module: name + ".ko",
		Kernel:  contract.KernelID{Release: t.Release(), BuildID: t.BuildID()},
		Built:   time.Now().UTC().Format(time.RFC3339),
		Replace: replace,
	}
	for _, f := range fixes {
		m.Fixes = append(m.Fixes, f.Fix)
		m.CVEs = appendMissing(m.CVEs, f.CVEs...)
		if m.Description == "" {
			m.Description = f.Description
		}
	}

	mod := &klpmod.Module{Name: name, Description: m.Description, Replace: replace}
	hooks := map[string]*klpmod.HookObject{} // by klp object
	manifestObjs := map[string]*contract.Object{}
	var order []string
	for i, c := range objs {
		if len(c.Diff.Changed) == 0 {
			continue
		}
		near := definedFuncs(c.Diff)
		in := &klpmod.ObjectInput{Object: c.Object, Post: c.Post, Layout: t.Layout(), Resolve: resolver(t, c, near)}
		for _, d := range c.Diff.NewData {
			in.NewData = append(in.NewData, d.Name)
		}
		for _, fn := range c.Diff.New {
			in.Funcs = append(in.Funcs, klpmod.Func{Name: fn.Name, New: true})
		}
		type patched struct {
			name   string // in the kernel
			post   string // in the post object
			sympos int
			fp     fingerprint.Fingerprint
		}
		var fns []patched
		for _, fn := range c.Diff.Changed {
			old := fn.Name
			if fn.PreName != "" {
				old = fn.PreName
			}
			if strings.Contains(old, ".cold") || !t.Defines(c.Object, old) {
				// A .cold part is entered only from its function, which
				// changed too; a function the kernel inlined into all
				// its callers changed them too. Either way: carry it for
				// them, there is nothing to redirect.
				in.Funcs = append(in.Funcs, klpmod.Func{Name: fn.Name, New: true})
				continue
			}
			pos, fp, err := runPre(t, c, old, near)
			if err != nil {
				return "", nil, err
			}
			in.Funcs = append(in.Funcs, klpmod.Func{Name: fn.Name, Sympos: pos})
			fns = append(fns, patched{old, fn.Name, pos, fp})
		}
		diffObj, alias, err := klpmod.WriteObject(in, fmt.Sprintf("__stitch_fn_%d_", i))
		if err != nil {
			return "", nil, fmt.Errorf("%s: %w", c.Source, err)
		}
		mod.DiffObjects = append(mod.DiffObjects, diffObj)
		if hooks[c.Object] == nil {
			hooks[c.Object] = &klpmod.HookObject{Name: c.Object}
			manifestObjs[c.Object] = &contract.Object{Name: c.Object}
			order = append(order, c.Object)
		}
		h, mo := hooks[c.Object], manifestObjs[c.Object]
		for _, f := range fns {
			h.Funcs = append(h.Funcs, klpmod.HookFunc{OldName: f.name, Sympos: f.sympos, Alias: alias[f.post]})
			mo.Functions = append(mo.Functions, contract.Function{Name: f.name, Sympos: f.sympos, Fingerprint: f.fp})
		}
	}
	if len(mod.DiffObjects) == 0 {
		return "", nil, ErrNothing
	}
	sort.Strings(order)
	for _, o := range order {
		mod.Objects = append(mod.Objects, *hooks[o])
		m.Objects = append(m.Objects, *manifestObjs[o])
	}

	if err := klpmod.Generate(dir, mod); err != nil {
		return "", nil, err
	}
	ko, _, err := klpmod.Link(ctx, headers, dir, name, nil, progress)
	if err != nil {
		return "", nil, err
	}
	b, err := os.ReadFile(ko)
	if err != nil {
		return "", nil, err
	}
	sum := sha256.Sum256(b)
	m.ModuleHash = hex.EncodeToString(sum[:])
	m.Module = filepath.Base(ko)
	return ko, m, nil
}

// runPre finds a changed function in the target by its pre-fix code
// (which of several of its name has it) and checks that code is the
// target's: it returns the function's sympos and fingerprint.
func runPre(t Target, c compiled, fn string, near []string) (int, fingerprint.Fingerprint, error) {
	fp, err := fingerprint.FromObject(c.Pre, fn, t.Layout())
	if err != nil {
		return 0, fp, fmt.Errorf("%s: fingerprint %s: %w", c.Source, fn, err)
	}
	sympos, err := t.Sympos(c.Object, fn, near, fp)
	if err != nil {
		return 0, fp, fmt.Errorf("%s: locate %s in %s: %w", c.Source, fn, c.Object, err)
	}
	code, err := t.Code(c.Object, fn, sympos)
	if err != nil {
		return 0, fp, fmt.Errorf("%w: %s: %s not found in %s: %v", ErrRunPre, c.Source, fn, c.Object, err)
	}
	if err := fp.MatchPadded(code); err != nil {
		return 0, fp, fmt.Errorf("%w: %s: %s in %s: %v (the source, config or compiler is not the one that built this kernel)", ErrRunPre, c.Source, fn, c.Object, err)
	}
	return sympos, fp, nil
}

// preCode is the pre-fix code of a function the patch refers to, for
// telling duplicates of its name apart; fingerprinted on first use, as
// most names are unique and need no code.
type preCode struct {
	raw    []byte
	name   string
	layout *layout.Layout
	fp     *fingerprint.Fingerprint
}

func (p *preCode) MatchPadded(code []byte) error {
	if p.fp == nil {
		fp, err := fingerprint.FromObject(p.raw, p.name, p.layout)
		if err != nil {
			return fmt.Errorf("fingerprint %s: %w", p.name, err)
		}
		p.fp = &fp
	}
	return p.fp.MatchPadded(code)
}

// resolver tells klpmod how to reach a symbol the patch does not carry:
// through the module loader if the kernel exports it (and it does not
// belong to the patched module itself, which may load after the patch),
// else through a klp relocation to the object that defines it.
func resolver(t Target, c compiled, near []string) klpmod.Resolver {
	object := c.Object
	return func(name string, local bool) (klpmod.Ref, error) {
		if !local {
			if exp, ok := t.Exported(name); ok && (object == "vmlinux" || exp != object) {
				return klpmod.Ref{Exported: true}, nil
			}
		}
		owner := object
		if !local && object != "vmlinux" && !t.Defines(object, name) {
			owner = "vmlinux" // an external of a module: the kernel's
		}
		if local && !t.Defines(object, name) {
			// A static function the kernel's build inlined everywhere:
			// the patch needs its own copy.
			return klpmod.Ref{Carry: true}, nil
		}
		// A function of this object: its code in the pre-fix object
		// tells which of several of its name it is.
		var pre CodeMatcher
		if owner == object && slices.Contains(c.Funcs, name) {
			pre = &preCode{raw: c.Pre, name: name, layout: t.Layout()}
		}
		pos, err := t.Sympos(owner, name, near, pre)
		if err != nil {
			return klpmod.Ref{}, fmt.Errorf("locate %s in %s: %w", name, owner, err)
		}
		return klpmod.Ref{Object: owner, Sympos: pos}, nil
	}
}

// definedFuncs names the object's functions the diff saw, so that
// duplicates of a local name can be told apart by their neighbours.
func definedFuncs(d *objdiff.Result) []string {
	var near []string
	for _, f := range d.Changed {
		near = append(near, f.Name)
		for _, r := range f.Refs {
			if r.Defined && r.Func && !r.New {
				near = append(near, r.Name)
			}
		}
	}
	return near
}
