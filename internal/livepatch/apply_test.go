package livepatch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The tests here run Apply against a stand-in kernel: /sys and /proc
// trees under Kernel.Root that the test writes, and a module loader
// (Kernel.finit) that records what it was given instead of calling
// finit_module. Everything else is the code the real kernel sees.

// fakeRoot builds the /sys and /proc files Apply reads: livepatch
// support, the captured kernel's notes (its build-id), no taint, and a
// /proc/kallsyms and /proc/kcore with nothing in them.
func fakeRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	notes, err := os.ReadFile("testdata/capture/sys/kernel/notes")
	if err != nil {
		t.Fatal(err)
	}
	write(t, root, "sys/kernel/notes", string(notes))
	write(t, root, "proc/sys/kernel/tainted", "0\n")
	write(t, root, "proc/kallsyms", "ffffffff81000000 T _stext\n")
	// An ELF64 core header with no segments: kcore as VerifyCode opens it.
	h := make([]byte, 64)
	copy(h, "\x7fELF\x02\x01\x01")
	binary.LittleEndian.PutUint16(h[16:], 4)  // ET_CORE
	binary.LittleEndian.PutUint16(h[18:], 62) // EM_X86_64
	binary.LittleEndian.PutUint32(h[20:], 1)
	binary.LittleEndian.PutUint16(h[52:], 64)
	binary.LittleEndian.PutUint16(h[54:], 56)
	binary.LittleEndian.PutUint16(h[58:], 64)
	write(t, root, "proc/kcore", string(h))
	if err := os.MkdirAll(filepath.Join(root, "sys/kernel/livepatch"), 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

func write(t *testing.T, root, name, content string) {
	t.Helper()
	p := filepath.Join(root, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// livepatchModule compiles an object that kmod takes for a livepatch
// module named name for the running kernel; mark tells copies apart.
func livepatchModule(t *testing.T, name, mark string) []byte {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("gcc not installed")
	}
	rel, err := Release()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src := fmt.Sprintf(`__attribute__((section(".modinfo"), used)) static const char info[] = "name=%s\0livepatch=Y\0vermagic=%s SMP preempt mod_unload modversions ";
__attribute__((section(".gnu.linkonce.this_module"), used)) static int this_module;
__attribute__((section(".mark"), used)) static const char mark[] = %q;
`, name, rel, mark)
	if err := os.WriteFile(filepath.Join(dir, "m.c"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("gcc", "-c", "-o", filepath.Join(dir, "m.ko"), filepath.Join(dir, "m.c")).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "m.ko"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("Apply checks for root first; run as root")
	}
}

func expectFor(t *testing.T, k *Kernel, module []byte) *Expect {
	t.Helper()
	rel, err := Release()
	if err != nil {
		t.Fatal(err)
	}
	id, err := k.BuildID()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(module)
	return &Expect{Release: rel, BuildID: id, ModuleSHA256: hex.EncodeToString(sum[:])}
}

// A module file replaced between its verification and its load: the
// kernel must get the bytes that were verified, read through the same
// descriptor, not whatever the path names by then. (Before the fix the
// module was hashed from one open and loaded from another.)
func TestApplyLoadsTheBytesItVerified(t *testing.T) {
	requireRoot(t)
	root := fakeRoot(t)
	good, evil := livepatchModule(t, "lp_fd", "verified"), livepatchModule(t, "lp_fd", "swapped in")
	dir := t.TempDir()
	path := filepath.Join(dir, "lp_fd.ko")
	if err := os.WriteFile(path, good, 0o600); err != nil {
		t.Fatal(err)
	}
	var loaded []byte
	k := &Kernel{Root: root, Poll: 5 * time.Millisecond, finit: func(f *os.File) error {
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		loaded = make([]byte, fi.Size())
		if _, err := f.ReadAt(loaded, 0); err != nil {
			return err
		}
		// The kernel takes the patch: enabled, transition over.
		write(t, root, "sys/kernel/livepatch/lp_fd/enabled", "1\n")
		write(t, root, "sys/kernel/livepatch/lp_fd/transition", "0\n")
		return nil
	}}
	opts := ApplyOptions{Timeout: time.Second, Expect: expectFor(t, k, good), Progress: func(p Progress) {
		if p.Phase != "load" {
			return
		}
		// After the checks, before the load: another file in its place.
		tmp := filepath.Join(dir, "evil.ko")
		if err := os.WriteFile(tmp, evil, 0o600); err != nil {
			t.Error(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Error(err)
		}
	}}
	m, err := k.Apply(context.Background(), path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "lp_fd" {
		t.Errorf("module %q", m.Name)
	}
	if !bytes.Equal(loaded, good) {
		t.Fatalf("the kernel was given %d bytes that are not the verified module (swapped in: %v)", len(loaded), bytes.Equal(loaded, evil))
	}
	// And the file the checks read is the one the hash must match.
	other := livepatchModule(t, "lp_fd", "another")
	if err := os.WriteFile(path, other, 0o600); err != nil {
		t.Fatal(err)
	}
	loaded = nil
	if _, err := k.Apply(context.Background(), path, ApplyOptions{Expect: expectFor(t, k, good)}); err == nil || !strings.Contains(err.Error(), "sha256 differs") || loaded != nil {
		t.Fatalf("a module whose hash differs: %v (loaded %d bytes)", err, len(loaded))
	}
}

// A transition that stalls, then a reverse transition that stalls too:
// Apply must not say the kernel is as it was. Its error is a
// RollbackError naming what is still patched and what holds it.
func TestApplyRollbackFails(t *testing.T) {
	requireRoot(t)
	root := fakeRoot(t)
	module := livepatchModule(t, "lp_fd", "stalls both ways")
	path := filepath.Join(t.TempDir(), "lp_fd.ko")
	if err := os.WriteFile(path, module, 0o600); err != nil {
		t.Fatal(err)
	}
	// Task 10 never leaves the old code, task 11 already runs the new.
	for pid, state := range map[int]string{10: "0", 11: "1"} {
		d := fmt.Sprintf("proc/%d/task/%d/", pid, pid)
		write(t, root, d+"patch_state", state+"\n")
		write(t, root, d+"comm", fmt.Sprintf("stuck-%d\n", pid))
		write(t, root, d+"stack", fmt.Sprintf("[<0>] stuck_%d+0x11/0x30 [helper]\n", pid))
	}
	k := &Kernel{Root: root, Poll: 5 * time.Millisecond, finit: func(f *os.File) error {
		write(t, root, "sys/module/lp_fd/refcnt", "0\n")
		write(t, root, "sys/kernel/livepatch/lp_fd/enabled", "1\n")
		write(t, root, "sys/kernel/livepatch/lp_fd/transition", "1\n")
		return nil
	}}
	_, err := k.Apply(context.Background(), path, ApplyOptions{Timeout: 100 * time.Millisecond})
	if !errors.Is(err, ErrRollbackFailed) {
		t.Fatalf("apply whose rollback stalls: %v, want ErrRollbackFailed", err)
	}
	var re *RollbackError
	if !errors.As(err, &re) {
		t.Fatalf("%T is no RollbackError", err)
	}
	if re.Patch != "lp_fd" || re.Still == nil || re.Still.Enabled || !re.Still.Transition || !re.ModuleLoaded {
		t.Errorf("what is still patched: %+v still %+v", re, re.Still)
	}
	if len(re.Holders) != 1 || re.Holders[0].PID != 11 || re.Holders[0].Comm != "stuck-11" {
		t.Errorf("holders of the reverse transition: %+v, want task 11", re.Holders)
	}
	// The stall that started it is still there to read, not rolled back.
	var te *TransitionError
	if !errors.As(err, &te) || !te.Enabling || te.RolledBack || len(te.Holders) != 1 || te.Holders[0].PID != 10 {
		t.Errorf("the stalled transition: %+v", te)
	}
	for _, want := range []string{"ROLLBACK FAILED", "unpatching lp_fd", "pid 11 (stuck-11)", "the kernel still holds lp_fd", "stitch revert lp_fd"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "the kernel is as it was") {
		t.Errorf("a failed rollback claims the kernel is as it was:\n%v", err)
	}
}

// A module whose pre-patch callback fails is refused by its own callback,
// not for its signature: the kernel log names the object.
func TestRefusingCallback(t *testing.T) {
	log := "livepatch: enabling patch 'p'\nlivepatch: pre-patch callback failed for object 'joydev'\nlivepatch: failed to enable patch 'p'\n"
	if got := refusingCallback(log); got != "joydev" {
		t.Errorf("refusingCallback = %q, want joydev", got)
	}
	if got := refusingCallback("livepatch: enabling patch 'p'\n"); got != "" {
		t.Errorf("refusingCallback without the line = %q", got)
	}
}
