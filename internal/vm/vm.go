// Package vm boots a Linux kernel under QEMU with an initramfs that Stitch
// builds itself, runs one command in the guest, and returns what it
// printed and its exit status. The stitch binary is the guest's /init and
// is on the guest's PATH; kernel messages arrive on the first serial port
// and the command's output on the second, so the two never mix.
package vm

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Errors a caller can test for with errors.Is.
var (
	// ErrTimeout means the guest did not finish in time; QEMU was killed.
	ErrTimeout = errors.New("vm timed out")
	// ErrNoExit means the guest stopped without reporting an exit status
	// (for example a kernel panic).
	ErrNoExit = errors.New("guest stopped without reporting an exit status")
	// ErrSetup means the VM could not be started: missing QEMU, kernel or
	// a file to add.
	ErrSetup = errors.New("vm setup")
)

// File is a host file to place in the guest.
type File struct {
	Src string // path on the host
	Dst string // absolute path in the guest
}

// Options describe one VM run. Zero values pick the defaults.
type Options struct {
	Kernel  string        // kernel boot image (a kernel profile's BootImage); required
	Init    string        // static stitch binary for /init; the running executable if empty
	Files   []File        // extra files for the guest
	Args    []string      // the command to run in the guest
	Env     []string      // extra environment for the command
	UID     int           // user id the command runs as (0: root)
	Append  string        // extra kernel command line
	Memory  int           // MiB; 512 if zero
	CPUs    int           // 2 if zero
	Timeout time.Duration // 5 minutes if zero
	QEMU    string        // emulator binary; qemu-system-x86_64 if empty

	// Modules is the host's module directory of the kernel
	// (/lib/modules/RELEASE). When set, the guest mounts it read-only at
	// the same place and /sbin/modprobe works, for the kernel's
	// request_module too; Load names modules to load before the command.
	Modules string
	Load    []string

	// Network, if set, gives the guest a NIC that reaches only the
	// forwarded host addresses. It needs Modules (for virtio_net).
	Network *Network

	// Shares are host directories the guest mounts read-write, uncached,
	// so that what the guest writes reaches the host at once and outlives
	// the guest, even a kernel panic: state kept across two boots, as
	// across a reboot. They need Modules (for 9p).
	Shares []Share

	// UEFI, if set, boots through UEFI firmware instead of SeaBIOS (see
	// UEFI); it needs Modules (for efivarfs).
	UEFI *UEFI

	Output  io.Writer // receives the command's output as it arrives
	Console io.Writer // receives the kernel console as it arrives
	Logger  *slog.Logger
}

// Result is what a finished guest reported.
type Result struct {
	ExitCode int           `json:"exit_code"`
	Output   string        `json:"output"`  // the command's stdout and stderr
	Console  string        `json:"console"` // kernel messages
	Duration time.Duration `json:"duration_ns"`
	Accel    string        `json:"accel"` // kvm or tcg
}

