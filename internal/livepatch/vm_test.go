package livepatch_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// TestVM builds the test modules with kbuild on the host, then boots the
// real kernel and runs the TestGuest* tests below inside it: for each
// kernel of testutils.VMKernels (6.1 and 6.12), against its own headers.
func TestVM(t *testing.T) {
	testutils.ForEachVMKernel(t, testVM)
}

func testVM(t *testing.T, p *kernel.Profile) {
	kos := testutils.BuildModules(t, p, "testdata/modules", "lp_cmdline", "stall_helper", "lp_stall", "plain_mod", "lp_warn", "stall2_helper", "lp_stall2")
	dir := t.TempDir()
	good, err := os.ReadFile(kos["lp_cmdline"])
	if err != nil {
		t.Fatal(err)
	}
	// Bad inputs made from a good module.
	bad := map[string][]byte{
		"truncated.ko": good[:len(good)/2],
		"notelf.ko":    []byte("this is not a kernel module\n"),
		"vermagic.ko":  bytes.ReplaceAll(good, []byte("vermagic="+p.Release+" "), []byte("vermagic="+otherRelease(p.Release)+" ")),
	}
	if bytes.Equal(bad["vermagic.ko"], good) {
		t.Fatal("vermagic not found in lp_cmdline.ko")
	}
	var files []vm.File
	for name, data := range bad {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, vm.File{Src: p, Dst: "/" + name})
	}
	for name, ko := range kos {
		files = append(files, vm.File{Src: ko, Dst: "/" + name + ".ko"})
	}
	testutils.RunGuest(t, "^TestGuest", vm.Options{Kernel: p.BootImage, Files: files})
}

// otherRelease is the release vermagic.ko claims to be built for: r with
// the digits of its ABI's last number made 9s (8s if they were), the
// same length, so that the module's sections keep their sizes.
func otherRelease(r string) string {
	b := []byte(r)
	end := strings.LastIndex(r, "-") // before the flavour
	for end > 0 && (b[end-1] < '0' || b[end-1] > '9') {
		end--
	}
	start := end
	for start > 0 && b[start-1] >= '0' && b[start-1] <= '9' {
		start--
	}
	nines := strings.Repeat("9", end-start)
	fill := byte('9')
	if r[start:end] == nines {
		fill = '8'
	}
	for i := start; i < end; i++ {
		b[i] = fill
	}
	return string(b)
}

// stitch runs the stitch CLI in the guest and returns its exit code, its
// standard output, and its standard error.
func stitch(t *testing.T, uid int, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command("stitch", args...)
	if uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Errorf("run stitch %v: %v", args, err)
		return -1, "", ""
	}
	t.Logf("$ stitch %s\n%s%s", strings.Join(args, " "), stdout.String(), stderr.String())
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

