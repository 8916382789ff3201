// Package demo shows Stitch's main job end to end: a source fix is built
// into a livepatch module for the distro kernel (compiled, diffed, checked
// against the kernel's own code), a VM boots that kernel, and the guest
// applies the patch, shows its effect, reverts it and shows the kernel
// restored.
package demo

import (
	"context"
	_ "embed"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/vm"
)

//go:embed fix/cmdline.patch
var fix []byte

// Options for the host side of the demo.
type Options struct {
	Release string // kernel release; kernel.Default if empty
	Stitch  string // static stitch binary for the guest; the running one if empty
	Cache   string // kbuild.CacheDir() if empty
	Out     io.Writer
	Console io.Writer // kernel console of the VM, if wanted
}

// Run builds the demo's fix, boots the VM and runs the guest side,
// streaming its output. It fails if the guest saw the kernel unchanged
// after applying or not restored after reverting.
func Run(ctx context.Context, o Options) error {
	if o.Release == "" {
		o.Release = kernel.Default
	}
	if o.Cache == "" {
		o.Cache = kbuild.CacheDir()
	}
	start := time.Now()
	say := func(format string, args ...any) {
		fmt.Fprintf(o.Out, "[%5.1fs] "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	}
	say("preparing the %s source tree (the first run unpacks and configures it: about a minute) and decoding the kernel's symbols", o.Release)
	p, err := kernel.Open(ctx, o.Cache, o.Release)
	if err != nil {
		return err
	}
	env, err := build.OpenEnv(ctx, p, o.Cache, nil)
	if err != nil {
		return err
	}
	f, err := build.ParseFix("cmdline.patch", fix)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "stitch-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	say("building a livepatch from the fix %q", f.Description)
	res, err := env.Build(ctx, []*build.Fix{f}, build.Options{Out: work, Work: filepath.Join(work, "build"), Name: "stitch_demo",
		Progress: func(s build.Step) {
			if s.Done {
				say("  %s %s: %.1fs", s.Name, s.Detail, s.Elapsed.Seconds())
			}
		}})
	if err != nil {
		return err
	}
	for _, obj := range res.Manifest.Objects {
		for _, fn := range obj.Functions {
			say("  %s patches %s:%s, whose code matched the kernel image (run-pre)", filepath.Base(res.Module), obj.Name, fn.Name)
		}
	}

	say("booting %s under QEMU", p.BootImage)
	vres, err := vm.Run(ctx, vm.Options{
		Kernel:  p.BootImage,
		Init:    o.Stitch,
		Files:   []vm.File{{Src: res.Module, Dst: "/stitch_demo.ko"}},
		Args:    []string{"stitch", "demo-guest", "/stitch_demo.ko"},
		Output:  o.Out,
		Console: o.Console,
	})
	if err != nil {
		return err
	}
	if vres.ExitCode != 0 {
		return fmt.Errorf("demo failed in the guest (exit status %d)", vres.ExitCode)
	}
	say("done: the VM ran for %.1fs (%s)", vres.Duration.Seconds(), vres.Accel)
	return nil
}

// Guest is the demo's guest side: before, apply, after, revert, restored.
func Guest(ctx context.Context, ko string, out io.Writer) error {
	k := &livepatch.Kernel{}
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

func readCmdline() (string, error) {
	b, err := os.ReadFile("/proc/cmdline")
	return strings.TrimSpace(string(b)), err
}
