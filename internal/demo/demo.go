// Package demo shows Stitch's main job end to end: a source fix is built
// into a livepatch module for each distro kernel named (compiled, diffed,
// checked against that kernel's own code), a VM boots each kernel in turn,
// and the guest applies the patch, shows its effect, reverts it and shows
// the kernel restored.
package demo

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/vm"
)

//go:embed fix/cmdline.patch
var fix []byte

// ModuleName is the name of the demo's livepatch module.
const ModuleName = "stitch_demo"

// Options for the host side of the demo.
type Options struct {
	Releases []string // kernel releases; [kernel.Default] if empty
	Stitch   string   // static stitch binary for the guest; the running one if empty
	Cache    string   // kernel.CacheDir() if empty
	// Dir receives each kernel's module and manifest (Dir/RELEASE/); a
	// temporary directory, removed when Run returns, if empty.
	Dir     string
	Out     io.Writer
	Console io.Writer // kernel console of the VMs, if wanted
}

// Result is what became of one kernel.
type Result struct {
	Release string `json:"release"`
	// Build is the kernel's part of the build; nil when it never got
	// that far.
	Build *build.KernelResult `json:"build,omitempty"`
	// Vermagic of the module built for the kernel.
	Vermagic string `json:"vermagic,omitempty"`
	// Guest is the guest's output: /proc/cmdline before, patched and
	// restored.
	Guest string        `json:"guest,omitempty"`
	VM    time.Duration `json:"vm_ns,omitempty"`
	Accel string        `json:"accel,omitempty"` // kvm or tcg
	// Stage is where the kernel failed: "build" or "guest"; empty when it
	// was patched and restored.
	Stage string `json:"failed_at,omitempty"`
	Err   error  `json:"-"`
}

// OK reports whether the kernel was patched live and restored.
func (r *Result) OK() bool { return r.Err == nil }

// Summary is the result in a line.
func (r *Result) Summary() string {
	if r.Err != nil {
		return fmt.Sprintf("FAILED at %s: %s", r.Stage, oneLine(r.Err.Error()))
	}
	return fmt.Sprintf("patched live and restored (build %.1fs, VM %.1fs, %s)", r.Build.Elapsed.Seconds(), r.VM.Seconds(), r.Accel)
}

// ErrFailed means the demo failed on some kernels; Error names them.
var ErrFailed = errors.New("demo failed")

// Error is the demo's failure on one or more kernels; it wraps ErrFailed
// and each kernel's error.
type Error struct {
	Failed []*Result
	Total  int
}

func (e *Error) Error() string {
	var s []string
	for _, r := range e.Failed {
		s = append(s, fmt.Sprintf("%s (%s: %s)", r.Release, r.Stage, oneLine(r.Err.Error())))
	}
	return fmt.Sprintf("%v on %d of %d kernel(s): %s", ErrFailed, len(e.Failed), e.Total, strings.Join(s, "; "))
}

func (e *Error) Unwrap() []error {
	errs := []error{ErrFailed}
	for _, r := range e.Failed {
		errs = append(errs, r.Err)
	}
	return errs
}

