package build_test

import (
	"context"
	"encoding/json"
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

// kpatchDir holds kpatch's linux-6.2.0 integration patches (ORIGIN.md).
const kpatchDir = "testdata/kpatch-linux-6.2.0"

// kpatchCase is what Stitch must do with one of kpatch's patches: build
// a module that loads, passes the patch's -LOADED check (its Go version
// in kpatchChecks) and reverts; or refuse it (kpatch's -FAIL patches),
// naming why.
type kpatchCase struct {
	name   string
	refuse error  // nil: must build and load
	reason string // what the refusal must say
}

var kpatchSuite = []kpatchCase{
	{name: "data-new"},
	{name: "gcc-static-local-var-6"},
	{name: "macro-callbacks"},
	{name: "module"},
	{name: "new-function"},
	{name: "new-globals"},
	{name: "shadow-newpid"},
	{name: "special-static"},
	{name: "syscall"},
	// kpatch refuses it because a module built from it would carry
	// symbol versions (CRCs) the kernel's exports do not have. On 6.1 the
	// changes compile to the same code (barrier() in usb_get_dev, a new
	// include in core.c), so Stitch builds nothing; and when it does
	// build, a module's symbol versions come from the target kernel's
	// Module.symvers, not from the fix's tree.
	{name: "symvers-disagreement-FAIL", refuse: build.ErrNothing, reason: "drivers/usb/core/usb.c"},
	// Only line numbers move: there is nothing to patch.
	{name: "warn-detect-FAIL", refuse: build.ErrNothing, reason: "arch/x86/kvm/x86.c (only line numbers moved, in prepare_emulation_failure_exit)"},
}

// kpatchPatch is the patch file for the default kernel: the 6.1
// adjustment when there is one, else kpatch's original.
func kpatchPatch(name string) string {
	if p := filepath.Join(kpatchDir, name+".6.1.patch"); fileExists(p) {
		return p
	}
	return filepath.Join(kpatchDir, name+".patch")
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestKpatchSuite builds each of kpatch's integration patches for the
// default kernel as written (diff -Nupr, src.orig/ and src/), checks the
// refusals, then boots the kernel and, for each module, applies it, runs
// the patch's -LOADED check and reverts it (TestKpatchGuest).
func TestKpatchSuite(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	var files []vm.File
	var loaded []string
	for _, c := range kpatchSuite {
		v, err := build.LoadFix(kpatchPatch(c.name))
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		f, err := v.For(p.Series)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		work := t.TempDir()
		src := &build.TreeSource{Tree: e.tree, HeadersDir: p.HeadersDir, Work: work}
		start := time.Now()
		name := "kp_" + strings.ReplaceAll(c.name, "-", "_")
		res, err := build.Build(ctx, src, e.kernel, []*build.Fix{f}, build.Options{Out: t.TempDir(), Work: work, Name: name})
		cancel()
		t.Logf("build %s: %.1fs, err %v", c.name, time.Since(start).Seconds(), err)
		switch {
		case c.refuse != nil:
			if !errors.Is(err, c.refuse) || !strings.Contains(err.Error(), c.reason) {
				t.Errorf("%s: %v; want %v saying %q", c.name, err, c.refuse, c.reason)
			}
		case err != nil:
			t.Errorf("%s: %v", c.name, err)
		default:
			if c.name == "macro-callbacks" {
				// Three files, each with kpatch's four callbacks for its
				// object; only aio.c is in vmlinux.
				var objs []string
				for _, o := range res.Manifest.Objects {
					objs = append(objs, o.Name+":"+strings.Join(o.Callbacks, ","))
				}
				all := "pre_patch,post_patch,pre_unpatch,post_unpatch"
				if got, want := strings.Join(objs, " "), "joydev:"+all+" pcspkr:"+all+" vmlinux:"+all; got != want {
					t.Errorf("macro-callbacks: objects %s, want %s", got, want)
				}
			}
			files = append(files, vm.File{Src: res.Module, Dst: "/kpatch/" + c.name + ".ko"})
			loaded = append(loaded, c.name+"="+name)
		}
	}
	if len(loaded) == 0 {
		t.Fatal("no patch built")
	}
	list := filepath.Join(t.TempDir(), "list")
	if err := os.WriteFile(list, []byte(strings.Join(loaded, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	files = append(files, vm.File{Src: list, Dst: "/kpatch/list"})
	testutils.RunGuest(t, "^TestKpatchGuest$", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files, Memory: 1024})
}

// kpatchChecks are the -LOADED checks of kpatch's suite in Go (the guest
// has no shell): each returns what is wrong, or "".
var kpatchChecks = map[string]func(t *testing.T) string{
	// data-new-LOADED.test: grep "kpatch:         5" /proc/meminfo
	"data-new": func(t *testing.T) string {
		return wantIn(t, "/proc/meminfo", "kpatch:         5")
	},
	// module-LOADED.test: modprobe xfs; dynamic debug on for
	// fs/xfs/xfs_stats.c; /sys/fs/xfs/stats/stats says kpatch, and the
	// kernel log has "kpatch: pr_debug".
	"module": func(t *testing.T) string {
		if err := vm.Modprobe("xfs"); err != nil {
			return err.Error()
		}
		if err := unix.Mount("debugfs", "/sys/kernel/debug", "debugfs", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return "mount debugfs: " + err.Error()
		}
		if err := os.WriteFile("/sys/kernel/debug/dynamic_debug/control", []byte("file fs/xfs/xfs_stats.c +p"), 0); err != nil {
			return "dynamic debug: " + err.Error()
		}
		if msg := wantIn(t, "/sys/fs/xfs/stats/stats", "kpatch"); msg != "" {
			return msg
		}
		// The table comes from the running xfs's xstats (xstats.0
		// there, xstats.2 in the post-fix object).
		if msg := wantIn(t, "/sys/fs/xfs/stats/stats", "extent_alloc "); msg != "" {
			return msg
		}
		return wantInKernelLog("kpatch: pr_debug")
	},
	// No -LOADED test: the function new in cmdline.c, which meminfo.c
	// calls, is the patch module's, and /proc/meminfo still reads.
	"new-globals": func(t *testing.T) string {
		b, err := os.ReadFile("/proc/kallsyms")
		if err != nil {
			return err.Error()
		}
		if !strings.Contains(string(b), " kpatch_print_message\t[kp_new_globals]") {
			return "kpatch_print_message is not the patch module's in kallsyms"
		}
		return wantIn(t, "/proc/meminfo", "MemTotal:")
	},
	// shadow-newpid-LOADED.test: a process forked after the patch has
	// "newpid:" in its /proc/PID/status.
	"shadow-newpid": func(t *testing.T) string {
		out, err := exec.Command("/guest.test", "-test.run=^TestKpatchGuestStatus$").Output()
		if err != nil {
			return "child: " + err.Error()
		}
		if !strings.Contains(string(out), "newpid:") {
			return "a new process's status has no newpid: line"
		}
		return ""
	},
	// syscall-LOADED.test: uname -s | grep -q kpatch
	"syscall": func(t *testing.T) string {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return err.Error()
		}
		if s := unix.ByteSliceToString(u.Sysname[:]); !strings.Contains(s, "kpatch") {
			return "uname -s = " + s
		}
		return ""
	},
	// No -LOADED test: the callbacks print their names for vmlinux as
	// the patch loads, and for a patched module as it loads later.
	"macro-callbacks": func(t *testing.T) string {
		if msg := wantInKernelLog("post_patch_callback: vmlinux"); msg != "" {
			return msg
		}
		if err := vm.Modprobe("joydev"); err != nil {
			return err.Error()
		}
		if msg := wantInKernelLog("post_patch_callback: joydev -> [MODULE_STATE_COMING]"); msg != "" {
			return msg
		}
		if err := unix.DeleteModule("joydev", 0); err != nil {
			return "unload joydev: " + err.Error()
		}
		return wantInKernelLog("post_unpatch_callback: joydev -> [MODULE_STATE_GOING]")
	},
}

// kpatchReverted check that a reverted patch's effect is gone.
var kpatchReverted = map[string]func(t *testing.T) string{
	"data-new": func(t *testing.T) string { return wantOut(t, "/proc/meminfo", "kpatch:") },
	"module":   func(t *testing.T) string { return wantOut(t, "/sys/fs/xfs/stats/stats", "kpatch") },
	"syscall": func(t *testing.T) string {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return err.Error()
		}
		if s := unix.ByteSliceToString(u.Sysname[:]); s != "Linux" {
			return "uname -s = " + s
		}
		return ""
	},
	"macro-callbacks": func(t *testing.T) string { return wantInKernelLog("post_unpatch_callback: vmlinux") },
}

func wantOut(t *testing.T, path, s string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if strings.Contains(string(b), s) {
		return path + " still has " + s
	}
	return ""
}

func wantIn(t *testing.T, path, s string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if !strings.Contains(string(b), s) {
		return path + " lacks " + s
	}
	return ""
}

// wantInKernelLog reads the whole kernel log, as dmesg does.
func wantInKernelLog(s string) string {
	n, err := unix.Klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, nil)
	if err != nil {
		return "syslog: " + err.Error()
	}
	buf := make([]byte, n)
	n, err = unix.Klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf)
	if err != nil {
		return "syslog: " + err.Error()
	}
	if !strings.Contains(string(buf[:n]), s) {
		return "the kernel log lacks " + s
	}
	return ""
}

