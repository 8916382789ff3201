package build

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/klpmod"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// Step is a progress report: one step of the build started or ended.
type Step struct {
	Name    string        `json:"step"`
	Detail  string        `json:"detail,omitempty"`
	Done    bool          `json:"done"`
	Elapsed time.Duration `json:"elapsed_ns,omitempty"`
}

// Source compiles objects of the target kernel's source, before and after
// the fixes. Each pair is one object the fixes touch.
type Source interface {
	Headers() string
	CompilePair(ctx context.Context, fixes []*Fix) ([]Pair, error)
}

// Pair is one object compiled before and after the fixes.
type Pair struct {
	Source    string // source file, relative to the tree
	Pre, Post []byte
	// ViaHeader: the object changed only because a header it includes
	// did; it may not be part of the target kernel at all.
	ViaHeader bool
	// Facts say where kbuild links the object (vmlinux or which
	// modules), as it recorded when compiling it. A Source must give
	// them: where an object lives is not guessed from its names.
	Facts *kbuild.ObjectFacts
}

// Locator tells which objects of the target a compiled object belongs to.
type Locator interface {
	Target
	// Locate returns "vmlinux" or the modules that kbuild's facts name,
	// once checked against the target; funcs are the functions the
	// object defines.
	Locate(facts kbuild.ObjectFacts, funcs []string) ([]string, error)
}

// Options of a build.
type Options struct {
	Out      string // directory for the module and its manifest
	Name     string // module name; derived from the first fix if empty
	Work     string // scratch directory; a temporary one if empty
	KeepWork bool
	// Description and CVEs add to what the fixes' headers say.
	Description string
	CVEs        []string
	// Replace builds a cumulative patch (klp_patch.replace); Level, a
	// level of a patch stream, which is one, named by the level.
	Replace bool
	Level   *contract.Level
	// Hooks is the path of the fix author's hooks file (C, with
	// stitch/hooks.h), compiled into the module; none if empty.
	Hooks    string
	Progress func(Step)
	Logger   *slog.Logger
}

// Result is a finished build.
type Result struct {
	Module       string             `json:"module"`
	ManifestPath string             `json:"manifest"`
	Manifest     *contract.Manifest `json:"-"`
	Work         string             `json:"work,omitempty"` // kept scratch directory
	// Port is how the fixes fitted the kernel's source (Env.Build).
	Port *kbuild.Port `json:"port,omitempty"`
	// Decisions the build took on its own, for the report.
	Decisions Decisions `json:"decisions"`
}

// Decisions are what the build changed on its own to carry the fixes.
type Decisions struct {
	// StaticBranches are jump labels on keys the kernel does not export,
	// rewritten into tests of the key (docs/build.md).
	StaticBranches []klpmod.StaticBranch `json:"static_branches,omitempty"`
}

