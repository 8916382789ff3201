package build_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// TestCarryKeys builds fixes whose changed functions branch on static
// keys the kernel does not export, which the build rewrites into tests of
// the key (docs/build.md, "Static branches on keys the patch cannot link
// to"), for 6.1.0-54, and runs them in one VM (TestCarryKeysGuest*):
//   - testdata/keys/schedstats.patch: sysctl_schedstats reads
//     sched_schedstats through static_branch_likely (a 5-byte jmp site);
//     the fix makes a read report the state plus 10;
//   - the corpus fix net_openvswitch_conntrack: ovs_ct_execute (changed
//     by the fix) branches on ovs_ct_limit_enabled, a static key of
//     openvswitch.ko (a 5-byte site).
func TestCarryKeys(t *testing.T) {
	testutils.RequireVM(t) // before the builds: skipped with -short
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	var files []vm.File
	for _, b := range []struct{ name, patch, key string }{
		{"stitch_keys_schedstats", "testdata/keys/schedstats.patch", "vmlinux:sysctl_schedstats+0x"},
		{"stitch_keys_ovs", filepath.Join(testutils.Corpus(t), "fixes", "net_openvswitch_conntrack.patch"), "on ovs_ct_limit_enabled"},
	} {
		res, err := e.buildKit(t, b.name, b.patch, "")
		if err != nil {
			t.Fatalf("build %s: %v", b.name, err)
		}
		var lines []string
		for _, sb := range res.Decisions.StaticBranches {
			lines = append(lines, sb.String())
		}
		t.Logf("%s: static branches rewritten: %s", b.name, strings.Join(lines, "; "))
		if !strings.Contains(strings.Join(lines, "\n"), b.key) {
			t.Errorf("%s: the report's rewritten static branches %q lack %q", b.name, lines, b.key)
		}
		files = append(files, vm.File{Src: res.Module, Dst: "/" + b.name + ".ko"})
	}
	testutils.RunGuest(t, "^TestCarryKeysGuest", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

// noKernelTrouble fails the test if log (the kernel's, read in the
// guest) tells of a warning, a BUG, an oops or a lockup.
func noKernelTrouble(t *testing.T, log string) {
	t.Helper()
	if trouble := livepatch.TroubleLines(log); len(trouble) > 0 {
		t.Errorf("the kernel logged trouble: %q\n%s", trouble, log)
	}
}

// The patched sysctl handler follows sched_schedstats with the key off,
// on, and toggled while patched; the revert brings the
// original back.
func TestCarryKeysGuestSchedstats(t *testing.T) {
	testutils.RequireGuest(t)
	const sysctl = "/proc/sys/kernel/sched_schedstats"
	get := func() string { return strings.TrimSpace(read(t, sysctl)) }
	set := func(v string) {
		t.Helper()
		if err := os.WriteFile(sysctl, []byte(v), 0o644); err != nil {
			t.Fatalf("write %s to %s: %v", v, sysctl, err)
		}
	}
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	set("0")
	if got := get(); got != "0" {
		t.Fatalf("unpatched, key off: %s = %s, want 0", sysctl, got)
	}

	stitch(t, "apply", "/stitch_keys_schedstats.ko")
	t.Log("applied") // the steps are logged as they pass: a hang shows where
	if got := get(); got != "10" {
		t.Errorf("patched, key off: %s = %s, want 10", sysctl, got)
	}
	set("1")
	if got := get(); got != "11" {
		t.Errorf("patched, key turned on: %s = %s, want 11", sysctl, got)
	}
	set("0")
	if got := get(); got != "10" {
		t.Errorf("patched, key turned off again: %s = %s, want 10", sysctl, got)
	}
	// A few toggles, not many: each rewrites the key's sites all over
	// the scheduler's hot paths, and under QEMU's TCG that code
	// modification is the slow, fragile part, not the stub.
	for i := 0; i < 4; i++ {
		v := []string{"1", "0"}[i%2]
		set(v)
		if got := get(); got != "1"+v {
			t.Fatalf("patched, toggle %d: %s = %s, want 1%s", i, sysctl, got, v)
		}
	}
	t.Log("patched: followed the key off, on, and toggled")
	set("1")
	stitch(t, "revert", "stitch_keys_schedstats")
	t.Log("reverted")
	if got := get(); got != "1" {
		t.Errorf("reverted, key on: %s = %s, want 1", sysctl, got)
	}
	set("0")
	if got := get(); got != "0" {
		t.Errorf("reverted, key off: %s = %s, want 0", sysctl, got)
	}
	noKernelTrouble(t, kmsg.ReadNew())
}

// net_openvswitch_conntrack patches openvswitch's conntrack action. Its
// effect (a verdict of NF_STOLEN from conntrack or NAT is passed on
// instead of being taken for a drop) shows only on packets that a
// datapath's flow sends through ct() and that netfilter steals (a
// fragment queued for reassembly, a helper that takes the packet): that
// takes an Open vSwitch datapath, a vport and a flow set up over generic
// netlink, which the guest has no tools for. So the test checks that the
// patch applies to the loaded openvswitch, that the kernel redirects
// its functions, and that it reverts, with no warning.
func TestCarryKeysGuestOpenvswitch(t *testing.T) {
	testutils.RequireGuest(t)
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	if err := vm.Modprobe("openvswitch"); err != nil {
		t.Fatal(err)
	}
	stitch(t, "apply", "/stitch_keys_ovs.ko")
	dir := "/sys/kernel/livepatch/stitch_keys_ovs/openvswitch"
	fns, err := filepath.Glob(filepath.Join(dir, "*,*"))
	if err != nil || len(fns) == 0 {
		t.Errorf("no patched function of openvswitch under %s (%v)", dir, err)
	}
	if got := strings.TrimSpace(read(t, filepath.Join(dir, "patched"))); got != "1" {
		t.Errorf("%s/patched = %s, want 1", dir, got)
	}
	stitch(t, "revert", "stitch_keys_ovs")
	if _, err := os.Stat("/sys/kernel/livepatch/stitch_keys_ovs"); err == nil {
		t.Error("the patch is still loaded after the revert")
	}
	noKernelTrouble(t, kmsg.ReadNew())
}
