package corpus

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/vm"
)

// A workload exercises one part of the kernel and says whether it worked.
// The guest runs the workloads before applying a patch and again with the
// patch applied: one that worked before and fails after is a regression
// the patch caused.
type workload struct {
	name string
	// when tells whether the workload fits a fix to this source file
	// (nil: every fix).
	when func(file string) bool
	run  func() error
}

func under(prefixes ...string) func(string) bool {
	return func(file string) bool {
		for _, p := range prefixes {
			if strings.HasPrefix(file, p) {
				return true
			}
		}
		return false
	}
}

// workloads are the common paths every fix is checked against, and the
// obvious exercise of a few subsystems.
var workloads = []workload{
	{name: "proc", run: readProc},
	{name: "files", run: fileRoundTrip},
	{name: "pipe", run: pipeRoundTrip},
	{name: "unix-socket", run: unixRoundTrip},
	{name: "tcp-loopback", when: under("net/", "include/net/", "drivers/net/"), run: func() error { return loopback("tcp") }},
	{name: "udp-loopback", when: under("net/", "include/net/", "drivers/net/"), run: func() error { return loopback("udp") }},
	{name: "sctp-loopback", when: under("net/sctp/"), run: sctpLoopback},
	{name: "af-alg-hash", when: under("crypto/"), run: afAlgHash},
}

// runWorkloads runs the workloads that fit file and returns the names of
// those that failed, with their errors.
func runWorkloads(file string) map[string]error {
	failed := map[string]error{}
	for _, w := range workloads {
		if w.when != nil && !w.when(file) {
			continue
		}
		if err := w.run(); err != nil {
			failed[w.name] = err
		}
	}
	return failed
}

// fits tells whether the workload fits a fix to any of files.
func (w workload) fits(files []string) bool {
	if w.when == nil {
		return true
	}
	for _, f := range files {
		if w.when(f) {
			return true
		}
	}
	return false
}

// runWorkloadsFor runs the workloads that fit any of files (a level's
// fixes) and returns those that failed, with their errors.
func runWorkloadsFor(files []string) map[string]error {
	failed := map[string]error{}
	for _, w := range workloads {
		if w.fits(files) {
			if err := w.run(); err != nil {
				failed[w.name] = err
			}
		}
	}
	return failed
}

// workloadsFor names the workloads that fit any of files.
func workloadsFor(files []string) []string {
	var out []string
	for _, w := range workloads {
		if w.fits(files) {
			out = append(out, w.name)
		}
	}
	return out
}

// regressions are the workloads that failed after but not before.
func regressions(before, after map[string]error) []string {
	var out []string
	for _, w := range workloads {
		if err, ok := after[w.name]; ok {
			if _, wasFailing := before[w.name]; !wasFailing {
				out = append(out, fmt.Sprintf("%s: %v", w.name, err))
			}
		}
	}
	return out
}

func readProc() error {
	for _, p := range []string{"/proc/cmdline", "/proc/filesystems", "/proc/self/status", "/proc/meminfo", "/proc/modules", "/proc/self/maps"} {
		if _, err := os.ReadFile(p); err != nil {
			return err
		}
	}
	for _, d := range []string{"/", "/proc", "/sys/kernel", "/tmp"} {
		if _, err := os.ReadDir(d); err != nil {
			return err
		}
	}
	return nil
}

func fileRoundTrip() error {
	dir, err := os.MkdirTemp("", "stitch-smoke-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	f := filepath.Join(dir, "a")
	want := bytes.Repeat([]byte("smoke"), 4096)
	if err := os.WriteFile(f, want, 0o644); err != nil {
		return err
	}
	if err := os.Rename(f, f+".b"); err != nil {
		return err
	}
	got, err := os.ReadFile(f + ".b")
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return errors.New("file read back differs")
	}
	return nil
}