// Run builds the demo's fix for every kernel in one many-kernel build,
// then, one VM at a time, boots each kernel that was built and runs the
// guest side, streaming its output; it ends with a summary line per
// kernel. A kernel that fails does not stop the others; the error (an
// *Error) names every one that failed: not built, or seen unchanged by
// its guest after applying or not restored after reverting. A release
// that is not ready fails Run before anything is built.
func Run(ctx context.Context, o Options) ([]*Result, error) {
	if len(o.Releases) == 0 {
		o.Releases = []string{kernel.Default}
	}
	if o.Cache == "" {
		o.Cache = kernel.CacheDir()
	}
	// Every kernel is resolved first: a typo fails at once, naming the
	// kernels that are ready, before minutes of building.
	var profiles []*kernel.Profile
	seen := map[string]bool{}
	for _, r := range o.Releases {
		if seen[r] {
			continue
		}
		seen[r] = true
		p, err := kernel.Open(ctx, o.Cache, r)
		if err != nil {
			return nil, err
		}
		profiles = append(profiles, p)
	}
	f, err := build.ParseFix("cmdline.patch", fix)
	if err != nil {
		return nil, err
	}
	if o.Dir == "" {
		if o.Dir, err = os.MkdirTemp("", "stitch-demo-"); err != nil {
			return nil, fmt.Errorf("demo: %w", err)
		}
		defer os.RemoveAll(o.Dir)
	}
	fixes := []*build.FixVariants{{Name: f.Name, Upstream: f.Upstream, CVEs: f.CVEs, Single: f}}
	d := &runner{
		out: o.Out,
		build: func(ctx context.Context, ps []*kernel.Profile, progress func(build.KernelStep)) ([]*build.KernelResult, error) {
			return build.BuildMany(ctx, ps, fixes, build.ManyOptions{
				Options: build.Options{Out: o.Dir, Name: ModuleName},
				Cache:   o.Cache, Progress: progress})
		},
		boot: func(ctx context.Context, p *kernel.Profile, r *Result, out io.Writer) error {
			return boot(ctx, o, p, r, out)
		},
	}
	return d.run(ctx, profiles, f.Description)
}

// runner is the demo's course over many kernels; build and boot are
// BuildMany and a VM, replaced in the unit tests of the course.
type runner struct {
	out   io.Writer
	build func(context.Context, []*kernel.Profile, func(build.KernelStep)) ([]*build.KernelResult, error)
	// boot runs the guest side for a built kernel, its output to out.
	boot func(ctx context.Context, p *kernel.Profile, r *Result, out io.Writer) error
}

func (d *runner) run(ctx context.Context, profiles []*kernel.Profile, description string) ([]*Result, error) {
	if d.out == nil {
		d.out = io.Discard
	}
	start := time.Now()
	say := func(format string, args ...any) {
		fmt.Fprintf(d.out, "[%5.1fs] "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	}

	say("building a livepatch from the fix %q for %d kernel(s): %s", description, len(profiles), releases(profiles))
	built, err := d.build(ctx, profiles, func(s build.KernelStep) {
		switch {
		case s.Name == "prepare" && !s.Done:
			say("[%d/%d] %s: preparing its source tree (the first run unpacks and configures it: about a minute) and decoding its symbols", s.Index, s.Total, s.Release)
		case s.Name == "kernel":
			say("[%d/%d] %s: %s in %.1fs", s.Index, s.Total, s.Release, s.Detail, s.Elapsed.Seconds())
		case s.Done:
			say("  %s: %.1fs", strings.TrimSpace(s.Name+" "+s.Detail), s.Elapsed.Seconds())
		}
	})
	if err != nil && len(built) == 0 {
		return nil, err
	}
	results := make([]*Result, len(profiles))
	for i, p := range profiles {
		r := &Result{Release: p.Release}
		results[i] = r
		switch {
		case i >= len(built): // the build was interrupted before this kernel
			r.Stage, r.Err = "build", fmt.Errorf("not built: %w", err)
		case built[i].Outcome != build.OutcomeBuilt:
			r.Build = built[i]
			r.Stage, r.Err = "build", buildError(built[i])
		default:
			r.Build = built[i]
		}
	}
	for i, p := range profiles {
		r := results[i]
		if r.Err != nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			r.Stage, r.Err = "guest", fmt.Errorf("not booted: %w", err)
			continue
		}
		for _, fn := range r.Build.Functions {
			say("%s for %s patches %s, whose code matched the kernel image (run-pre)", filepath.Base(r.Build.Module), p.Release, fn)
		}
		say("[%d/%d] %s: booting %s under QEMU", i+1, len(profiles), p.Release, p.BootImage)
		var guest strings.Builder
		err := d.boot(ctx, p, r, io.MultiWriter(d.out, &guest))
		r.Guest = guest.String()
		if err != nil {
			r.Stage, r.Err = "guest", err
			say("[%d/%d] %s: failed: %v", i+1, len(profiles), p.Release, err)
			continue
		}
		say("[%d/%d] %s: done, the VM ran for %.1fs (%s)", i+1, len(profiles), p.Release, r.VM.Seconds(), r.Accel)
	}

	var failed []*Result
	fmt.Fprintln(d.out, "-- summary")
	for _, r := range results {
		fmt.Fprintf(d.out, "   %-20s %s\n", r.Release, r.Summary())
		if r.Err != nil {
			failed = append(failed, r)
		}
	}
	if len(failed) > 0 {
		return results, &Error{Failed: failed, Total: len(results)}
	}
	return results, nil
}

