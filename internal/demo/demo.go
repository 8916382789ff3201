// Package demo shows Stitch's main job end to end: a livepatch module is
// built with kbuild for the distro kernel, a VM boots that kernel, and the
// guest applies the patch, shows its effect, reverts it and shows the
// kernel restored.
package demo

import (
	"context"
	"embed"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/vm"
)

//go:embed module
var moduleSrc embed.FS

const moduleName = "stitch_demo"

// Options for the host side of the demo.
type Options struct {
	Release string // kernel release; 6.1.0-54-amd64 if empty
	Kernel  string // kernel image; /boot/vmlinuz-<release> if empty
	Stitch  string // static stitch binary for the guest; the running one if empty
	Out     io.Writer
	Console io.Writer // kernel console of the VM, if wanted
}

// Run builds the demo module, boots the VM and runs the guest side,
// streaming its output. It fails if the guest saw the kernel unchanged
// after applying or not restored after reverting.
func Run(ctx context.Context, o Options) error {
	if o.Release == "" {
		o.Release = "6.1.0-54-amd64"
	}
	if o.Kernel == "" {
		o.Kernel = "/boot/vmlinuz-" + o.Release
	}
	dir, err := os.MkdirTemp("", "stitch-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := copyFS(dir, moduleSrc, "module"); err != nil {
		return err
	}
	fmt.Fprintf(o.Out, "== building livepatch module %s against %s\n", moduleName, kbuild.HeadersDir(o.Release))
	start := time.Now()
	ko, err := kbuild.BuildModule(ctx, kbuild.HeadersDir(o.Release), dir, moduleName, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Out, "   built %s in %.1fs\n", filepath.Base(ko), time.Since(start).Seconds())

	fmt.Fprintf(o.Out, "== booting %s under QEMU\n", o.Kernel)
	res, err := vm.Run(ctx, vm.Options{
		Kernel:  o.Kernel,
		Init:    o.Stitch,
		Files:   []vm.File{{Src: ko, Dst: "/" + moduleName + ".ko"}},
		Args:    []string{"stitch", "demo-guest", "/" + moduleName + ".ko"},
		Output:  o.Out,
		Console: o.Console,
	})
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("demo failed in the guest (exit status %d)", res.ExitCode)
	}
	fmt.Fprintf(o.Out, "== done: VM ran for %.1fs (%s)\n", res.Duration.Seconds(), res.Accel)
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

func copyFS(dst string, src fs.FS, root string) error {
	return fs.WalkDir(src, root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(src, p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, filepath.Base(p)), b, 0o644)
	})
}