func pipeRoundTrip() error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	go func() { w.Write([]byte("ping")); w.Close() }()
	b := make([]byte, 4)
	if _, err := r.Read(b); err != nil || string(b) != "ping" {
		return fmt.Errorf("pipe read %q: %v", b, err)
	}
	return nil
}

func unixRoundTrip() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if _, err := unix.Write(fds[0], []byte("ping")); err != nil {
		return err
	}
	b := make([]byte, 4)
	if n, err := unix.Read(fds[1], b); err != nil || string(b[:n]) != "ping" {
		return fmt.Errorf("unix socket read %q: %v", b, err)
	}
	return nil
}

// loopback sends a message through 127.0.0.1 and reads the echo.
func loopback(network string) error {
	if err := vm.LinkUp("lo"); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	switch network {
	case "tcp":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			b := make([]byte, 4)
			n, _ := c.Read(b)
			c.Write(b[:n])
		}()
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		return echo(c, deadline)
	default:
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer pc.Close()
		go func() {
			b := make([]byte, 4)
			n, from, err := pc.ReadFrom(b)
			if err == nil {
				pc.WriteTo(b[:n], from)
			}
		}()
		c, err := net.Dial("udp", pc.LocalAddr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		return echo(c, deadline)
	}
}

func echo(c net.Conn, deadline time.Time) error {
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	b := make([]byte, 4)
	if n, err := c.Read(b); err != nil || string(b[:n]) != "ping" {
		return fmt.Errorf("echo %q: %v", b[:n], err)
	}
	return nil
}

// sctpLoopback connects an SCTP socket over loopback and sends a message.
func sctpLoopback() error {
	if err := vm.LinkUp("lo"); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	srv, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
	if err != nil {
		return fmt.Errorf("sctp socket: %w", err)
	}
	defer unix.Close(srv)
	addr := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if err := unix.Bind(srv, addr); err != nil {
		return err
	}
	if err := unix.Listen(srv, 1); err != nil {
		return err
	}
	sa, err := unix.Getsockname(srv)
	if err != nil {
		return err
	}
	cl, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
	if err != nil {
		return err
	}
	defer unix.Close(cl)
	tv := unix.Timeval{Sec: 5}
	unix.SetsockoptTimeval(cl, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(cl, sa); err != nil {
		return fmt.Errorf("sctp connect: %w", err)
	}
	conn, _, err := unix.Accept(srv)
	if err != nil {
		return err
	}
	defer unix.Close(conn)
	unix.SetsockoptTimeval(conn, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if _, err := unix.Write(cl, []byte("ping")); err != nil {
		return err
	}
	b := make([]byte, 4)
	if n, err := unix.Read(conn, b); err != nil || string(b[:n]) != "ping" {
		return fmt.Errorf("sctp read %q: %v", b, err)
	}
	return nil
}

// afAlgHash hashes through the kernel's crypto user API (AF_ALG) and
// checks the digest of "abc".
func afAlgHash() error {
	fd, err := unix.Socket(unix.AF_ALG, unix.SOCK_SEQPACKET, 0)
	if err != nil {
		return fmt.Errorf("AF_ALG socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrALG{Type: "hash", Name: "sha256"}); err != nil {
		return fmt.Errorf("bind sha256: %w", err)
	}
	// accept(2) without an address: the operation socket of AF_ALG has
	// none that x/sys/unix could decode.
	r, _, errno := unix.Syscall(unix.SYS_ACCEPT, uintptr(fd), 0, 0)
	if errno != 0 {
		return fmt.Errorf("AF_ALG accept: %w", errno)
	}
	op := int(r)
	defer unix.Close(op)
	if _, err := unix.Write(op, []byte("abc")); err != nil {
		return err
	}
	sum := make([]byte, 32)
	if _, err := unix.Read(op, sum); err != nil {
		return err
	}
	if fmt.Sprintf("%x", sum[:4]) != "ba7816bf" {
		return fmt.Errorf("sha256(abc) = %x", sum)
	}
	return nil
}
