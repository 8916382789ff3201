package build_test

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// TestNewSymbolInOtherObject builds Stitch's newsym_module fix: xfs
// calls a function new in vmlinux's af_netlink.c that reads a static of
// its own file, so the patch needs a klp_object for vmlinux with no
// function to patch, for that klp relocation; then checks it live
// (TestNewSymbolGuest). kpatch's patches that add symbols (module,
// new-globals, data-new, new-function, special-static) are in
// TestKpatchSuite.
func TestNewSymbolInOtherObject(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	// Stitch's own: a new function of vmlinux that xfs calls and that
	// reads a static of its file needs a klp_object for vmlinux with no
	// function to patch, for its klp relocation.
	res, err := e.build(t, "newsym_module", "")
	if err != nil {
		t.Fatalf("build newsym_module: %v", err)
	}
	var objs []string
	for _, o := range res.Manifest.Objects {
		objs = append(objs, fmt.Sprintf("%s:%d", o.Name, len(o.Functions)))
	}
	if strings.Join(objs, " ") != "vmlinux:0 xfs:1" {
		t.Errorf("newsym_module's objects (name:functions) = %v, want vmlinux:0 xfs:1", objs)
	}
	files := []vm.File{{Src: res.Module, Dst: "/newsym_module.ko"}}
	if t.Failed() {
		return
	}
	testutils.RunGuest(t, "^TestNewSymbolGuest$", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

// newsym_module: the patched xfs_stats_format calls the patch module's
// copy of a function new in vmlinux's af_netlink.c, which reads that
// file's nl_table_users through a klp relocation of a klp_object
// (vmlinux) with no function.
func TestNewSymbolGuest(t *testing.T) {
	testutils.RequireGuest(t)
	stitch(t, "apply", "/newsym_module.ko")
	if _, err := os.Stat("/sys/kernel/livepatch/stitch_newsym_module/vmlinux"); err != nil {
		t.Errorf("no vmlinux object in the patch: %v", err)
	}
	if err := vm.Modprobe("xfs"); err != nil {
		t.Fatalf("load xfs: %v", err)
	}
	if stats := read(t, "/sys/fs/xfs/stats/stats"); !strings.Contains(stats, "\nstitch-netlink\n") {
		t.Errorf("patched /sys/fs/xfs/stats/stats has no stitch-netlink line:\n%s", stats)
	}
	stitch(t, "revert", "stitch_newsym_module")
	if stats := read(t, "/sys/fs/xfs/stats/stats"); strings.Contains(stats, "stitch-netlink") {
		t.Errorf("reverted stats still have the line")
	}
	if err := unix.DeleteModule("xfs", 0); err != nil {
		t.Errorf("unload xfs: %v", err)
	}
}