// Run boots the VM, waits for the command to finish, and always stops
// QEMU before returning. A non-zero exit status of the command is not an
// error: it is in Result.ExitCode.
func Run(ctx context.Context, opts Options) (*Result, error) {
	opts = withDefaults(opts)
	if len(opts.Args) == 0 && (opts.UEFI == nil || len(opts.UEFI.Enroll) == 0) {
		return nil, fmt.Errorf("%w: no command to run in the guest", ErrSetup)
	}
	if opts.Kernel == "" {
		return nil, fmt.Errorf("%w: no kernel image to boot", ErrSetup)
	}
	if _, err := os.Stat(opts.Kernel); err != nil {
		return nil, fmt.Errorf("%w: kernel %s: %v (`stitch kernel list` shows the kernels ready and their boot images; `stitch kernel add RELEASE` fetches one)", ErrSetup, opts.Kernel, err)
	}
	qemu, err := exec.LookPath(opts.QEMU)
	if err != nil {
		return nil, fmt.Errorf("%w: %s not found (apt-get install qemu-system-x86)", ErrSetup, opts.QEMU)
	}
	if err := checkStatic(opts.Init); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}

	dir, err := os.MkdirTemp("", "stitch-vm-")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}
	defer os.RemoveAll(dir)

	initrd := filepath.Join(dir, "initramfs.cpio")
	if err := writeInitramfs(initrd, opts); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}
	sock := filepath.Join(dir, "output.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}
	defer ln.Close()

	accel := "tcg"
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		accel = "kvm"
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", accel,
		"-m", strconv.Itoa(opts.Memory), "-smp", strconv.Itoa(opts.CPUs),
		"-kernel", opts.Kernel, "-initrd", initrd,
		// sysrq_always_enabled: a guest that hangs is asked, over the
		// console, what its CPUs and blocked tasks are doing (dumpGuest).
		"-append", strings.TrimSpace("console=ttyS0 quiet panic=-1 sysrq_always_enabled " + opts.Append),
		// mon: multiplexes the console with QEMU's monitor, whose escape
		// (Ctrl-A b) sends the serial break that starts a sysrq.
		"-serial", "mon:stdio",
		"-chardev", "socket,id=out,path=" + sock,
		"-serial", "chardev:out",
	}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	if opts.Modules != "" {
		args = append(args, qemuModulesArgs(opts.Modules)...)
	}
	for i, sh := range opts.Shares {
		args = append(args, sh.qemuArgs(i)...)
	}
	if opts.UEFI != nil {
		uefiArgs, err := opts.UEFI.qemuArgs()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrSetup, err)
		}
		args = append(args, uefiArgs...)
	}
	if opts.Network != nil {
		netArgs, err := opts.Network.qemuArgs(opts.Init)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrSetup, err)
		}
		args = append(args, netArgs...)
	}

	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	cmd := exec.Command(qemu, args...)
	console, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}
	keys, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}
	defer keys.Close()
	var qemuErr bytes.Buffer
	cmd.Stderr = &qemuErr
	opts.Logger.Debug("starting qemu", "args", args)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%w: start %s: %v", ErrSetup, qemu, err)
	}
	// Whatever happens below, QEMU does not outlive Run.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	var consoleBuf, outBuf syncBuffer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		copyLines(io.MultiWriter(&consoleBuf, opts.Console), console)
	}()
	go func() {
		defer wg.Done()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		go func() { <-ctx.Done(); conn.Close() }()
		copyLines(io.MultiWriter(&outBuf, &markerFilter{out: opts.Output}), conn)
	}()

	var waitErr error
	select {
	case waitErr = <-exited:
		exited <- waitErr // for the deferred kill
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			dumpGuest(keys, exited)
		}
	}
	ln.Close()
	cmd.Process.Kill()
	wg.Wait()

	res := &Result{Console: consoleBuf.String(), Duration: time.Since(start), Accel: accel}
	output, code, ok := splitExit(outBuf.String())
	res.Output = output
	res.ExitCode = code
	switch {
	case ok:
		return res, nil
	case ctx.Err() != nil:
		// The tail holds what dumpGuest asked the kernel for.
		return res, fmt.Errorf("%w after %s (the guest's last console lines:\n%s)", ErrTimeout, opts.Timeout, tail(res.Console, 150))
	default:
		// A crashed guest's report ends the error, where a CI log that
		// shows only an output's head and tail keeps it.
		return res, fmt.Errorf("%w: qemu: %v %s; last console lines:\n%s%s", ErrNoExit, waitErr, strings.TrimSpace(qemuErr.String()), tail(res.Console, 150), crashSummary(res.Console))
	}
}

func withDefaults(o Options) Options {
	if o.Init == "" {
		if exe, err := os.Executable(); err == nil {
			o.Init = exe
		}
	}
	if o.Memory == 0 {
		o.Memory = 512
	}
	if o.CPUs == 0 {
		o.CPUs = 2
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Minute
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Output == nil {
		o.Output = io.Discard
	}
	if o.Console == nil {
		o.Console = io.Discard
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// checkStatic refuses an init binary that needs a dynamic loader: the
// initramfs has no libc.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("init binary %s: %v", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("init binary %s is dynamically linked; build it with CGO_ENABLED=0", path)
		}
	}
	return nil
}

func writeInitramfs(path string, opts Options) error {
	r := NewInitramfs()
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp", "/etc"} {
		if err := r.AddDir(d); err != nil {
			return err
		}
	}
	if err := r.AddCharDev("/dev/console", 5, 1, 0o600); err != nil {
		return err
	}
	if err := r.AddFile(guestBinPath, opts.Init, 0o755); err != nil {
		return err
	}
	if err := r.AddSymlink("/init", guestBinPath); err != nil {
		return err
	}
	gc := guestConfig{Args: opts.Args, Env: opts.Env, UID: opts.UID, Load: opts.Load, Network: opts.Network != nil}
	if opts.UEFI != nil {
		gc.EFIVars = true
		gc.Enroll = opts.UEFI.Enroll
	}
	for i, sh := range opts.Shares {
		if err := sh.check(); err != nil {
			return err
		}
		gc.Shares = append(gc.Shares, guestShare{Tag: shareTag(i), Path: sh.Guest})
	}
	if opts.Modules != "" {
		boot, err := bootModules(opts.Modules)
		if err != nil {
			return err
		}
		for i, f := range boot {
			dst := fmt.Sprintf("%s/%02d-%s", guestBootMods, i, filepath.Base(f))
			if err := r.AddFile(dst, filepath.Join(opts.Modules, f), 0o644); err != nil {
				return err
			}
			gc.BootModules = append(gc.BootModules, dst)
		}
		if err := r.AddSymlink(guestModprobe, guestBinPath); err != nil {
			return err
		}
	} else if len(opts.Load) > 0 || opts.Network != nil || len(opts.Shares) > 0 || opts.UEFI != nil {
		return errors.New("Load, Network, Shares and UEFI need Modules, the directory to load modules from")
	}
	cfg, err := json.Marshal(gc)
	if err != nil {
		return err
	}
	if err := r.AddData(guestConfigPath, cfg, 0o644); err != nil {
		return err
	}
	for _, f := range opts.Files {
		if err := r.AddFile(f.Dst, f.Src, 0o755); err != nil {
			return err
		}
	}
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := r.WriteTo(out); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// copyLines copies r to w a line at a time, dropping the carriage returns
// the guest's tty adds, so callers see output as it arrives.
func copyLines(w io.Writer, r io.Reader) {
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadBytes('\n')
		if len(line) > 0 {
			line = bytes.ReplaceAll(line, []byte("\r\n"), []byte("\n"))
			line = bytes.TrimSuffix(line, []byte("\r"))
			w.Write(line)
		}
		if err != nil {
			return
		}
	}
}

