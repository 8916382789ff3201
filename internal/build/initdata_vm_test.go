package build_test

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// initDataFixes are the corpus fixes whose __init/__exit changes go live
// with their hooks (corpus/6.1/hooks), by module name.
var initDataFixes = []struct{ module, fix string }{
	{"stitch_initdata_nullblk", "drivers_block_null_blk_main"},
	{"stitch_initdata_ip6mr", "net_ipv6_ip6mr"},
	{"stitch_initdata_ebf", "net_bridge_netfilter_ebtable_filter"},
	{"stitch_initdata_smc", "net_smc_af_smc"},
}

// TestInitData builds the corpus fixes that change __init or __exit code
// with their hooks for 6.1.0-54 and runs them in one VM
// (TestInitDataGuest*): smc's TCP ULP goes away and comes back, the
// fixed exit functions of smc and ebtable_filter run at unload, and
// null_blk and ip6mr apply and revert.
func TestInitData(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	var files []vm.File
	for _, f := range initDataFixes {
		res, err := e.buildKit(t, f.module, "../../corpus/6.1/fixes/"+f.fix+".patch", "../../corpus/6.1/hooks/"+f.fix+".c")
		if err != nil {
			t.Fatalf("build %s: %v", f.fix, err)
		}
		files = append(files, vm.File{Src: res.Module, Dst: "/" + f.module + ".ko"})
	}
	testutils.RunGuest(t, "^TestInitDataGuest", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

// rmmod unloads a module, waiting for its last users to go.
func rmmod(t *testing.T, name string) {
	t.Helper()
	var err error
	for i := 0; i < 50; i++ {
		if err = unix.DeleteModule(name, unix.O_NONBLOCK); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("rmmod %s: %v", name, err)
}

// smcULP asks for the "smc" TCP ULP on a new TCP socket without letting
// it convert the socket: the socket has O_ASYNC set, which smc's ULP init
// refuses (ENOTCONN) before it touches anything. Converting a socket
// through the unpatched ULP is the bug the fix removes (it crashes the
// kernel at close in 6.1.0-54). ENOTCONN: the ULP is registered; ENOENT:
// it is not.
func smcULP(t *testing.T) error {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, unix.O_ASYNC); err != nil {
		t.Fatal(err)
	}
	return unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "smc")
}

// smc: the fix removes the TCP ULP that smc_init registered. The
// pre-patch callback unregisters it from the live module, the revert
// registers it again, and an unload while patched runs the fixed exit
// (which has no ULP to unregister).
func TestInitDataGuestSmc(t *testing.T) {
	testutils.RequireGuest(t)
	if err := vm.Modprobe("smc"); err != nil {
		t.Fatal(err)
	}
	if err := smcULP(t); !errors.Is(err, unix.ENOTCONN) {
		t.Fatalf("unpatched: setsockopt(TCP_ULP, smc) = %v, want ENOTCONN (smc's ULP refusing an O_ASYNC socket)", err)
	}
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	stitch(t, "apply", "/stitch_initdata_smc.ko")
	if err := smcULP(t); !errors.Is(err, unix.ENOENT) {
		t.Errorf("patched: setsockopt(TCP_ULP, smc) = %v, want ENOENT (no such ULP)", err)
	}
	stitch(t, "revert", "stitch_initdata_smc")
	if err := smcULP(t); !errors.Is(err, unix.ENOTCONN) {
		t.Errorf("reverted: setsockopt(TCP_ULP, smc) = %v, want ENOTCONN (the ULP registered again)", err)
	}
	stitch(t, "apply", "/stitch_initdata_smc.ko")
	rmmod(t, "smc")
	stitch(t, "revert", "stitch_initdata_smc")
	log := kmsg.ReadNew()
	for _, want := range []string{`smc: TCP ULP "smc" unregistered`, "smc: fixed exit"} {
		if !strings.Contains(log, want) {
			t.Errorf("kernel log lacks %q:\n%s", want, log)
		}
	}
	noKernelTrouble(t, log)
}

// ebtable_filter: the fixed exit (template first) runs at unload while
// the patch is on, for the module loaded after the patch (at_load) and
// for the one loaded before it; after the revert the old exit runs. Each
// load of ebtable_filter is the first under a given livepatch module: on
// 6.1 the kernel does not clear a livepatch's klp relocations when the
// patched module unloads (it does from 6.5 on), so loading that module
// again while the same livepatch is on fails (ENOEXEC, "Skipping invalid
// relocation target").
func TestInitDataGuestEbtableFilter(t *testing.T) {
	testutils.RequireGuest(t)
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	const fixed = "ebtable_filter: fixed exit"
	stitch(t, "apply", "/stitch_initdata_ebf.ko")
	if err := vm.Modprobe("ebtable_filter"); err != nil {
		t.Fatal(err)
	}
	rmmod(t, "ebtable_filter")
	stitch(t, "revert", "stitch_initdata_ebf")
	if log := kmsg.ReadNew(); strings.Count(log, fixed) != 1 {
		t.Errorf("unload of the module loaded after the patch: want the fixed exit's line once:\n%s", log)
	}

	if err := vm.Modprobe("ebtable_filter"); err != nil {
		t.Fatal(err)
	}
	stitch(t, "apply", "/stitch_initdata_ebf.ko")
	rmmod(t, "ebtable_filter")
	stitch(t, "revert", "stitch_initdata_ebf")
	if log := kmsg.ReadNew(); strings.Count(log, fixed) != 1 {
		t.Errorf("unload of the module loaded before the patch: want the fixed exit's line once:\n%s", log)
	}

	if err := vm.Modprobe("ebtable_filter"); err != nil {
		t.Fatal(err)
	}
	stitch(t, "apply", "/stitch_initdata_ebf.ko")
	stitch(t, "revert", "stitch_initdata_ebf")
	rmmod(t, "ebtable_filter")
	log := kmsg.ReadNew()
	if strings.Contains(log, fixed) {
		t.Errorf("unload after the revert ran the fixed exit:\n%s", log)
	}
	noKernelTrouble(t, log)
}

// null_blk: the changed store functions take a lock (not observable from
// user space) and null_del_dev now frees the zones; the init change is
// on a failure path. Applied with null_blk loaded, which is unloaded
// while patched (null_del_dev's new code runs), then reverted.
func TestInitDataGuestNullBlk(t *testing.T) {
	testutils.RequireGuest(t)
	if err := vm.Modprobe("null_blk"); err != nil {
		t.Fatal(err)
	}
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	stitch(t, "apply", "/stitch_initdata_nullblk.ko")
	if got := strings.TrimSpace(read(t, "/sys/kernel/livepatch/stitch_initdata_nullblk/enabled")); got != "1" {
		t.Errorf("enabled = %s", got)
	}
	if _, err := os.Stat("/sys/block/nullb0"); err != nil {
		t.Errorf("nullb0: %v", err)
	}
	rmmod(t, "null_blk")
	stitch(t, "revert", "stitch_initdata_nullblk")
	noKernelTrouble(t, kmsg.ReadNew())
}

// ip6mr: the dst drops are in paths user space reaches only as a
// multicast routing daemon with traffic; the hooks' SLAB_ACCOUNT step
// logs what it did to ip6_mrt_cache. Apply and revert.
func TestInitDataGuestIp6mr(t *testing.T) {
	testutils.RequireGuest(t)
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	stitch(t, "apply", "/stitch_initdata_ip6mr.ko")
	stitch(t, "revert", "stitch_initdata_ip6mr")
	log := kmsg.ReadNew()
	if !strings.Contains(log, "ip6mr: ip6_mrt_cache") {
		t.Errorf("no line from the pre-patch callback:\n%s", log)
	}
	noKernelTrouble(t, log)
}
