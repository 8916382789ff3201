package build

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
)

// Building one fix for many kernels: each kernel in turn, each with its
// own prepared tree (kept in the cache and reused), the fix ported to it
// first. A kernel whose source already contains the fix gets a
// contract.Contained record instead of a module; one the fix does not
// port to is refused with the failing hunk; neither stops the others.

// Outcome is what became of one kernel.
type Outcome string

const (
	OutcomeBuilt     Outcome = "built"          // module and manifest written
	OutcomeContained Outcome = "contained"      // the kernel already has the fixes: NAME.contained.json written
	OutcomeNotPorted Outcome = "does-not-apply" // a fix does not port to this kernel's source
	OutcomeRefused   Outcome = "refused"        // the build refused (unsafe change, run-pre mismatch, no code change)
	OutcomeFailed    Outcome = "failed"         // anything else (no source, compiler, kbuild)
)

// FixPort is how one fix ported to one kernel.
type FixPort struct {
	Fix     string       `json:"fix"`
	Variant string       `json:"variant,omitempty"` // the series variant picked
	Port    *kbuild.Port `json:"port,omitempty"`    // nil when there was no variant for the series
}

// KernelResult is one kernel's part of a many-kernel build.
type KernelResult struct {
	Release   string        `json:"release"`
	Series    string        `json:"series,omitempty"`
	Outcome   Outcome       `json:"result"`
	Ports     []FixPort     `json:"ports,omitempty"`
	Module    string        `json:"module,omitempty"`
	Manifest  string        `json:"manifest,omitempty"`
	Contained string        `json:"contained,omitempty"` // the NAME.contained.json written
	Functions []string      `json:"functions,omitempty"` // patched, as OBJECT:FUNCTION
	Callbacks []string      `json:"callbacks,omitempty"` // klp callbacks, as OBJECT:KIND
	Reason    string        `json:"reason,omitempty"`
	Elapsed   time.Duration `json:"elapsed_ns"`
	// Err is the error of a kernel that was not built or contained.
	Err error `json:"-"`

	// StaticBranches are the jump labels rewritten into tests of their
	// keys (keys the kernel does not export), one line each.
	StaticBranches []string `json:"static_branches,omitempty"`
}

// PortSummary is the port column of a summary table: each fix's port in
// a word or two with its offsets, fuzz or failing hunk.
func (r *KernelResult) PortSummary() string {
	var s []string
	for _, p := range r.Ports {
		word := "no variant"
		switch {
		case p.Port == nil:
		case p.Port.Status == kbuild.PortFails:
			word = "fails" // the reason says which hunk
		default:
			word = p.Port.Summary()
		}
		if len(r.Ports) > 1 {
			word = p.Fix + ": " + word
		}
		s = append(s, word)
	}
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, "; ")
}

// KernelStep is progress of a many-kernel build: kernel Index of Total
// (from 1) reached Step.
type KernelStep struct {
	Index, Total int
	Release      string
	Step
}

// ManyOptions of a many-kernel build.
type ManyOptions struct {
	// Options of each kernel's build; Out is the root: each kernel's
	// module and manifest go to Out/RELEASE/.
	Options
	Cache string
	Log   *slog.Logger
	// Progress receives each kernel's steps.
	Progress func(KernelStep)
	// OpenEnv prepares a kernel's environment; OpenEnv of the profile,
	// with Cache and Log, when nil.
	OpenEnv func(context.Context, *kernel.Profile) (*Env, error)
}

// BuildMany builds the fixes for each kernel, one after another, and
// returns a result per kernel, in the order given. The error is for
// input no kernel could be built from (a bad name or CVE); a kernel's own
// failure is in its result and does not stop the others.
func BuildMany(ctx context.Context, kernels []*kernel.Profile, fixes []*FixVariants, o ManyOptions) ([]*KernelResult, error) {
	if len(fixes) == 0 {
		return nil, fmt.Errorf("%w: no fix given", ErrBadFix)
	}
	if len(kernels) == 0 {
		return nil, fmt.Errorf("%w: no kernel given", ErrBadFix)
	}
	o.forLevel()
	if o.Name == "" {
		o.Name = fixes[0].ModuleName()
	}
	if err := contract.CheckLabels(o.Name, o.CVEs); err != nil {
		return nil, err
	}
	if o.OpenEnv == nil {
		o.OpenEnv = func(ctx context.Context, p *kernel.Profile) (*Env, error) { return OpenEnv(ctx, p, o.Cache, o.Log) }
	}
	var results []*KernelResult
	for i, p := range kernels {
		if err := ctx.Err(); err != nil {
			return results, err
		}
		report := func(s Step) {
			if o.Progress != nil {
				o.Progress(KernelStep{Index: i + 1, Total: len(kernels), Release: p.Release, Step: s})
			}
		}
		r := buildOne(ctx, p, fixes, o, report)
		results = append(results, r)
		detail := string(r.Outcome)
		if r.Reason != "" {
			detail += ": " + r.Reason
		}
		report(Step{Name: "kernel", Detail: detail, Done: true, Elapsed: r.Elapsed})
	}
	return results, nil
}

