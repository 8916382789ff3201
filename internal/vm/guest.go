package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Paths inside the guest. The command's output goes to the second serial
// port so that it never mixes with kernel messages on the console.
const (
	guestConfigPath = "/etc/stitch-vm.json"
	guestBinPath    = "/bin/stitch"
	guestOutputTTY  = "/dev/ttyS1"
	exitMarker      = "STITCH-VM-EXIT "
)

// guestConfig is what the host tells the guest's init to do.
type guestConfig struct {
	Args []string `json:"args"`
	Env  []string `json:"env,omitempty"`
	UID  int      `json:"uid,omitempty"`
	// BootModules mount the module share; Load is loaded from it.
	BootModules []string     `json:"boot_modules,omitempty"`
	Load        []string     `json:"load,omitempty"`
	Network     bool         `json:"network,omitempty"`
	Shares      []guestShare `json:"shares,omitempty"`
	// EFIVars mounts efivarfs and writes Enroll before the command; a
	// guest that only enrolls has no command.
	EFIVars bool     `json:"efivars,omitempty"`
	Enroll  []EFIVar `json:"enroll,omitempty"`
}

// GuestInit is the guest's /init: it mounts the pseudo filesystems, runs
// the configured command with its output on the second serial port,
// reports the exit status there, and powers the machine off. It never
// returns.
func GuestInit() {
	if err := mountPseudoFS(); err != nil {
		fmt.Fprintf(os.Stdout, "stitch init: %v\n", err)
		powerOff()
	}
	out, err := os.OpenFile(guestOutputTTY, os.O_WRONLY, 0)
	if err != nil {
		// Without the output port the host learns nothing; the console
		// (init's stdout) is the only place left to say why.
		fmt.Fprintf(os.Stdout, "stitch init: open %s: %v\n", guestOutputTTY, err)
		powerOff()
	}
	code := guestRun(out)
	fmt.Fprintf(out, "\n%s%d\n", exitMarker, code)
	out.Close()
	powerOff()
}

func guestRun(out *os.File) int {
	raw, err := os.ReadFile(guestConfigPath)
	if err != nil {
		fmt.Fprintf(out, "stitch init: %v\n", err)
		return 125
	}
	var cfg guestConfig
	if err := json.Unmarshal(raw, &cfg); err != nil || (len(cfg.Args) == 0 && len(cfg.Enroll) == 0) {
		fmt.Fprintf(out, "stitch init: bad %s: %v\n", guestConfigPath, err)
		return 125
	}
	if len(cfg.BootModules) > 0 {
		if err := guestMountModules(cfg.BootModules, cfg.Load); err != nil {
			fmt.Fprintf(out, "stitch init: %v\n", err)
			return 125
		}
	}
	for _, sh := range cfg.Shares {
		if err := sh.mount(); err != nil {
			fmt.Fprintf(out, "stitch init: %v\n", err)
			return 125
		}
	}
	if cfg.Network {
		if err := guestNetUp(); err != nil {
			fmt.Fprintf(out, "stitch init: network: %v\n", err)
			return 125
		}
	}
	if cfg.EFIVars {
		if err := guestEFIVars(cfg.Enroll); err != nil {
			fmt.Fprintf(out, "stitch init: %v\n", err)
			return 125
		}
		if len(cfg.Args) == 0 {
			return 0
		}
	}
	os.Setenv("PATH", "/bin:/sbin")
	cmd := exec.Command(cfg.Args[0], cfg.Args[1:]...)
	cmd.Env = append([]string{"PATH=/bin:/sbin", "HOME=/", "STITCH_IN_VM=1"}, cfg.Env...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = "/"
	if cfg.UID != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(cfg.UID), Gid: uint32(cfg.UID)}}
	}
	err = cmd.Run()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exitErr):
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return exitErr.ExitCode()
	default:
		fmt.Fprintf(out, "stitch init: run %s: %v\n", cfg.Args[0], err)
		return 127
	}
}

func mountPseudoFS() error {
	mounts := []struct{ fstype, target string }{
		{"proc", "/proc"},
		{"sysfs", "/sys"},
		{"devtmpfs", "/dev"},
		{"tmpfs", "/tmp"},
		{"tracefs", "/sys/kernel/tracing"},
		{"securityfs", "/sys/kernel/security"}, // lockdown state
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.fstype, m.target, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	return nil
}

func powerOff() {
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// If power-off failed, returning from init panics the kernel, and
	// panic=-1 with QEMU's -no-reboot ends the VM all the same.
	time.Sleep(time.Second)
	os.Exit(1)
}
