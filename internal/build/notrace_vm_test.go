package build_test

import (
	"encoding/binary"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// TestNotrace builds the corpus fix net_sctp_protocol with its hooks
// (corpus/6.1/hooks): sctp_v4_xmit changed but is notrace (static
// inline) and reached only through the ops table sctp_af_inet, which the
// hooks re-point to the patch's copy. The guest (TestNotraceGuest*)
// checks the table entry and SCTP traffic through the copy, with apply
// and revert. The other fixes of this part stay refused (docs/build.md).
func TestNotrace(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.DefaultProfile(t)
	e := setup(t, p)
	res, err := e.buildKit(t, "stitch_notrace_sctp", "../../corpus/6.1/fixes/net_sctp_protocol.patch", "../../corpus/6.1/hooks/net_sctp_protocol.c")
	if err != nil {
		t.Fatal(err)
	}
	m := res.Manifest
	if len(m.Objects) != 1 || m.Objects[0].Name != "sctp" || len(m.Objects[0].Notrace) != 1 ||
		m.Objects[0].Notrace[0].Function != "sctp_v4_xmit" || strings.Join(m.Objects[0].Notrace[0].Data, ",") != "sctp_af_inet" {
		t.Errorf("manifest objects %+v, want sctp carrying sctp_v4_xmit reached through sctp_af_inet", m.Objects)
	}
	files := []vm.File{{Src: res.Module, Dst: "/stitch_notrace_sctp.ko"}}
	testutils.RunGuest(t, "^TestNotraceGuest", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

// kernelSymbol returns the address of name in module (kallsyms).
func kernelSymbol(t *testing.T, name, module string) uint64 {
	t.Helper()
	f, err := os.Open("/proc/kallsyms")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tab, err := kallsyms.ParseProc(f)
	if err != nil {
		t.Fatal(err)
	}
	syms := tab.Lookup(module, name)
	if len(syms) == 0 {
		t.Fatalf("no %s [%s] in /proc/kallsyms", name, module)
	}
	return syms[0].Addr
}

// sctpXmit reads sctp_af_inet.sctp_xmit (the struct's first member).
func sctpXmit(t *testing.T) uint64 {
	t.Helper()
	kc, err := (&livepatch.Kernel{}).OpenKcore()
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	b, err := kc.Read(kernelSymbol(t, "sctp_af_inet", "sctp"), 8)
	if err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b)
}

// udpIn is Udp InDatagrams of /proc/net/snmp.
func udpIn(t *testing.T) int {
	t.Helper()
	var head []string
	for _, l := range strings.Split(read(t, "/proc/net/snmp"), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		for i, h := range head {
			if h == "InDatagrams" && i < len(f) {
				n, _ := strconv.Atoi(f[i])
				return n
			}
		}
	}
	t.Fatal("no Udp InDatagrams in /proc/net/snmp")
	return 0
}

// sctpEcho sends a message over an SCTP association on the loopback
// and reads it back on the other side.
func sctpEcho(t *testing.T, port int) {
	t.Helper()
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	sock := func() int {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
		if err != nil {
			t.Fatalf("sctp socket: %v", err)
		}
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
		return fd
	}
	addr := &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}
	srv := sock()
	defer unix.Close(srv)
	unix.SetsockoptInt(srv, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.Bind(srv, addr); err != nil {
		t.Fatalf("bind: %v", err)
	}
	if err := unix.Listen(srv, 1); err != nil {
		t.Fatalf("listen: %v", err)
	}
	cl := sock()
	defer unix.Close(cl)
	if err := unix.Connect(cl, addr); err != nil {
		t.Fatalf("sctp connect: %v", err)
	}
	conn, _, err := unix.Accept(srv)
	if err != nil {
		t.Fatalf("sctp accept: %v", err)
	}
	defer unix.Close(conn)
	unix.SetsockoptTimeval(conn, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if _, err := unix.Write(cl, []byte("stitch-ping")); err != nil {
		t.Fatalf("sctp write: %v", err)
	}
	buf := make([]byte, 64)
	n, err := unix.Read(conn, buf)
	if err != nil || string(buf[:n]) != "stitch-ping" {
		t.Fatalf("sctp read: %q, %v; want stitch-ping", buf[:n], err)
	}
}

// The fix's effect (bottom halves disabled around the UDP tunnel
// transmit) shows only as the absence of a rare race, so the guest checks
// what user space can: the table entry is the copy exactly while the
// patch is on, and SCTP over UDP encapsulation (the branch the fix
// changes) carries data through it.
func TestNotraceGuestSCTP(t *testing.T) {
	testutils.RequireGuest(t)
	if err := vm.Modprobe("sctp"); err != nil {
		t.Fatal(err)
	}
	if err := vm.LinkUp("lo"); err != nil {
		t.Fatal(err)
	}
	// Encapsulate in UDP (RFC 6951) on the loopback, both ways.
	for _, s := range []string{"udp_port", "encap_port"} {
		if err := os.WriteFile("/proc/sys/net/sctp/"+s, []byte("9899"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	kmsg.ReadNew() // what loading sctp printed
	defer func() {
		noKernelTrouble(t, kmsg.ReadNew()) // while the patch was applied, used or reverted
	}()
	old := kernelSymbol(t, "sctp_v4_xmit", "sctp")
	if got := sctpXmit(t); got != old {
		t.Fatalf("unpatched: sctp_af_inet.sctp_xmit = %#x, want sctp_v4_xmit %#x", got, old)
	}
	echo := func(when string, port int) {
		before := udpIn(t)
		sctpEcho(t, port)
		if after := udpIn(t); after <= before {
			t.Errorf("%s: Udp InDatagrams %d -> %d: the association was not UDP-encapsulated", when, before, after)
		}
	}
	echo("unpatched", 5001)

	stitch(t, "apply", "/stitch_notrace_sctp.ko")
	copyAddr := kernelSymbol(t, "__stitch_new__sctp_v4_xmit", "stitch_notrace_sctp")
	if got := sctpXmit(t); got != copyAddr {
		t.Errorf("patched: sctp_af_inet.sctp_xmit = %#x, want the patch's copy %#x", got, copyAddr)
	}
	echo("patched", 5002)

	stitch(t, "revert", "stitch_notrace_sctp")
	if got := sctpXmit(t); got != old {
		t.Errorf("reverted: sctp_af_inet.sctp_xmit = %#x, want sctp_v4_xmit %#x", got, old)
	}
	echo("reverted", 5003)
}