func buildOne(ctx context.Context, p *kernel.Profile, fixes []*FixVariants, o ManyOptions, report func(Step)) *KernelResult {
	start := time.Now()
	r := &KernelResult{Release: p.Release, Series: p.Series}
	fail := func(err error) *KernelResult {
		r.Err, r.Elapsed = err, time.Since(start)
		if r.Reason == "" {
			r.Reason = oneLine(err.Error())
		}
		switch {
		case r.Outcome != "":
		case errors.Is(err, ErrUnpatchable), errors.Is(err, ErrRunPre), errors.Is(err, ErrNothing):
			r.Outcome = OutcomeRefused
		default:
			r.Outcome = OutcomeFailed
		}
		return r
	}
	if !contract.ValidRelease(p.Release) {
		return fail(fmt.Errorf("%w: kernel release %q", ErrBadFix, p.Release))
	}
	out := filepath.Join(o.Out, p.Release)

	report(Step{Name: "prepare", Detail: "the source tree (once per release) and the kernel's symbols"})
	t0 := time.Now()
	env, err := o.OpenEnv(ctx, p)
	if err != nil {
		return fail(err)
	}
	report(Step{Name: "prepare", Done: true, Elapsed: time.Since(t0)})

	// Port every fix (its variant for this series) before compiling.
	report(Step{Name: "port", Detail: fmt.Sprintf("%d fix(es) to %s", len(fixes), p.Release)})
	t0 = time.Now()
	var build, contained []*Fix
	for _, v := range fixes {
		f, err := v.For(p.Series)
		if err != nil {
			r.Ports = append(r.Ports, FixPort{Fix: v.Name})
			r.Outcome = OutcomeNotPorted
			return fail(err)
		}
		port, err := env.Tree.Port(ctx, f.Diff)
		if errors.Is(err, kbuild.ErrDoesNotApply) && len(build) > 0 {
			// Written on top of the fixes before it, as a series'
			// fixes to one function are: it ports onto them, and the
			// build applies the fixes in order.
			if p, perr := env.Tree.PortOnto(ctx, joinDiffs(build), f.Diff); perr == nil {
				port, err = p, nil
			}
		}
		r.Ports = append(r.Ports, FixPort{Fix: f.Name, Variant: f.Variant, Port: port})
		switch {
		case errors.Is(err, kbuild.ErrContained):
			contained = append(contained, f)
		case errors.Is(err, kbuild.ErrDoesNotApply), errors.Is(err, kbuild.ErrBadDiff):
			r.Outcome, r.Reason = OutcomeNotPorted, fmt.Sprintf("%s: %v", f.Name, err)
			if port != nil {
				r.Reason = fmt.Sprintf("%s: %s", f.Name, port.Reason)
			}
			return fail(fmt.Errorf("%w: %s: %w", ErrBadFix, f.Name, err))
		case err != nil:
			return fail(err)
		default:
			build = append(build, f)
		}
	}
	report(Step{Name: "port", Detail: r.PortSummary(), Done: true, Elapsed: time.Since(t0)})

	if len(build) == 0 {
		path, err := writeContained(out, o, env.Kernel, contained)
		if err != nil {
			return fail(err)
		}
		r.Outcome, r.Contained, r.Elapsed = OutcomeContained, path, time.Since(start)
		r.Reason = "already fixed: the kernel's source contains the fix (it reverse-applies)"
		return r
	}
	bo := o.Options
	bo.Out = out
	bo.Progress = report
	res, err := env.Build(ctx, build, bo)
	if err != nil {
		return fail(err)
	}
	// A built kernel has no contained record of the same name: remove
	// what an earlier run may have left.
	os.Remove(filepath.Join(out, o.Name+contract.ContainedSuffix))
	r.Outcome, r.Module, r.Manifest, r.Elapsed = OutcomeBuilt, res.Module, res.ManifestPath, time.Since(start)
	for _, obj := range res.Manifest.Objects {
		for _, fn := range obj.Functions {
			r.Functions = append(r.Functions, obj.Name+":"+fn.Name)
		}
		for _, cb := range obj.Callbacks {
			r.Callbacks = append(r.Callbacks, obj.Name+":"+cb)
		}
	}
	for _, sb := range res.Decisions.StaticBranches {
		r.StaticBranches = append(r.StaticBranches, sb.String())
	}
	if len(contained) > 0 {
		var names []string
		for _, f := range contained {
			names = append(names, f.Name)
		}
		r.Reason = "already contains " + strings.Join(names, ", ") + ": built without"
	}
	return r
}

// joinDiffs is the fixes' diffs as one, in order, as CompilePair applies
// them.
func joinDiffs(fixes []*Fix) []byte {
	var all []byte
	for _, f := range fixes {
		all = append(append(all, f.Diff...), '\n')
	}
	return all
}

// writeContained records that the kernel contains the fixes, as
// OUT/RELEASE/NAME.contained.json, and removes a module and manifest of
// that name an earlier run may have left there.
func writeContained(out string, o ManyOptions, k *Kernel, fixes []*Fix) (string, error) {
	c := contract.Contained{
		Version: contract.ManifestVersion,
		Name:    o.Name,
		Kernel:  contract.KernelID{Release: k.Release(), BuildID: k.BuildID()},
		Checked: time.Now().UTC().Format(time.RFC3339),
	}
	for _, f := range fixes {
		c.Fixes = append(c.Fixes, f.Fix)
		c.CVEs = appendMissing(c.CVEs, f.CVEs...)
	}
	c.CVEs = appendMissing(c.CVEs, o.CVEs...)
	// The record makes a fleet count machines as fixed: check it by the
	// rules publish and the server apply before it is written.
	if err := c.Validate(); err != nil {
		return "", fmt.Errorf("contained record of %s: %w", o.Name, err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return "", err
	}
	path := filepath.Join(out, o.Name+contract.ContainedSuffix)
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	os.Remove(filepath.Join(out, o.Name+".ko"))
	os.Remove(filepath.Join(out, o.Name+".json"))
	return path, nil
}

// oneLine flattens a multi-line error (a refusal lists its reasons on
// lines of their own) for a table cell.
func oneLine(s string) string {
	var parts []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			parts = append(parts, l)
		}
	}
	return strings.Join(parts, " ")
}
