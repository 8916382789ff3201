package build

import (
	"bytes"
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
	// Statics names object's data symbols that are base plus
	// compiler-made numbers (xstats.0, xstats.3 for xstats).
	Statics(object, base string) []string
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
	// Kit is what the post-fix object declares with the fix author's
	// kit (kpatch-style callbacks, shadow variables), if anything.
	Kit *klpmod.Kit
	// Export are symbols new in the fix that this object defines and
	// other objects of the fix use: the patch module carries them, and
	// the others reach them inside it.
	Export []string
}

// assemble checks the compiled objects against the target (run-pre),
// writes the diff objects and the registration into dir, links the module
// and returns it with its manifest. What it decided on its own on the way
// goes into decided, if not nil.
func assemble(ctx context.Context, headers, dir, name string, replace bool, fixes []*Fix, objs []compiled, t Target, hooks *Hooks, progress io.Writer, decided *Decisions) (string, *contract.Manifest, error) {
	// The hooks are compiled first: what they declare (callbacks, data
	// they update) decides what the registration holds and what the
	// fix may change.
	var ch *klpmod.CompiledHooks
	if hooks != nil {
		var err error
		if ch, err = klpmod.CompileHooks(ctx, headers, dir, name, hooks.Source, progress); err != nil {
			return "", nil, fmt.Errorf("%w: %s: %w", ErrUnpatchable, hooks.Name, err)
		}
	}
	internal := map[string]bool{}
	for _, c := range objs {
		for _, n := range c.Export {
			internal[n] = true
		}
	}
	var problems []string
	for _, c := range objs {
		for _, p := range c.Diff.Unsafe {
			if redirected(ch, p) {
				continue // the hooks re-point the data (STITCH_REDIRECTS)
			}
			if builtinExit(c, p) {
				if progress != nil {
					fmt.Fprintf(progress, "%s: %s: built-in __exit code that no code calls: vmlinux never runs it, so its change needs nothing live\n", c.Source, p.Symbol)
				}
				continue
			}
			if ch != nil {
				carried, err := initCarried(c, p, ch.Carries)
				if err != nil {
					return "", nil, err
				}
				if carried {
					continue
				}
			}
			if ch != nil && slices.Contains(ch.Updates, p.Symbol) {
				if err := updatable(c, p); err != nil {
					problems = append(problems, fmt.Sprintf("%s: %s: the hooks update it in place (STITCH_UPDATES_DATA), but %v", c.Source, p.Symbol, err))
				}
				continue
			}
			problems = append(problems, fmt.Sprintf("%s: %s: %s", c.Source, p.Symbol, p.Reason))
		}
	}
	problems = append(problems, unusedRedirects(ch, objs)...)
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
	regs := map[string]*klpmod.HookObject{} // by klp object
	manifestObjs := map[string]*contract.Object{}
	var order []string
	object := func(name string) (*klpmod.HookObject, *contract.Object) {
		if regs[name] == nil {
			regs[name] = &klpmod.HookObject{Name: name, Callbacks: map[string]string{}}
			manifestObjs[name] = &contract.Object{Name: name, Functions: []contract.Function{}}
			order = append(order, name)
		}
		return regs[name], manifestObjs[name]
	}
	cbs := callbacks{}
	for i, c := range objs {
		if len(c.Diff.Changed) == 0 && len(c.Export) == 0 && (c.Kit == nil || len(c.Kit.Callbacks) == 0) {
			continue
		}
		near := definedFuncs(c.Diff)
		in := &klpmod.ObjectInput{
			Object: c.Object, Post: c.Post, Layout: t.Layout(), Resolve: resolver(t, c, near, internal),
			Export: c.Export, PreNames: c.Diff.Renamed,
		}
		for _, d := range c.Diff.NewData {
			if klpmod.KitSection(d.Section) {
				continue // the kit's records: read here, not carried
			}
			in.NewData = append(in.NewData, d.Name)
		}
		var kitCallbacks []klpmod.Callback
		if c.Kit != nil {
			kitCallbacks = c.Kit.Callbacks
			mod.Shadows = appendMissing(mod.Shadows, c.Kit.Shadows...)
		}
		for _, cb := range kitCallbacks {
			in.Funcs = append(in.Funcs, klpmod.Func{Name: cb.Func, New: true, Entry: true})
		}
		for _, fn := range c.Diff.New {
			if initSection(fn.Section) {
				continue // new init/exit code: carried by the hooks, or refused above
			}
			in.Funcs = append(in.Funcs, newFunc(ch, fn))
		}
		type patched struct {
			name   string // in the kernel
			post   string // in the post object
			sympos int
			fp     fingerprint.Fingerprint
		}
		var fns []patched
		for _, fn := range c.Diff.Changed {
			if initSection(fn.Section) {
				// Carried by the hooks (STITCH_CARRIES_INIT), or the
				// build was refused above: nothing to redirect.
				continue
			}
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
		w, err := klpmod.Write(in, fmt.Sprintf("__stitch_fn_%d_", i))
		if err != nil {
			return "", nil, fmt.Errorf("%s: %w", c.Source, err)
		}
		diffObj, alias := w.Object, w.Alias
		if decided != nil {
			decided.StaticBranches = append(decided.StaticBranches, w.Branches...)
		}
		mod.DiffObjects = append(mod.DiffObjects, diffObj)
		// Only new code that reaches nothing of its object's through
		// klp relocations needs no klp_object (callbacks, if any,
		// register theirs below).
		if len(fns) > 0 || bytes.Contains(diffObj, []byte(klpmod.KlpSymPrefix+c.Object+".")) {
			h, mo := object(c.Object)
			mo.Notrace = append(mo.Notrace, notraceReport(c.Diff)...)
			for _, f := range fns {
				h.Funcs = append(h.Funcs, klpmod.HookFunc{OldName: f.name, Sympos: f.sympos, Alias: alias[f.post]})
				mo.Functions = append(mo.Functions, contract.Function{Name: f.name, Sympos: f.sympos, Fingerprint: f.fp})
			}
		}
		for _, cb := range kitCallbacks {
			obj := cb.Object
			if obj == "" {
				obj = c.Object // kpatch's: the object the file is linked into
			}
			if err := cbs.add(obj, cb.Kind, alias[cb.Func], fmt.Sprintf("%s in %s", cb.Func, c.Source)); err != nil {
				return "", nil, err
			}
		}
	}
	var rename map[string]string
	if ch != nil {
		mod.Hooks = hooks.Source
		mod.Shadows = appendMissing(mod.Shadows, ch.Shadows...)
		m.Hooks = &contract.Hooks{Name: hooks.Name, Hash: hooks.Hash}
		for _, cb := range ch.Callbacks {
			if err := checkObject(t, cb.Object); err != nil {
				return "", nil, fmt.Errorf("%w: %s: %s callback %s: %w", ErrUnpatchable, hooks.Name, cb.Kind, cb.Func, err)
			}
			if err := cbs.add(cb.Object, cb.Kind, cb.Func, fmt.Sprintf("%s in %s", cb.Func, hooks.Name)); err != nil {
				return "", nil, err
			}
		}
	}
	for _, k := range sortedKeys(cbs) {
		h, mo := object(k.object)
		h.Callbacks[k.kind] = cbs[k].fn
		mo.Callbacks = append(mo.Callbacks, k.kind)
	}
	if ch != nil {
		var err error
		if rename, err = resolveHooks(t, ch, order); err != nil {
			return "", nil, fmt.Errorf("%w: %s: %w", ErrUnpatchable, hooks.Name, err)
		}
	}
	if len(mod.DiffObjects) == 0 && len(cbs) == 0 {
		return "", nil, ErrNothing
	}
	sort.Strings(order)
	for _, o := range order {
		mod.Objects = append(mod.Objects, *regs[o])
		m.Objects = append(m.Objects, *manifestObjs[o])
	}
	if len(mod.Shadows) > 0 && !slices.Contains(order, "vmlinux") {
		// The registration adds vmlinux for the shadow variables' release.
		m.Objects = append([]contract.Object{{Name: "vmlinux", Callbacks: []string{klpmod.PostUnpatch}}}, m.Objects...)
	} else if len(mod.Shadows) > 0 {
		for i := range m.Objects {
			if m.Objects[i].Name == "vmlinux" && !slices.Contains(m.Objects[i].Callbacks, klpmod.PostUnpatch) {
				m.Objects[i].Callbacks = append(m.Objects[i].Callbacks, klpmod.PostUnpatch)
			}
		}
	}

	if err := klpmod.Generate(dir, mod); err != nil {
		return "", nil, err
	}
	ko, _, err := klpmod.Link(ctx, headers, dir, name, rename, progress)
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
func resolver(t Target, c compiled, near []string, internal map[string]bool) klpmod.Resolver {
	object := c.Object
	return func(name string, local bool) (klpmod.Ref, error) {
		if !local && internal[name] {
			return klpmod.Ref{Internal: true}, nil
		}
		if !local {
			if exp, ok := t.Exported(name); ok && (object == "vmlinux" || exp != object) {
				return klpmod.Ref{Exported: true}, nil
			}
		}
		owner := object
		if !local && object != "vmlinux" && !t.Defines(object, name) {
			owner = "vmlinux" // an external of a module: the kernel's
		}
		target := name
		if local && !t.Defines(object, name) {
			var err error
			if target, err = renumberedStatic(t, object, name); err != nil {
				return klpmod.Ref{}, err
			}
			if target == "" {
				// A static function the kernel's build inlined
				// everywhere: the patch needs its own copy.
				return klpmod.Ref{Carry: true}, nil
			}
		}
		// A function of this object: its code in the pre-fix object
		// tells which of several of its name it is.
		var pre CodeMatcher
		if owner == object && slices.Contains(c.Funcs, name) {
			pre = &preCode{raw: c.Pre, name: name, layout: t.Layout()}
		}
		pos, err := t.Sympos(owner, target, near, pre)
		if err != nil {
			return klpmod.Ref{}, fmt.Errorf("locate %s in %s: %w", target, owner, err)
		}
		ref := klpmod.Ref{Object: owner, Sympos: pos}
		if target != name {
			ref.Name = target
		}
		return ref, nil
	}
}

// renumberedStatic finds in object the function-local static that the
// pre-fix object calls name (xstats.0) when the target numbered it
// otherwise: the only data symbol of object with that base name. It
// returns "" when there is none, and an error when there are several:
// nothing in a symbol table says which function each belongs to.
func renumberedStatic(t Target, object, name string) (string, error) {
	base := objdiff.BaseName(name)
	if base == name {
		return "", nil
	}
	switch cands := t.Statics(object, base); len(cands) {
	case 0:
		return "", nil
	case 1:
		return cands[0], nil
	default:
		return "", fmt.Errorf("%w: the pre-fix object's static %s is not in %s under that name, and %s has %d statics named %s (%s): which one the fix's code uses cannot be told (was the kernel built by another compiler or from other source?)", ErrNoSymbol, name, object, object, len(cands), base, strings.Join(head(cands, 6), ", "))
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