// Build turns fixes into a livepatch module for the target.
func Build(ctx context.Context, src Source, loc Locator, fixes []*Fix, o Options) (_ *Result, err error) {
	report := func(s Step) {
		if o.Progress != nil {
			o.Progress(s)
		}
	}
	step := func(name, detail string) func() {
		start := time.Now()
		report(Step{Name: name, Detail: detail})
		return func() { report(Step{Name: name, Detail: detail, Done: true, Elapsed: time.Since(start)}) }
	}
	if len(fixes) == 0 {
		return nil, fmt.Errorf("%w: no fix given", ErrBadFix)
	}
	o.forLevel()
	name := o.Name
	if name == "" {
		name = moduleName(fixes[0])
	}
	// What the manifest will say of the patch is checked before the
	// compiler runs, by the rules the fleet applies.
	if err := contract.CheckLabels(name, o.CVEs); err != nil {
		return nil, err
	}
	for _, f := range fixes {
		if err := f.changesCode(); err != nil {
			return nil, err
		}
	}
	var hooks *Hooks
	if o.Hooks != "" {
		if hooks, err = LoadHooks(o.Hooks); err != nil {
			return nil, err
		}
	}
	work := o.Work
	if work == "" {
		if work, err = os.MkdirTemp("", "stitch-build-"); err != nil {
			return nil, err
		}
	}
	if !o.KeepWork {
		defer os.RemoveAll(work)
	} else {
		defer func() {
			if err != nil {
				err = fmt.Errorf("%w (scratch directory kept: %s)", err, work)
			}
		}()
	}

	done := step("compile", "objects the fixes touch, before and after")
	pairs, err := src.CompilePair(ctx, fixes)
	if err != nil {
		return nil, err
	}
	done()

	type diffed struct {
		p         Pair
		pre, post *elfobj.Object
		d         *objdiff.Result
		kit       *klpmod.Kit
	}
	var ds []diffed
	for _, p := range pairs {
		if p.Facts == nil {
			return nil, fmt.Errorf("%s: %w: the build has no kbuild facts for its object (vmlinux or which module)", p.Source, ErrNotInKernel)
		}
		done := step("diff", p.Source)
		pre, err := elfobj.Parse(p.Pre)
		if err != nil {
			return nil, fmt.Errorf("%s: pre-fix object: %w", p.Source, err)
		}
		post, err := elfobj.Parse(p.Post)
		if err != nil {
			return nil, fmt.Errorf("%s: post-fix object: %w", p.Source, err)
		}
		kit, err := klpmod.FindKit(p.Post)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p.Source, err)
		}
		ds = append(ds, diffed{p, pre, post, objdiff.Diff(pre, post, loc.Layout()), kit})
		done()
		reportNotrace(report, p.Source, ds[len(ds)-1].d)
	}
	posts := make([]*elfobj.Object, len(ds))
	pres := make([]*elfobj.Object, len(ds))
	results := make([]*objdiff.Result, len(ds))
	for i, x := range ds {
		pres[i], posts[i], results[i] = x.pre, x.post, x.d
	}
	exports := newGlobalsUsed(pres, posts, results)

	var objs []compiled
	var same []string // sources whose objects did not change
	for i, x := range ds {
		p, pre, d, kit := x.p, x.pre, x.d, x.kit
		if len(d.Changed) == 0 && len(exports[i]) == 0 && len(kit.Callbacks) == 0 {
			if len(d.Unsafe) > 0 {
				objs = append(objs, compiled{Source: p.Source, Pre: p.Pre, Post: p.Post, Diff: d}) // for its refusals
			} else if len(d.New) > 0 {
				same = append(same, p.Source+" (only adds functions nothing in it calls)")
			} else if len(d.LineOnly) > 0 {
				// The running code keeps the old line numbers in its
				// WARN entries and messages: they name the old source,
				// which is what it runs.
				same = append(same, fmt.Sprintf("%s (only line numbers moved, in %s)", p.Source, strings.Join(d.LineOnly, ", ")))
			} else {
				same = append(same, p.Source)
			}
			continue
		}
		done := step("locate", p.Source)
		funcs := functionsOf(pre)
		objects, err := loc.Locate(*p.Facts, funcs)
		if err != nil && p.ViaHeader {
			done()
			continue // includes the header but is not built into this kernel
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p.Source, err)
		}
		done()
		if len(exports[i]) > 0 && len(objects) > 1 {
			// Its new symbols would be defined once per module.
			return nil, fmt.Errorf("%w: %s defines %s, new in the fix and used by other files of it, but is linked into %d modules (%s): the patch module can carry one copy only; move the new code into the file that uses it", ErrUnpatchable, p.Source, strings.Join(exports[i], ", "), len(objects), strings.Join(objects, ", "))
		}
		// An object linked into several modules is patched in each.
		for _, object := range objects {
			objs = append(objs, compiled{Source: p.Source, Object: object, Pre: p.Pre, Post: p.Post, Diff: d, Funcs: funcs, Kit: kit, Export: exports[i]})
		}
	}
	if len(objs) == 0 && hooks == nil {
		if len(same) == 0 {
			same = []string{"the sources the fixes touch"}
		}
		return nil, fmt.Errorf("%w: %s compile to the same functions before and after the fix in this kernel's configuration (the changed lines are compiled out, do not change code, or only move the lines below them): this kernel needs no patch for it", ErrNothing, strings.Join(same, ", "))
	}

	done = step("module", name)
	dir := filepath.Join(work, "module")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var decided Decisions
	ko, m, err := assemble(ctx, src.Headers(), dir, name, o.Replace, fixes, objs, loc, hooks, nil, &decided)
	if err != nil {
		return nil, err
	}
	done()
	if o.Description != "" {
		m.Description = o.Description
	}
	m.CVEs = appendMissing(m.CVEs, o.CVEs...)
	m.Level = o.Level

	if err := os.MkdirAll(o.Out, 0o755); err != nil {
		return nil, err
	}
	res := &Result{Module: filepath.Join(o.Out, filepath.Base(ko)), ManifestPath: filepath.Join(o.Out, name+".json"), Manifest: m, Decisions: decided}
	b, err := os.ReadFile(ko)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(res.Module, b, 0o644); err != nil {
		return nil, err
	}
	// The manifest goes to fleets: check it by the rules the server and
	// the agent apply before anything is written.
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("manifest of %s: %w", name, err)
	}
	mj, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(res.ManifestPath, append(mj, '\n'), 0o644); err != nil {
		return nil, err
	}
	if o.KeepWork {
		res.Work = work
	}
	return res, nil
}

