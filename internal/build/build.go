package build

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/kbuild"
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
	Replace  bool
	Level    *contract.Level
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

	var objs []compiled
	var same []string // sources whose objects did not change
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
		d := objdiff.Diff(pre, post, loc.Layout())
		done()
		if len(d.Changed) == 0 {
			if len(d.Unsafe) > 0 {
				objs = append(objs, compiled{Source: p.Source, Diff: d}) // for its refusals
			} else if len(d.New) > 0 {
				same = append(same, p.Source+" (only adds functions nothing in it calls)")
			} else {
				same = append(same, p.Source)
			}
			continue
		}
		done = step("locate", p.Source)
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
		// An object linked into several modules is patched in each.
		for _, object := range objects {
			objs = append(objs, compiled{Source: p.Source, Object: object, Pre: p.Pre, Post: p.Post, Diff: d, Funcs: funcs})
		}
	}
	if len(objs) == 0 {
		if len(same) == 0 {
			same = []string{"the sources the fixes touch"}
		}
		return nil, fmt.Errorf("%w: %s compile to the same functions before and after the fix in this kernel's configuration (the changed lines are compiled out, or do not change code): this kernel needs no patch for it", ErrNothing, strings.Join(same, ", "))
	}

	done = step("module", name)
	dir := filepath.Join(work, "module")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ko, m, err := assemble(ctx, src.Headers(), dir, name, o.Replace, fixes, objs, loc, nil)
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
	res := &Result{Module: filepath.Join(o.Out, filepath.Base(ko)), ManifestPath: filepath.Join(o.Out, name+".json"), Manifest: m}
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
