package build_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// buildKit builds one fix (a patch file) with an optional hooks file
// for the environment's kernel.
func (e *env) buildKit(t *testing.T, name, patch string, hooks string) (*build.Result, error) {
	t.Helper()
	b, err := os.ReadFile(patch)
	if err != nil {
		t.Fatal(err)
	}
	f, err := build.ParseFix(filepath.Base(patch), b)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	work := t.TempDir()
	src := &build.TreeSource{Tree: e.tree, HeadersDir: e.profile.HeadersDir, Work: work}
	start := time.Now()
	res, err := build.Build(ctx, src, e.kernel, []*build.Fix{f}, build.Options{Out: t.TempDir(), Work: work, Name: name, Hooks: hooks})
	t.Logf("build %s: %.1fs, err %v", name, time.Since(start).Seconds(), err)
	return res, err
}

// TestKit builds the fix author's kit's examples for 6.1.0-54 and runs
// them in the VM (TestKitGuest*): testdata/kit/pipe.patch with its hooks
// (data updated in place, a shadow variable) and hooks whose pre-patch
// callback fails; the hooks that use a symbol the kernel does not have,
// or has twice, are refused. kpatch's patches written with its macros
// (macro-callbacks, syscall, gcc-static-local-var-6) go through the
// kit's adapters in TestKpatchSuite.
func TestKit(t *testing.T) {
	testutils.RequireVM(t) // before the builds: skipped with -short
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	var files []vm.File
	for _, b := range []struct{ name, patch, hooks string }{
		{"stitch_kit_pipe", "testdata/kit/pipe.patch", "testdata/kit/pipe-hooks.c"},
		{"stitch_kit_refuse", "testdata/fixes/cmdline.patch", "testdata/kit/refuse-hooks.c"},
	} {
		res, err := e.buildKit(t, b.name, b.patch, b.hooks)
		if err != nil {
			t.Fatalf("build %s: %v", b.name, err)
		}
		m := res.Manifest
		if b.hooks != "" && (m.Hooks == nil || m.Hooks.Name != filepath.Base(b.hooks) || len(m.Hooks.Hash) != 64) {
			t.Errorf("%s: manifest hooks %+v, want %s with its sha256", b.name, m.Hooks, filepath.Base(b.hooks))
		}
		files = append(files, vm.File{Src: res.Module, Dst: "/" + b.name + ".ko"})
		if b.name == "stitch_kit_pipe" && (len(m.Objects) != 1 || strings.Join(m.Objects[0].Callbacks, ",") != "pre_patch,post_unpatch") {
			t.Errorf("%s: objects %+v, want vmlinux with pre_patch and post_unpatch", b.name, m.Objects)
		}
	}

	for _, r := range []struct{ hooks, symbol, why string }{
		{"missing-hooks.c", "stitch_no_such_variable", "does not have"},
		{"twice-hooks.c", "attr_group", "defined 2 times"},
	} {
		_, err := e.buildKit(t, "stitch_kit_bad", "testdata/fixes/cmdline.patch", "testdata/kit/"+r.hooks)
		if !errors.Is(err, build.ErrUnpatchable) || !strings.Contains(err.Error(), r.symbol) || !strings.Contains(err.Error(), r.why) {
			t.Errorf("hooks %s: %v; want a refusal naming %s (%s)", r.hooks, err, r.symbol, r.why)
		}
	}
	testutils.RunGuest(t, "^TestKitGuest", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

// resizes resizes a pipe n times (alternating sizes, so each is a real
// resize) and returns the error of the first that fails.
func resizes(fd, n int) (int, error) {
	for i := 0; i < n; i++ {
		size := 8192 << (i % 2)
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETPIPE_SZ, size); err != nil {
			return i, err
		}
	}
	return n, nil
}

// The guide's example: the patch lowers pipe-max-size in place (and puts
// it back), and counts resizes in a shadow variable of each pipe, which
// pipes made before the patch get when first resized, and which the
// revert frees.
func TestKitGuestPipe(t *testing.T) {
	testutils.RequireGuest(t)
	const sysctl = "/proc/sys/fs/pipe-max-size"
	maxSize := func() string { return strings.TrimSpace(read(t, sysctl)) }
	if got := maxSize(); got != "1048576" {
		t.Fatalf("pipe-max-size before = %s", got)
	}
	var old [2]int
	if err := unix.Pipe(old[:]); err != nil {
		t.Fatal(err)
	}
	if n, err := resizes(old[0], 6); err != nil {
		t.Fatalf("unpatched: resize %d: %v", n+1, err)
	}
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()

	stitch(t, "apply", "/stitch_kit_pipe.ko")
	if got := maxSize(); got != "524288" {
		t.Errorf("patched: pipe-max-size = %s, want 524288 (set by the pre-patch callback)", got)
	}
	var fresh [2]int
	if err := unix.Pipe(fresh[:]); err != nil {
		t.Fatal(err)
	}
	for name, fd := range map[string]int{"a pipe made before the patch": old[0], "a new pipe": fresh[0]} {
		if n, err := resizes(fd, 5); n != 4 || !errors.Is(err, unix.EBUSY) {
			t.Errorf("patched, %s: %d resizes, then %v; want 4, then EBUSY", name, n, err)
		}
	}
	if log := kmsg.ReadNew(); !strings.Contains(log, "stitch pipe hooks: pipe-max-size 524288") {
		t.Errorf("no line from the pre-patch callback in the kernel log:\n%s", log)
	}

	stitch(t, "revert", "stitch_kit_pipe")
	if got := maxSize(); got != "1048576" {
		t.Errorf("reverted: pipe-max-size = %s, want 1048576 (restored by the post-unpatch callback)", got)
	}
	if n, err := resizes(old[0], 6); err != nil {
		t.Errorf("reverted: resize %d: %v", n+1, err)
	}

	// Again: the revert freed every shadow variable, so the old pipe
	// counts from zero.
	stitch(t, "apply", "/stitch_kit_pipe.ko")
	if n, err := resizes(old[0], 5); n != 4 || !errors.Is(err, unix.EBUSY) {
		t.Errorf("patched again: %d resizes, then %v; want 4 (the count freed at revert), then EBUSY", n, err)
	}
	stitch(t, "revert", "stitch_kit_pipe")

	// A value an administrator set is neither lowered nor "restored".
	if err := os.WriteFile(sysctl, []byte("2097152"), 0o644); err != nil {
		t.Fatal(err)
	}
	stitch(t, "apply", "/stitch_kit_pipe.ko")
	if got := maxSize(); got != "2097152" {
		t.Errorf("patched over an administrator's value: pipe-max-size = %s, want 2097152", got)
	}
	stitch(t, "revert", "stitch_kit_pipe")
	if got := maxSize(); got != "2097152" {
		t.Errorf("reverted over an administrator's value: pipe-max-size = %s, want 2097152", got)
	}
	os.WriteFile(sysctl, []byte("1048576"), 0o644)
	unix.Close(old[0])
	unix.Close(old[1])
	unix.Close(fresh[0])
	unix.Close(fresh[1])
}

// A pre-patch callback's error makes the kernel refuse the patch: apply
// fails and leaves nothing loaded, and the patched function is not.
func TestKitGuestRefuse(t *testing.T) {
	testutils.RequireGuest(t)
	before := read(t, "/proc/cmdline")
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	out, err := runStitch("apply", "/stitch_kit_refuse.ko")
	if err == nil {
		t.Fatalf("apply with a failing pre-patch callback succeeded:\n%s", out)
	}
	if !strings.Contains(out, "pre-patch callback for vmlinux refused it") {
		t.Errorf("apply does not say the pre-patch callback refused the patch:\n%s", out)
	}
	for _, p := range []string{"/sys/kernel/livepatch/stitch_kit_refuse", "/sys/module/stitch_kit_refuse"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s exists after the refused apply", p)
		}
	}
	if got := read(t, "/proc/cmdline"); got != before {
		t.Errorf("/proc/cmdline = %q after the refused apply, want %q", got, before)
	}
	if log := kmsg.ReadNew(); !strings.Contains(log, "stitch refuse hooks: pre-patch refuses") || !strings.Contains(log, "pre-patch callback failed") {
		t.Errorf("the kernel log does not show the callback and the kernel's refusal:\n%s", log)
	}
}

func runStitch(args ...string) (string, error) {
	out, err := exec.Command("stitch", args...).CombinedOutput()
	return string(out), err
}
