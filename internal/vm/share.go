package vm

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Share is a host directory the guest mounts read-write at Guest.
type Share struct {
	Host  string // an existing directory on the host
	Guest string // an absolute path in the guest, created if missing
}

func shareTag(i int) string { return "stitch-share" + strconv.Itoa(i) }

func (s Share) check() error {
	if !filepath.IsAbs(s.Guest) {
		return fmt.Errorf("share %s: guest path %q is not absolute", s.Host, s.Guest)
	}
	if fi, err := os.Stat(s.Host); err != nil || !fi.IsDir() {
		return fmt.Errorf("share %s: not a directory on the host (%v)", s.Host, err)
	}
	return nil
}

// qemuArgs exports the directory over virtio-9p. security_model=none
// passes the guest's root straight through as the host user running QEMU.
func (s Share) qemuArgs(i int) []string {
	tag := shareTag(i)
	return []string{
		"-fsdev", "local,id=" + tag + ",path=" + qemuEscape(s.Host) + ",security_model=none",
		"-device", "virtio-9p-pci,fsdev=" + tag + ",mount_tag=" + tag,
	}
}

// qemuEscape doubles the commas in an option value: QEMU would otherwise
// read a comma in a host path as the start of the next option.
func qemuEscape(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// guestShare is a share as the guest's init mounts it.
type guestShare struct {
	Tag  string `json:"tag"`
	Path string `json:"path"`
}

// mount mounts the share without a cache, so every write goes to the
// host before the call returns.
func (s guestShare) mount() error {
	if err := os.MkdirAll(s.Path, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(s.Tag, s.Path, "9p", 0, "trans=virtio,version=9p2000.L,cache=none"); err != nil {
		return fmt.Errorf("mount share %s on %s: %w", s.Tag, s.Path, err)
	}
	return nil
}