// TestKpatchGuestStatus prints this process's status: the
// shadow-newpid check runs it as a process forked after the patch.
func TestKpatchGuestStatus(t *testing.T) {
	testutils.RequireGuest(t)
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	os.Stdout.Write(b)
}

// TestKpatchGuest applies each built module of kpatch's suite, runs its
// check, and reverts it; nothing may stay loaded.
func TestKpatchGuest(t *testing.T) {
	testutils.RequireGuest(t)
	list, err := os.ReadFile("/kpatch/list")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(list), "\n") {
		name, patch, _ := strings.Cut(l, "=")
		t.Run(name, func(t *testing.T) {
			kmsg := livepatch.OpenKernelLog()
			defer kmsg.Close()
			out, err := exec.Command("stitch", "apply", "--json", "/kpatch/"+name+".ko").CombinedOutput()
			if err != nil {
				t.Fatalf("apply: %v\n%s", err, out)
			}
			if check := kpatchChecks[name]; check != nil {
				if msg := check(t); msg != "" {
					t.Errorf("check while loaded: %s", msg)
				}
			}
			if out, err := exec.Command("stitch", "revert", patch).CombinedOutput(); err != nil {
				t.Fatalf("revert: %v\n%s", err, out)
			}
			if check := kpatchReverted[name]; check != nil {
				if msg := check(t); msg != "" {
					t.Errorf("check after revert: %s", msg)
				}
			}
			noKernelTrouble(t, kmsg.ReadNew())
		})
	}
	var st struct {
		Patches []json.RawMessage `json:"patches"`
	}
	out, _ := exec.Command("stitch", "status", "--json").Output()
	if err := json.Unmarshal(out, &st); err != nil || len(st.Patches) != 0 {
		t.Errorf("after the suite: %v, patches %s", err, out)
	}
}
