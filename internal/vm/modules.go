package vm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kmod"
)

// The guest sees the host's module directory (Options.Modules) read-only
// over virtio-9p, so that any module the kernel or a test asks for can
// load, the way it would on an installed system. Only the modules that
// mount the share travel in the initramfs.
const (
	modulesTag     = "stitch-modules"
	guestBootMods  = "/lib/stitch-boot"
	guestModprobe  = "/sbin/modprobe"
	modprobeSysctl = "/proc/sys/kernel/modprobe"
)

// bootModules are the module files, in loading order, that mount the 9p
// share: the 9p filesystem, its virtio transport and the virtio PCI bus.
func bootModules(dir string) ([]string, error) {
	x, err := kmod.OpenIndex(dir)
	if err != nil {
		return nil, err
	}
	var files []string
	for _, name := range []string{"virtio_pci", "9pnet_virtio", "9p"} {
		got, err := x.Resolve(name)
		if err != nil {
			return nil, fmt.Errorf("modules to mount the module share: %w", err)
		}
		for _, l := range got {
			if !slices.Contains(files, l.File) {
				files = append(files, l.File)
			}
		}
	}
	return files, nil
}

// qemuModulesArgs shares dir with the guest, read-only.
func qemuModulesArgs(dir string) []string {
	return []string{
		"-fsdev", "local,id=modules,path=" + qemuEscape(dir) + ",security_model=none,readonly=on",
		"-device", "virtio-9p-pci,fsdev=modules,mount_tag=" + modulesTag,
	}
}

// guestMountModules loads the boot modules from the initramfs, mounts the
// share on /lib/modules/RELEASE, makes /sbin/modprobe (this binary) the
// kernel's module helper, and loads the modules asked for.
func guestMountModules(boot, load []string) error {
	for _, f := range boot {
		if err := loadFile(f); err != nil {
			return err
		}
	}
	dir, err := guestModulesDir()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(modulesTag, dir, "9p", unix.MS_RDONLY, "trans=virtio,version=9p2000.L,cache=loose"); err != nil {
		return fmt.Errorf("mount the module share on %s: %w", dir, err)
	}
	if err := os.WriteFile(modprobeSysctl, []byte(guestModprobe), 0o644); err != nil {
		return fmt.Errorf("set %s: %w", modprobeSysctl, err)
	}
	for _, m := range load {
		if err := Modprobe(m); err != nil {
			return err
		}
	}
	return nil
}

func guestModulesDir() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return path.Join("/lib/modules", unix.ByteSliceToString(u.Release[:])), nil
}

// Modprobe loads a module, or the modules an alias stands for, with
// everything they need, from the guest's /lib/modules. A module already
// loaded is not an error.
func Modprobe(name string) error {
	dir, err := guestModulesDir()
	if err != nil {
		return err
	}
	x, err := kmod.OpenIndex(dir)
	if err != nil {
		return err
	}
	loads, err := x.Resolve(name)
	if err != nil {
		return err
	}
	var firstErr error
	loaded := len(loads) == 0 // built in
	for _, l := range loads {
		err := loadFile(filepath.Join(dir, l.File))
		switch {
		case err == nil:
			loaded = true
		case !l.Optional:
			return fmt.Errorf("modprobe %s: %w", name, err)
		case firstErr == nil:
			firstErr = err
		}
	}
	if !loaded {
		return fmt.Errorf("modprobe %s: %w", name, firstErr)
	}
	return nil
}

func loadFile(file string) error {
	f, err := os.Open(file)
	if err != nil {
		return fmt.Errorf("load module: %w", err)
	}
	defer f.Close()
	flags := 0
	if strings.HasSuffix(file, ".xz") {
		// 6.12's modules: its kernel decompresses them itself
		// (CONFIG_MODULE_DECOMPRESS).
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	if err := unix.FinitModule(int(f.Fd()), "", flags); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", path.Base(file), err)
	}
	return nil
}

// ModprobeMain is the guest's /sbin/modprobe, as the kernel runs it for
// request_module: "modprobe -q -- NAME". It returns the exit status.
func ModprobeMain(args []string, stderr io.Writer) int {
	quiet := false
	var names []string
	for i, a := range args {
		if a == "--" {
			names = append(names, args[i+1:]...)
			break
		}
		if a == "-q" || a == "--quiet" {
			quiet = true
		} else if !strings.HasPrefix(a, "-") {
			names = append(names, a)
		}
	}
	if len(names) == 0 {
		fmt.Fprintln(stderr, "usage: modprobe [-q] [--] MODULE")
		return 2
	}
	if err := Modprobe(names[0]); err != nil {
		if !quiet || !errors.Is(err, kmod.ErrNoModule) {
			fmt.Fprintf(stderr, "modprobe: %v\n", err)
		}
		return 1
	}
	return 0
}