// boot runs the guest side in a VM of the kernel p with the module built
// for it, the guest's output to out.
func boot(ctx context.Context, o Options, p *kernel.Profile, r *Result, out io.Writer) error {
	// The module must be the kernel's own before a VM is spent on it.
	m, err := kmod.Open(r.Build.Module)
	if err != nil {
		return err
	}
	r.Vermagic = m.Vermagic
	if got := m.Release(); got != p.Release {
		return fmt.Errorf("%w: %s was built for %s (vermagic %q), not %s", kmod.ErrVermagic, r.Build.Module, got, m.Vermagic, p.Release)
	}
	var guest strings.Builder
	vres, err := vm.Run(ctx, vm.Options{
		Kernel:  p.BootImage,
		Init:    o.Stitch,
		Files:   []vm.File{{Src: r.Build.Module, Dst: "/" + ModuleName + ".ko"}},
		Args:    []string{"stitch", "demo-guest", "/" + ModuleName + ".ko"},
		Output:  io.MultiWriter(out, &guest),
		Console: o.Console,
	})
	if err != nil {
		return fmt.Errorf("VM of %s: %w", p.Release, err)
	}
	r.VM, r.Accel = vres.Duration, vres.Accel
	if vres.ExitCode != 0 {
		return fmt.Errorf("the guest failed (exit status %d): %s", vres.ExitCode, lastLine(guest.String()))
	}
	return nil
}

// buildError is the error of a kernel the demo fix was not built for.
func buildError(k *build.KernelResult) error {
	if k.Err != nil {
		return k.Err
	}
	// Contained: the kernel's source already says it was patched live.
	return fmt.Errorf("not built (%s): %s", k.Outcome, k.Reason)
}

func releases(ps []*kernel.Profile) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.Release)
	}
	return strings.Join(s, ", ")
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// Guest is the demo's guest side: before, apply, after, revert, restored.
func Guest(ctx context.Context, ko string, out io.Writer) error {
	k := &livepatch.Kernel{}
	release, err := readProc("/proc/sys/kernel/osrelease")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "-- running kernel:         %s\n", release)
	before, err := readCmdline()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "-- /proc/cmdline before:   %s\n", before)

	progress := func(p livepatch.Progress) {
		fmt.Fprintf(out, "   %s: %s %.2fs\n", p.Patch, p.Phase, p.Elapsed.Seconds())
	}
	start := time.Now()
	m, err := k.Apply(ctx, ko, livepatch.ApplyOptions{Progress: progress})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "-- applied %s in %.2fs\n", m.Name, time.Since(start).Seconds())
	after, err := readCmdline()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "-- /proc/cmdline patched:  %s\n", after)

	start = time.Now()
	if err := k.Revert(ctx, m.Name, livepatch.ApplyOptions{Progress: progress}); err != nil {
		return err
	}
	fmt.Fprintf(out, "-- reverted %s in %.2fs\n", m.Name, time.Since(start).Seconds())
	restored, err := readCmdline()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "-- /proc/cmdline restored: %s\n", restored)

	switch {
	case after == before:
		return fmt.Errorf("the patch had no visible effect")
	case restored != before:
		return fmt.Errorf("the kernel was not restored: %q", restored)
	}
	fmt.Fprintln(out, "-- the running kernel was patched and restored without a reboot")
	return nil
}

func readCmdline() (string, error) { return readProc("/proc/cmdline") }

func readProc(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return strings.TrimSpace(string(b)), nil
}
