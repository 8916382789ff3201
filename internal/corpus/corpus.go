// Package corpus measures Stitch on a corpus of real kernel fixes, as
// Ksplice's paper measured itself on 64 security fixes: each fix is built
// for the target kernel and, if built, applied in a VM, exercised,
// watched for kernel warnings, and reverted. The result is the share of
// fixes live-patched end to end, and for each other fix why not.
package corpus

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/klpmod"
)

// Outcomes of one fix.
const (
	Applied       = "applied"        // built, applied, exercised, reverted, no warning
	Refused       = "refused"        // the build refused it with a reason
	NoChange      = "no-change"      // the fix compiles to the same code for this kernel: nothing to patch
	BuildFailed   = "build-failed"   // the build failed otherwise: a bug or a missing piece
	ApplyFailed   = "apply-failed"   // built, but the kernel did not take it
	KernelWarning = "kernel-warning" // applied, but the kernel warned or oopsed
	Regressed     = "regressed"      // applied, but a workload that worked before failed
	NotRun        = "not-run"        // built; the VM stage was skipped
	// Against a kernel other than the one the corpus was cut from:
	Contained = "contained"  // the kernel's source already has the fix (it reverse-applies): nothing to patch
	NotPorted = "not-ported" // the fix does not apply to this kernel's source (the reason names the hunk)
)

// Entry is one row of the corpus index.
type Entry struct {
	Name     string `json:"name"`
	File     string `json:"file"`
	Lines    int    `json:"changed_lines"`
	Location string `json:"location"` // vmlinux or a module, as the corpus says
	Patch    string `json:"-"`
	// Hooks is the fix author's hooks for the fix (DIR/hooks/NAME.c,
	// docs/fix-author.md), empty if the fix needs none.
	Hooks string `json:"hooks,omitempty"`
	// Livepatch is the fix author's livepatch form of the fix
	// (DIR/livepatch/NAME.patch), built instead of the upstream diff;
	// AuthorRefusal is the author's reason why the fix cannot be carried
	// (DIR/livepatch/NAME.refused). See livepatch.go.
	Livepatch     string `json:"livepatch,omitempty"`
	AuthorRefusal string `json:"author_refusal,omitempty"`
}

// Result is what happened to one fix.
type Result struct {
	Entry
	Object    string        `json:"object,omitempty"`
	Functions []string      `json:"functions,omitempty"`
	BuildTime time.Duration `json:"build_ns"`
	Port      string        `json:"port,omitempty"` // how the fix fitted the kernel's source: clean, offset (hunks), ...
	Outcome   string        `json:"outcome"`
	Reason    string        `json:"reason,omitempty"`
	Module    string        `json:"-"` // the built .ko
}

