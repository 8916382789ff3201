package build_test

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// TestCarryLayout builds the livepatch forms of the 6.1 corpus's fixes
// that change a struct's layout or patch a kernel thread's loop
// (corpus/6.1/livepatch, docs/fix-author.md) and runs them in ONE VM
// (TestCarryLayoutGuest*).
func TestCarryLayout(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	var files []vm.File
	for _, name := range []string{"net_netlink_genetlink", "net_core_pktgen", "net_tipc_crypto", "net_tipc_udp_media", "net_sunrpc_auth_gss_svcauth_gss"} {
		res, err := e.buildKit(t, "stitch_"+name, filepath.Join("../../corpus/6.1/livepatch", name+".patch"), "")
		if err != nil {
			t.Fatalf("build %s: %v", name, err)
		}
		files = append(files, vm.File{Src: res.Module, Dst: "/stitch_" + name + ".ko"})
	}
	testutils.RunGuest(t, "^TestCarryLayoutGuest", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

func refcnt(t *testing.T, module string) string {
	t.Helper()
	return strings.TrimSpace(read(t, "/sys/module/"+module+"/refcnt"))
}

// startPolicyDump asks genetlink's controller for the policies of family
// (CTRL_CMD_GETPOLICY, a dump) and reads nothing: the dump stays in
// progress after its first message. It returns the socket.
func startPolicyDump(t *testing.T, family string) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_GENERIC)
	if err != nil {
		t.Fatal(err)
	}
	name := append([]byte(family), 0)
	attrLen := 4 + len(name)
	attr := make([]byte, (attrLen+3)&^3)
	binary.LittleEndian.PutUint16(attr, uint16(attrLen))
	binary.LittleEndian.PutUint16(attr[2:], unix.CTRL_ATTR_FAMILY_NAME)
	copy(attr[4:], name)
	msg := make([]byte, unix.NLMSG_HDRLEN+4, unix.NLMSG_HDRLEN+4+len(attr))
	msg = append(msg, attr...)
	binary.LittleEndian.PutUint32(msg, uint32(len(msg)))
	binary.LittleEndian.PutUint16(msg[4:], unix.GENL_ID_CTRL)
	binary.LittleEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	msg[unix.NLMSG_HDRLEN] = unix.CTRL_CMD_GETPOLICY
	msg[unix.NLMSG_HDRLEN+1] = 1
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		t.Fatalf("policy dump of %s: %v", family, err)
	}
	return fd
}

// finishDump reads the dump to its end and returns how many reads it took.
func finishDump(t *testing.T, fd int) int {
	t.Helper()
	defer unix.Close(fd)
	buf := make([]byte, 1<<16)
	for reads := 1; ; reads++ {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatalf("policy dump: %v", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			t.Fatalf("policy dump: %v", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return reads
			case unix.NLMSG_ERROR:
				t.Fatalf("policy dump: error %d", int32(binary.LittleEndian.Uint32(m.Data)))
			}
		}
	}
}

// net_netlink_genetlink: with the fix, a policy dump of a module's family
// holds the module (its refcnt is one higher) until the dump ends; the
// livepatch form keeps that reference in a shadow variable. A dump started
// before the patch holds none and ends cleanly under it; one started
// under the patch and left running over the revert gives its reference
// back at the revert (post-unpatch callback).
func TestCarryLayoutGuestGenetlinkPolicyDump(t *testing.T) {
	testutils.RequireGuest(t)
	defer checkKernelLog(t)()
	if err := vm.Modprobe("tipc"); err != nil {
		t.Fatal(err)
	}
	base := refcnt(t, "tipc")
	fd := startPolicyDump(t, "TIPCv2")
	if got := refcnt(t, "tipc"); got != base {
		t.Errorf("unpatched, dump in progress: tipc refcnt %s, want %s", got, base)
	}
	stitch(t, "apply", "/stitch_net_netlink_genetlink.ko")
	if reads := finishDump(t, fd); reads < 2 {
		t.Fatalf("the TIPCv2 policy dump took %d read: it must span several for this test", reads)
	}
	if got := refcnt(t, "tipc"); got != base {
		t.Errorf("patched, a dump started before the patch ended: tipc refcnt %s, want %s", got, base)
	}
	fd = startPolicyDump(t, "TIPCv2")
	if got, want := refcnt(t, "tipc"), inc(t, base); got != want {
		t.Errorf("patched, dump in progress: tipc refcnt %s, want %s (the dump holds the module)", got, want)
	}
	finishDump(t, fd)
	if got := refcnt(t, "tipc"); got != base {
		t.Errorf("patched, dump ended: tipc refcnt %s, want %s", got, base)
	}
	fd = startPolicyDump(t, "TIPCv2")
	stitch(t, "revert", "stitch_net_netlink_genetlink")
	if got := refcnt(t, "tipc"); got != base {
		t.Errorf("reverted with a dump in progress: tipc refcnt %s, want %s (given back at the revert)", got, base)
	}
	finishDump(t, fd)
	if got := refcnt(t, "tipc"); got != base {
		t.Errorf("reverted, dump ended: tipc refcnt %s, want %s", got, base)
	}
}