func cmdline(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// snapshot is the kernel state a refused command must leave untouched.
func snapshot(t *testing.T) string {
	t.Helper()
	mods, err := os.ReadFile("/proc/modules")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(string(mods), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	patches, _ := os.ReadDir("/sys/kernel/livepatch")
	for _, p := range patches {
		names = append(names, "patch:"+p.Name())
	}
	return strings.Join(names, " ") + " | " + cmdline(t)
}

func TestGuestApplyStatusRevert(t *testing.T) {
	testutils.RequireGuest(t)
	before := cmdline(t)

	code, out, _ := stitch(t, 0, "apply", "--json", "/lp_cmdline.ko")
	if code != 0 {
		t.Fatalf("apply: exit %d", code)
	}
	var rep struct {
		OK       bool
		Patch    string
		Progress []livepatch.Progress
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.OK || rep.Patch != "lp_cmdline" {
		t.Fatalf("apply report: %v %+v", err, rep)
	}
	if got := cmdline(t); got != "stitch-test: cmdline patched\n" {
		t.Fatalf("/proc/cmdline after apply = %q", got)
	}

	code, out, _ = stitch(t, 0, "status", "--json") // 9: not covered, no agent
	if code != 9 {
		t.Fatalf("status: exit %d", code)
	}
	var st livepatch.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	if !st.Livepatch || st.Release != testutils.RunningRelease(t) || len(st.BuildID) != 40 || len(st.Patches) != 1 {
		t.Fatalf("status: %+v", st)
	}
	p := st.Patches[0]
	if p.Name != "lp_cmdline" || !p.Enabled || p.Transition || len(p.Objects) != 1 ||
		p.Objects[0].Name != "vmlinux" || !p.Objects[0].Patched ||
		len(p.Objects[0].Functions) != 1 || p.Objects[0].Functions[0].Name != "cmdline_proc_show" {
		t.Fatalf("status patch: %+v", p)
	}
	if !strings.Contains(st.Taint.String(), "K") {
		t.Errorf("taint %q lacks K (live patched)", st.Taint)
	}

	if code, _, _ = stitch(t, 0, "revert", "lp_cmdline"); code != 0 {
		t.Fatalf("revert: exit %d", code)
	}
	if got := cmdline(t); got != before {
		t.Fatalf("/proc/cmdline after revert = %q, want %q", got, before)
	}
	if _, err := os.Stat("/sys/module/lp_cmdline"); err == nil {
		t.Error("lp_cmdline still loaded after revert")
	}
	if _, err := os.Stat("/sys/kernel/livepatch/lp_cmdline"); err == nil {
		t.Error("lp_cmdline still in /sys/kernel/livepatch after revert")
	}
}

func TestGuestBadInput(t *testing.T) {
	testutils.RequireGuest(t)
	cases := []struct {
		name string
		uid  int
		args []string
		code int
		want string
	}{
		{"missing file", 0, []string{"apply", "/nonexistent.ko"}, 2, "/nonexistent.ko: no such file"},
		{"truncated", 0, []string{"apply", "/truncated.ko"}, 2, "truncated or corrupt ELF"},
		{"not ELF", 0, []string{"apply", "/notelf.ko"}, 2, "not an ELF file"},
		{"not a module", 0, []string{"apply", "/bin/stitch"}, 2, "not a kernel module"},
		{"not livepatch", 0, []string{"apply", "/plain_mod.ko"}, 2, "livepatch=Y"},
		{"wrong vermagic", 0, []string{"apply", "/vermagic.ko"}, 2, otherRelease(testutils.RunningRelease(t))},
		{"not root", 1000, []string{"apply", "/lp_cmdline.ko"}, 3, "root"},
		{"unknown patch", 0, []string{"revert", "no_such_patch"}, 2, "no such livepatch"},
		{"no args", 0, []string{"apply"}, 2, "usage"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := snapshot(t)
			code, _, stderr := stitch(t, c.uid, c.args...)
			if code != c.code {
				t.Errorf("exit %d, want %d", code, c.code)
			}
			if !strings.Contains(strings.ToLower(stderr), strings.ToLower(c.want)) {
				t.Errorf("output lacks %q", c.want)
			}
			if after := snapshot(t); after != before {
				t.Errorf("kernel state changed:\n before %s\n after  %s", before, after)
			}
		})
	}
}

// TestGuestStall loads a module whose kthread sleeps in the function a
// patch replaces: the transition cannot finish, so apply must name the
// thread and roll back. While it waits, a second apply is refused as busy.
func TestGuestStall(t *testing.T) {
	testutils.RequireGuest(t)
	f, err := os.Open("/stall_helper.ko")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil {
		t.Fatalf("load stall_helper: %v", err)
	}
	f.Close()
	t.Cleanup(func() {
		if err := unix.DeleteModule("stall_helper", 0); err != nil {
			t.Errorf("unload stall_helper: %v", err)
		}
	})
	before := snapshot(t)
	done := applyAsync(t, "--timeout", "6s", "/lp_stall.ko")
	// Wait for the transition to start, then try a second patch.
	waitPatch(t, "lp_stall", func(p *livepatch.Patch) bool { return p.Transition })
	code, _, stderr := stitch(t, 0, "apply", "/lp_cmdline.ko")
	if code != 4 || !strings.Contains(stderr, "lp_stall") {
		t.Errorf("apply during a transition: exit %d, want 4 naming lp_stall", code)
	}

	r := <-done
	if r.code != 5 {
		t.Fatalf("stalled apply: exit %d, want 5", r.code)
	}
	var rep struct {
		Stalled livepatch.TransitionError
	}
	if err := json.Unmarshal([]byte(r.out), &rep); err != nil {
		t.Fatal(err)
	}
	var holder *livepatch.Task
	for i, h := range rep.Stalled.Holders {
		if h.Comm == "stitch-stall" {
			holder = &rep.Stalled.Holders[i]
		}
	}
	if holder == nil {
		t.Fatalf("stalled report does not name the stitch-stall thread: %+v", rep.Stalled.Holders)
	}
	if !strings.Contains(strings.Join(holder.Stack, "\n"), "stall_helper_wait") {
		t.Errorf("holder's stack lacks stall_helper_wait: %q", holder.Stack)
	}
	if !rep.Stalled.RolledBack {
		t.Error("report does not say it rolled back")
	}
	if after := snapshot(t); after != before {
		t.Errorf("rollback left the kernel changed:\n before %s\n after  %s", before, after)
	}
}

// TestGuestRollbackFails applies a patch whose transition stalls (a
// thread sleeps in the old code) and whose reverse transition stalls too
// (another thread switched early and sleeps in the new code): apply must
// exit 11 naming what the kernel still holds and the thread that holds
// it, never claim the kernel is as it was. Once the helper's threads stop
// the kernel finishes the reverse transition, and revert unloads the
// module.
func TestGuestRollbackFails(t *testing.T) {
	testutils.RequireGuest(t)
	f, err := os.Open("/stall2_helper.ko")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil {
		t.Fatalf("load stall2_helper: %v", err)
	}
	f.Close()
	helper := true
	t.Cleanup(func() {
		if helper {
			unix.DeleteModule("stall2_helper", 0)
		}
		unix.DeleteModule("lp_stall2", 0)
	})
	code, out, stderr := stitch(t, 0, "apply", "--json", "--timeout", "4s", "/lp_stall2.ko")
	if code != 11 {
		t.Fatalf("apply whose rollback stalls: exit %d, want 11\n%s", code, stderr)
	}
	var rep struct {
		Error          string
		Stalled        livepatch.TransitionError
		RollbackFailed *livepatch.RollbackError `json:"rollback_failed"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	comms := func(ts []livepatch.Task) string {
		var cs []string
		for _, h := range ts {
			cs = append(cs, h.Comm)
		}
		return strings.Join(cs, " ")
	}
	if rep.Stalled.RolledBack || !strings.Contains(comms(rep.Stalled.Holders), "stitch-old") {
		t.Errorf("the stalled transition: rolled back %v, holders %q", rep.Stalled.RolledBack, comms(rep.Stalled.Holders))
	}
	rf := rep.RollbackFailed
	if rf == nil || rf.Still == nil || rf.Still.Enabled || !rf.Still.Transition || !rf.ModuleLoaded || !strings.Contains(comms(rf.Holders), "stitch-new") {
		t.Fatalf("rollback_failed = %+v, want lp_stall2 disabled, in transition, loaded, held by stitch-new", rf)
	}
	if strings.Contains(rep.Error, "the kernel is as it was") {
		t.Errorf("a failed rollback claims the kernel is as it was: %s", rep.Error)
	}
	if p, err := (&livepatch.Kernel{}).Patch("lp_stall2"); err != nil || p.Enabled || !p.Transition {
		t.Fatalf("lp_stall2 in the kernel: %+v %v", p, err)
	}
	// The helper's threads stopped, nothing holds the reverse transition.
	if err := unix.DeleteModule("stall2_helper", 0); err != nil {
		t.Fatalf("unload stall2_helper: %v", err)
	}
	helper = false
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat("/sys/kernel/livepatch/lp_stall2"); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the reverse transition did not end once its holders stopped")
		}
	}
	if code, _, _ := stitch(t, 0, "revert", "lp_stall2"); code != 0 {
		t.Fatalf("revert after the transition ended: exit %d", code)
	}
	if _, err := os.Stat("/sys/module/lp_stall2"); err == nil {
		t.Error("lp_stall2 still loaded")
	}
}

// applyResult is what an apply run in the background ended with.
type applyResult struct {
	code int
	out  string
}

// applyAsync runs stitch apply --json with args in the background.
func applyAsync(t *testing.T, args ...string) <-chan applyResult {
	done := make(chan applyResult, 1)
	go func() {
		code, out, _ := stitch(t, 0, append([]string{"apply", "--json"}, args...)...)
		done <- applyResult{code, out}
	}()
	return done
}

// waitPatch waits up to 10s for patch name to reach the state ok wants.
func waitPatch(t *testing.T, name string, ok func(*livepatch.Patch) bool) {
	t.Helper()
	k := &livepatch.Kernel{}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if p, err := k.Patch(name); err == nil && ok(p) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("patch %s never reached the expected state", name)
		}
	}
}

// TestGuestApplyContextCancel checks that an apply cancelled by its
// caller (Ctrl-C) during a stalled transition rolls back too.
func TestGuestApplyContextCancel(t *testing.T) {
	testutils.RequireGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	f, err := os.Open("/stall_helper.ko")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil {
		t.Fatalf("load stall_helper: %v", err)
	}
	f.Close()
	defer unix.DeleteModule("stall_helper", 0)
	k := &livepatch.Kernel{}
	_, err = k.Apply(ctx, "/lp_stall.ko", livepatch.ApplyOptions{Timeout: time.Minute})
	var te *livepatch.TransitionError
	if !errors.As(err, &te) || !te.RolledBack {
		t.Fatalf("cancelled apply: %v, want a rolled-back TransitionError", err)
	}
	if _, err := os.Stat("/sys/module/lp_stall"); err == nil {
		t.Error("lp_stall still loaded after a cancelled apply")
	}
}

// TestGuestWarningRevertsPatch applies a patch whose new function warns,
// calls it while apply --watch is watching, and expects the patch reverted
// and the warning reported.
func TestGuestWarningRevertsPatch(t *testing.T) {
	testutils.RequireGuest(t)
	before := cmdline(t)
	done := applyAsync(t, "--watch", "30s", "/lp_warn.ko")
	waitPatch(t, "lp_warn", func(p *livepatch.Patch) bool { return p.Enabled && !p.Transition })
	if got := cmdline(t); got != "stitch-test: warned\n" {
		t.Errorf("/proc/cmdline with lp_warn = %q", got)
	}
	var r applyResult
	select {
	case r = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("apply --watch did not notice the warning")
	}
	if r.code != 6 {
		t.Fatalf("apply --watch after a warning: exit %d, want 6", r.code)
	}
	var rep struct{ Trouble livepatch.TroubleError }
	if err := json.Unmarshal([]byte(r.out), &rep); err != nil {
		t.Fatal(err)
	}
	if !rep.Trouble.RolledBack || !strings.Contains(strings.Join(rep.Trouble.Log, "\n"), "WARNING:") {
		t.Errorf("trouble report = %+v, want the WARNING line and rolled_back", rep.Trouble)
	}
	if got := cmdline(t); got != before {
		t.Errorf("/proc/cmdline after the revert = %q, want %q", got, before)
	}
	if _, err := os.Stat("/sys/module/lp_warn"); err == nil {
		t.Error("lp_warn still loaded")
	}
}

// TestGuestKcore reads live kernel text: ftrace has turned the fentry
// call of cmdline_proc_show into a 5-byte NOP at boot, and a livepatch
// turns it into a call to its ftrace trampoline. With IBT (6.12) the call
// follows the function's ENDBR64, or the 4-byte NOP that seals it.
func TestGuestKcore(t *testing.T) {
	testutils.RequireGuest(t)
	k := &livepatch.Kernel{}
	kc, err := k.OpenKcore()
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	addr := testutils.KallsymsAddr(t, "cmdline_proc_show")
	head, err := kc.Read(addr, 4)
	if err != nil {
		t.Fatal(err)
	}
	endbr64, sealed := []byte{0xf3, 0x0f, 0x1e, 0xfa}, []byte{0x66, 0x0f, 0x1f, 0x00}
	if bytes.Equal(head, endbr64) || bytes.Equal(head, sealed) {
		addr += 4
	}
	nop5 := []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
	b, err := kc.Read(addr, 5)
	if err != nil || !bytes.Equal(b, nop5) {
		t.Fatalf("cmdline_proc_show starts with % x, %v; want ftrace's NOP", b, err)
	}
	if code, _, _ := stitch(t, 0, "apply", "/lp_cmdline.ko"); code != 0 {
		t.Fatalf("apply: exit %d", code)
	}
	b, err = kc.Read(addr, 5)
	if err != nil || b[0] != 0xe8 {
		t.Errorf("patched cmdline_proc_show starts with % x, %v; want a call (0xe8)", b, err)
	}
	if code, _, _ := stitch(t, 0, "revert", "lp_cmdline"); code != 0 {
		t.Fatalf("revert: exit %d", code)
	}
	if b, _ = kc.Read(addr, 5); !bytes.Equal(b, nop5) {
		t.Errorf("after revert cmdline_proc_show starts with % x", b)
	}
	if _, err := kc.Read(0x1000, 4); !errors.Is(err, livepatch.ErrNoKcore) {
		t.Errorf("reading an unmapped address: %v", err)
	}
}