// ReadIndex reads DIR/index.tsv (name, file, changed lines, location) and
// checks that each fix is in DIR/fixes/NAME.patch. A fix that needs the
// fix author's hooks has them in DIR/hooks/NAME.c; its livepatch form, if
// it needs one, is DIR/livepatch/NAME.patch (livepatch.go).
func ReadIndex(dir string) ([]Entry, error) {
	f, err := os.Open(filepath.Join(dir, "index.tsv"))
	if err != nil {
		return nil, fmt.Errorf("corpus index: %w", err)
	}
	defer f.Close()
	var out []Entry
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
			continue
		}
		fs := strings.Split(line, "\t")
		if len(fs) != 4 {
			return nil, fmt.Errorf("corpus index line %d: want 4 tab-separated fields, got %d", n, len(fs))
		}
		lines, err := strconv.Atoi(fs[2])
		if err != nil {
			return nil, fmt.Errorf("corpus index line %d: changed lines %q: %w", n, fs[2], err)
		}
		e := Entry{Name: fs[0], File: fs[1], Lines: lines, Location: fs[3], Patch: filepath.Join(dir, "fixes", fs[0]+".patch")}
		if _, err := os.Stat(e.Patch); err != nil {
			return nil, fmt.Errorf("corpus index line %d: %w", n, err)
		}
		if hooks := filepath.Join(dir, "hooks", fs[0]+".c"); fileExists(hooks) {
			e.Hooks = hooks
		}
		if err := livepatchForm(dir, &e); err != nil {
			return nil, fmt.Errorf("corpus index line %d: %w", n, err)
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// Select keeps the entries whose name matches filter (all if empty), at
// most limit of them (all if 0).
func Select(entries []Entry, filter string, limit int) ([]Entry, error) {
	re, err := regexp.Compile(filter)
	if err != nil {
		return nil, fmt.Errorf("filter: %w", err)
	}
	var out []Entry
	for _, e := range entries {
		if re.MatchString(e.Name) && (limit == 0 || len(out) < limit) {
			out = append(out, e)
		}
	}
	return out, nil
}

// fileExists tells whether path names a regular file.
func fileExists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

// Builder builds one fix, with the fix author's hooks file if hooks is not
// empty; build.Build with the target's source and kernel, in production.
type Builder func(ctx context.Context, fix *build.Fix, hooks, out string) (*build.Result, error)

// BuildAll builds every entry, one at a time, into out/NAME. progress is
// called after each.
func BuildAll(ctx context.Context, entries []Entry, b Builder, out string, progress func(Result)) []Result {
	var results []Result
	for _, e := range entries {
		r := Result{Entry: e}
		start := time.Now()
		res, err := buildOne(ctx, e, b, filepath.Join(out, e.Name))
		r.BuildTime = time.Since(start)
		var perr *kbuild.PortError
		switch {
		case res != nil && res.Port != nil:
			r.Port = res.Port.Summary()
		case errors.As(err, &perr):
			r.Port = string(perr.Port.Status)
		}
		switch {
		case err == nil:
			r.Outcome, r.Module = NotRun, res.Module
			for _, o := range res.Manifest.Objects {
				r.Object = o.Name
				for _, f := range o.Functions {
					r.Functions = append(r.Functions, f.Name)
				}
			}
		case errors.Is(err, kbuild.ErrContained):
			r.Outcome, r.Reason = Contained, oneLine(err)
		case errors.Is(err, kbuild.ErrDoesNotApply):
			r.Outcome, r.Reason = NotPorted, oneLine(err)
		case errors.Is(err, build.ErrNothing):
			r.Outcome, r.Reason = NoChange, oneLine(err)
		case refusal(err):
			r.Outcome, r.Reason = Refused, oneLine(err)
		default:
			r.Outcome, r.Reason = BuildFailed, oneLine(err)
		}
		authorRefuses(&r)
		if progress != nil {
			progress(r)
		}
		results = append(results, r)
		if ctx.Err() != nil {
			break
		}
	}
	return results
}

func buildOne(ctx context.Context, e Entry, b Builder, out string) (*build.Result, error) {
	raw, err := os.ReadFile(e.Patch)
	if err != nil {
		return nil, err
	}
	fix, err := build.ParseFix(e.Name+".patch", raw)
	if err != nil {
		return nil, err
	}
	return b(ctx, fix, e.Hooks, out)
}

// refusal tells an honest refusal (the reason names what a livepatch
// cannot do) from a failure of Stitch.
func refusal(err error) bool {
	return errors.Is(err, build.ErrUnpatchable) || errors.Is(err, build.ErrRunPre) || errors.Is(err, klpmod.ErrUnpatchable)
}

// oneLine squeezes a multi-line error for a table cell.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// Summary counts outcomes.
type Summary struct {
	Total    int            `json:"total"`
	Outcomes map[string]int `json:"outcomes"`
	// Share is the fraction of all fixes applied end to end; ShareNeeded
	// leaves out the fixes this kernel needs no patch for: those that
	// change no code in it and those its source already contains.
	Share       float64 `json:"share_applied"`
	ShareNeeded float64 `json:"share_applied_of_needed"`
	// WithHooks counts the applied fixes that needed the fix author's
	// hooks or livepatch form; ShareAutomatic is the share applied
	// without them.
	WithHooks      int     `json:"applied_with_hooks"`
	ShareAutomatic float64 `json:"share_applied_automatically"`
}

// NotNeeded counts the fixes the kernel needs no patch for.
func (s Summary) NotNeeded() int { return s.Outcomes[NoChange] + s.Outcomes[Contained] }

// Summarize counts the results.
func Summarize(rs []Result) Summary {
	s := Summary{Total: len(rs), Outcomes: map[string]int{}}
	for _, r := range rs {
		s.Outcomes[r.Outcome]++
		if r.Outcome == Applied && (r.Hooks != "" || r.Livepatch != "") {
			s.WithHooks++
		}
	}
	applied := float64(s.Outcomes[Applied])
	if s.Total > 0 {
		s.Share = applied / float64(s.Total)
		s.ShareAutomatic = (applied - float64(s.WithHooks)) / float64(s.Total)
	}
	if needed := s.Total - s.NotNeeded(); needed > 0 {
		s.ShareNeeded = applied / float64(needed)
	}
	return s
}