func inc(t *testing.T, n string) string {
	t.Helper()
	i, err := strconv.Atoi(n)
	if err != nil {
		t.Fatalf("refcnt %q: %v", n, err)
	}
	return strconv.Itoa(i + 1)
}

// pktgenThread is the pid of kpktgend_0.
func pktgenThread(t *testing.T) string {
	t.Helper()
	ds, _ := os.ReadDir("/proc")
	for _, d := range ds {
		if c, err := os.ReadFile("/proc/" + d.Name() + "/comm"); err == nil && strings.TrimSpace(string(c)) == "kpktgend_0" {
			return d.Name()
		}
	}
	t.Fatal("no kpktgend_0 thread")
	return ""
}

func pktgenWrite(t *testing.T, file, cmd string) {
	t.Helper()
	// pgctrl drops a command's last byte, the newline echo adds.
	if err := os.WriteFile("/proc/net/pktgen/"+file, []byte(cmd+"\n"), 0o600); err != nil {
		t.Fatalf("echo %q > /proc/net/pktgen/%s: %v", cmd, file, err)
	}
}

// pktgenRun sends 10 packets out of lo on kpktgend_0 and checks pktgen's
// result.
func pktgenRun(t *testing.T, when string) {
	t.Helper()
	pktgenWrite(t, "kpktgend_0", "add_device lo")
	pktgenWrite(t, "lo", "count 10")
	pktgenWrite(t, "pgctrl", "start")
	if res := read(t, "/proc/net/pktgen/lo"); !strings.Contains(res, "Result: OK") {
		t.Errorf("%s: pktgen run on lo: %s", when, res)
	}
	pktgenRemoveAll(t)
}

// pktgenRemoveAll removes kpktgend_0's devices and waits until the thread
// has: it does so on its next round, after the write returns.
func pktgenRemoveAll(t *testing.T) {
	t.Helper()
	pktgenWrite(t, "kpktgend_0", "rem_device_all")
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat("/proc/net/pktgen/lo"); os.IsNotExist(err) {
			return
		}
	}
	t.Fatal("kpktgend_0 still has lo 10s after rem_device_all")
}

// net_core_pktgen: the kpktgend_N threads never leave
// pktgen_thread_worker, which the fix patches; the livepatch form restarts
// them around the transition (new pids), refuses while a thread has a
// device, and pktgen works before, with and after the patch. The fix's
// own change (pg_net_init under cpus_read_lock) shows only when a CPU
// goes offline while a namespace starts: not reached here.
func TestCarryLayoutGuestPktgen(t *testing.T) {
	testutils.RequireGuest(t)
	defer checkKernelLog(t)()
	if err := vm.Modprobe("pktgen"); err != nil {
		t.Fatal(err)
	}
	if err := vm.LinkUp("lo"); err != nil {
		t.Fatal(err)
	}
	pktgenRun(t, "unpatched")
	before := pktgenThread(t)

	pktgenWrite(t, "kpktgend_0", "add_device lo")
	if out, err := runStitch("apply", "/stitch_net_core_pktgen.ko"); err == nil {
		t.Fatalf("apply with a device on kpktgend_0 succeeded:\n%s", out)
	} else if !strings.Contains(out, "pre-patch callback for pktgen refused it") {
		t.Errorf("apply with a device on kpktgend_0 failed otherwise:\n%s", out)
	}
	pktgenRemoveAll(t)

	stitch(t, "apply", "/stitch_net_core_pktgen.ko")
	patched := pktgenThread(t)
	if patched == before {
		t.Errorf("kpktgend_0 is still pid %s: not restarted", before)
	}
	read(t, "/proc/net/pktgen/kpktgend_0")
	pktgenRun(t, "patched")

	stitch(t, "revert", "stitch_net_core_pktgen")
	if pktgenThread(t) == patched {
		t.Errorf("kpktgend_0 is still pid %s after the revert: not restarted", patched)
	}
	pktgenRun(t, "reverted")
}

// net_tipc_crypto, net_tipc_udp_media, net_sunrpc_auth_gss_svcauth_gss:
// their effects need a second TIPC node with keys, a UDP bearer's peers,
// or an NFS server with Kerberos: apply and revert only, with their
// modules loaded (the callbacks of the tipc forms run over live
// namespaces).
func TestCarryLayoutGuestApplyRevert(t *testing.T) {
	testutils.RequireGuest(t)
	defer checkKernelLog(t)()
	for _, m := range []string{"tipc", "auth_rpcgss"} {
		if err := vm.Modprobe(m); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"net_tipc_crypto", "net_tipc_udp_media", "net_sunrpc_auth_gss_svcauth_gss"} {
		stitch(t, "apply", "/stitch_"+name+".ko")
		stitch(t, "revert", "stitch_"+name)
	}
}

// checkKernelLog starts watching the kernel log; the function it returns
// fails the test if the kernel logged trouble meanwhile.
func checkKernelLog(t *testing.T) func() {
	kmsg := livepatch.OpenKernelLog()
	return func() {
		t.Helper()
		defer kmsg.Close()
		noKernelTrouble(t, kmsg.ReadNew())
	}
}