// markerFilter passes the command's output through but holds back the
// exit marker line, which is for the host only.
type markerFilter struct{ out io.Writer }

func (m *markerFilter) Write(p []byte) (int, error) {
	if bytes.HasPrefix(p, []byte(exitMarker)) {
		return len(p), nil
	}
	return m.out.Write(p)
}

// splitExit finds the exit marker in the raw output.
func splitExit(raw string) (output string, code int, ok bool) {
	i := strings.LastIndex(raw, "\n"+exitMarker)
	if i < 0 {
		return raw, -1, false
	}
	rest := strings.TrimSpace(raw[i+1+len(exitMarker):])
	code, err := strconv.Atoi(rest)
	if err != nil {
		return raw, -1, false
	}
	return raw[:i], code, true
}

// dumpGuest asks the kernel of a guest that ran out of time what it is
// doing, so that a hang in CI leaves its stacks in the log: through the
// console's serial break, sysrq 8 lets every message reach the console,
// w lists the blocked tasks and l the active CPUs' backtraces. A kernel
// that no longer takes interrupts answers nothing, which tells too.
func dumpGuest(console io.Writer, exited chan error) {
	for _, key := range []string{"8", "w", "l"} {
		if _, err := io.WriteString(console, "\x01b"+key); err != nil {
			return
		}
		select {
		case err := <-exited:
			exited <- err // for the deferred kill
			return
		case <-time.After(1500 * time.Millisecond):
		}
	}
}

// crashSummary picks out of a console the lines of the last kernel
// crash report that say what failed and where: the report's headers,
// RIP and the first frames of its call trace; "" if there is none.
func crashSummary(console string) string {
	lines := strings.Split(strings.TrimRight(console, "\n"), "\n")
	end := -1
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], "Kernel panic - not syncing") {
			end = i
			break
		}
	}
	if end < 0 {
		return ""
	}
	// The report starts at the last header before the panic that follows
	// an unrelated line; headers stack (BUG, #PF, Oops), so walk back
	// over the whole report and keep its first header.
	start := end
	for i := end - 1; i >= 0 && end-i < 200; i-- {
		if crashHeader(lines[i]) {
			start = i
		}
	}
	var out []string
	frames := 0
	// A panic without an oops (panic() called directly) prints its own
	// call trace after its line.
	for _, l := range lines[start:] {
		msg := l
		if j := strings.Index(l, "] "); j >= 0 && strings.HasPrefix(strings.TrimSpace(l), "[") {
			msg = l[j+2:]
		}
		switch {
		case crashHeader(l), strings.HasPrefix(msg, "RIP:"), strings.HasPrefix(msg, "Call Trace:"), strings.HasPrefix(msg, "Kernel panic"):
			out = append(out, msg)
			if strings.HasPrefix(msg, "Call Trace:") {
				frames = 10
			}
		case frames > 0 && strings.HasPrefix(msg, " "):
			out = append(out, msg)
			frames--
		default:
			frames = 0
		}
	}
	return "\nthe guest's kernel crashed:\n" + strings.Join(out, "\n")
}

var crashHeaders = []string{"BUG:", "Oops:", "general protection fault", "kernel BUG at", "WARNING:", "int3:", "#PF:", "invalid opcode:", "double fault:", "stack segment:"}

func crashHeader(line string) bool {
	for _, h := range crashHeaders {
		if strings.Contains(line, h) {
			return true
		}
	}
	return false
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// syncBuffer is a bytes.Buffer safe for one writer and a later reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