// forLevel makes a level's build what every level is: a cumulative
// patch named contract.LevelName.
func (o *Options) forLevel() {
	if o.Level != nil {
		o.Name, o.Replace = contract.LevelName(o.Level.Stream, o.Level.Number), true
	}
}

// newGlobalsUsed finds, for each object of the fix, the global symbols
// new in the fix (defined in its post object, in no pre object) that
// another object of the fix uses, directly or through other such
// symbols, starting from the objects whose functions changed. The patch
// module carries them: the running kernel has no copy to link to.
func newGlobalsUsed(pres, posts []*elfobj.Object, ds []*objdiff.Result) [][]string {
	before := map[string]bool{}
	for _, o := range pres {
		for _, s := range o.Symbols {
			if s.Defined() && !s.Local() && s.Name != "" {
				before[s.Name] = true
			}
		}
	}
	defining := map[string]int{} // new global -> object
	for i, d := range ds {
		for _, f := range d.New {
			if !f.Local && !before[f.Name] {
				defining[f.Name] = i
			}
		}
		for _, nd := range d.NewData {
			if !nd.Local && nd.Replaces == "" && !before[nd.Name] {
				defining[nd.Name] = i
			}
		}
	}
	out := make([][]string, len(ds))
	if len(defining) == 0 {
		return out
	}
	needed := map[int]bool{}
	var queue []int
	for i, d := range ds {
		if len(d.Changed) > 0 {
			needed[i] = true
			queue = append(queue, i)
		}
	}
	exported := map[string]bool{}
	for ; len(queue) > 0; queue = queue[1:] {
		i := queue[0]
		for _, s := range posts[i].Symbols {
			j, ok := defining[s.Name]
			if s.Defined() || !ok || j == i || exported[s.Name] {
				continue
			}
			exported[s.Name] = true
			out[j] = append(out[j], s.Name)
			if !needed[j] {
				needed[j] = true
				queue = append(queue, j)
			}
		}
	}
	for i := range out {
		sort.Strings(out[i])
	}
	return out
}

// functionsOf names the functions an object defines.
func functionsOf(o *elfobj.Object) []string {
	var fns []string
	for _, s := range o.Symbols {
		if s != nil && s.Func() && s.Defined() && s.Name != "" {
			fns = append(fns, s.Name)
		}
	}
	return fns
}

var notIdent = regexp.MustCompile(`[^A-Za-z0-9_]+`)

// moduleName derives a module name from a fix: "stitch_" and the fix's
// file name, short enough for the kernel's module name limit.
func moduleName(f *Fix) string {
	base := strings.TrimSuffix(filepath.Base(f.Name), filepath.Ext(f.Name))
	n := "stitch_" + strings.Trim(notIdent.ReplaceAllString(base, "_"), "_")
	if len(n) > 40 {
		n = n[:40]
	}
	return n
}
