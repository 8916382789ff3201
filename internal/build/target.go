package build

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kmod"
)

// ErrNoSymbol means a symbol the patch needs is not in the target kernel.
var ErrNoSymbol = errors.New("symbol not in the target kernel")

// ksym is one symbol of a kallsyms listing.
type ksym struct {
	addr uint64
	typ  byte
	name string
}

// Kernel is a target kernel seen from the build machine: its image, its
// modules, its exports, and its vmlinux symbols in kallsyms order.
type Kernel struct {
	release string
	buildID string
	image   *elf.File // vmlinux extracted from the boot image
	symvers kbuild.Symvers
	modDir  string           // /lib/modules/<release>
	syms    []ksym           // vmlinux symbols, kallsyms order, at link addresses
	byName  map[string][]int // indices into syms
	mods    map[string]*elfobj.Object
}

// KernelOptions locate a target kernel's parts.
type KernelOptions struct {
	Release string
	Image   string // vmlinuz; /boot/vmlinuz-<release> if empty
	Modules string // /lib/modules/<release> if empty
	Headers string // linux-headers tree, for Module.symvers
	// Kallsyms is a copy of the target's /proc/kallsyms (any KASLR
	// offset: addresses are rebased on _text).
	Kallsyms string
	// Extract turns the boot image into vmlinux (the kernel tree's
	// scripts/extract-vmlinux); the result is cached in Cache.
	Extract string
	Cache   string
}

// OpenKernel reads what the build needs of the target kernel.
func OpenKernel(ctx context.Context, o KernelOptions) (*Kernel, error) {
	if o.Image == "" {
		o.Image = "/boot/vmlinuz-" + o.Release
	}
	if o.Modules == "" {
		o.Modules = "/lib/modules/" + o.Release
	}
	k := &Kernel{release: o.Release, modDir: o.Modules, mods: map[string]*elfobj.Object{}, byName: map[string][]int{}}
	var err error
	if k.symvers, err = kbuild.ReadSymvers(o.Headers); err != nil {
		return nil, err
	}
	vmlinux, err := extractVmlinux(ctx, o)
	if err != nil {
		return nil, err
	}
	if k.image, err = elf.Open(vmlinux); err != nil {
		return nil, fmt.Errorf("read vmlinux extracted from %s: %w", o.Image, err)
	}
	notes := k.image.Section(".notes")
	if notes == nil {
		return nil, fmt.Errorf("vmlinux from %s has no .notes section", o.Image)
	}
	nd, err := notes.Data()
	if err != nil {
		return nil, err
	}
	if k.buildID, err = kmod.BuildID(nd); err != nil {
		return nil, fmt.Errorf("vmlinux from %s: %w", o.Image, err)
	}
	if err := k.readKallsyms(o.Kallsyms); err != nil {
		return nil, err
	}
	return k, nil
}

// extractVmlinux runs the kernel's extract-vmlinux once per image.
func extractVmlinux(ctx context.Context, o KernelOptions) (string, error) {
	img, err := os.ReadFile(o.Image)
	if err != nil {
		return "", fmt.Errorf("kernel image: %w (install linux-image-%s)", err, o.Release)
	}
	sum := sha256.Sum256(img)
	out := filepath.Join(o.Cache, "vmlinux", hex.EncodeToString(sum[:8]))
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, o.Extract, o.Image)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stdout.Len() == 0 {
		return "", fmt.Errorf("extract vmlinux from %s: %v %s", o.Image, err, stderr.String())
	}
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, stdout.Bytes(), 0o644); err != nil {
		return "", err
	}
	return out, os.Rename(tmp, out)
}

// readKallsyms reads the vmlinux part of a /proc/kallsyms listing and
// rebases it on the image's _text.
func (k *Kernel) readKallsyms(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("kallsyms of the target: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 3 || len(fs[1]) != 1 { // a 4th field names a module
			continue
		}
		addr, err := strconv.ParseUint(fs[0], 16, 64)
		if err != nil {
			return fmt.Errorf("%s: bad address %q", path, fs[0])
		}
		k.byName[fs[2]] = append(k.byName[fs[2]], len(k.syms))
		k.syms = append(k.syms, ksym{addr: addr, typ: fs[1][0], name: fs[2]})
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	text := k.image.Section(".text")
	t, ok := k.byName["_text"]
	if !ok || text == nil {
		return fmt.Errorf("%s: no _text symbol, or the image has no .text: not this kernel's kallsyms", path)
	}
	if k.syms[t[0]].addr == 0 {
		return fmt.Errorf("%s: all addresses are zero: read /proc/kallsyms as root", path)
	}
	shift := k.syms[t[0]].addr - text.Addr
	for i := range k.syms {
		k.syms[i].addr -= shift
	}
	return nil
}

// Close releases the kernel image.
func (k *Kernel) Close() error { return k.image.Close() }

// Release is the kernel's uname -r.
func (k *Kernel) Release() string { return k.release }

// BuildID is the GNU build-id of the kernel image.
func (k *Kernel) BuildID() string { return k.buildID }

// Exported tells which object exports name.
func (k *Kernel) Exported(name string) (string, bool) {
	obj, ok := k.symvers[name]
	return obj, ok
}

// module returns the symbols of a module of the image package.
func (k *Kernel) module(name string) (*elfobj.Object, error) {
	if o, ok := k.mods[name]; ok {
		return o, nil
	}
	var found string
	filepath.WalkDir(filepath.Join(k.modDir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.ReplaceAll(strings.TrimSuffix(d.Name(), ".ko"), "-", "_") == name {
			found = p
			return filepath.SkipAll
		}
		return nil
	})
	if found == "" {
		return nil, fmt.Errorf("%w: no module %s under %s", ErrNoSymbol, name, k.modDir)
	}
	o, err := elfobj.Open(found)
	if err != nil {
		return nil, err
	}
	k.mods[name] = o
	return o, nil
}

// moduleSyms lists a module's symbols called name in symbol table order,
// the order its kallsyms (and so livepatch's sympos) follows.
func (k *Kernel) moduleSyms(object, name string) ([]*elfobj.Symbol, error) {
	o, err := k.module(object)
	if err != nil {
		return nil, err
	}
	var out []*elfobj.Symbol
	for _, s := range o.Symbols {
		if s.Name == name && s.Defined() && s.Type != elf.STT_SECTION {
			out = append(out, s)
		}
	}
	return out, nil
}

// Defines tells whether object has a symbol called name.
func (k *Kernel) Defines(object, name string) bool {
	if object == "vmlinux" {
		return len(k.byName[name]) > 0
	}
	syms, err := k.moduleSyms(object, name)
	return err == nil && len(syms) > 0
}

// Sympos finds name in object. When the name repeats, the occurrence
// nearest to the other named symbols of the same source file wins: the
// kernel was linked object file by object file, so a file's symbols sit
// together.
func (k *Kernel) Sympos(object, name string, near []string) (int, error) {
	if object != "vmlinux" {
		syms, err := k.moduleSyms(object, name)
		if err != nil {
			return 0, err
		}
		switch len(syms) {
		case 0:
			return 0, fmt.Errorf("%w: %s in %s", ErrNoSymbol, name, object)
		case 1:
			return 0, nil
		}
		return 0, fmt.Errorf("%w: %s is defined %d times in module %s; choosing one is not supported yet", ErrNoSymbol, name, len(syms), object)
	}
	idx := k.byName[name]
	switch len(idx) {
	case 0:
		return 0, fmt.Errorf("%w: %s in vmlinux", ErrNoSymbol, name)
	case 1:
		return 0, nil
	}
	var anchors []uint64
	for _, n := range near {
		if a := k.byName[n]; len(a) == 1 && n != name {
			anchors = append(anchors, k.syms[a[0]].addr)
		}
	}
	if len(anchors) == 0 {
		return 0, fmt.Errorf("%w: %s is defined %d times in vmlinux and nothing else in its file is unique enough to tell which", ErrNoSymbol, name, len(idx))
	}
	best, bestDist := 0, ^uint64(0)
	for pos, i := range idx {
		for _, a := range anchors {
			d := k.syms[i].addr - a
			if a > k.syms[i].addr {
				d = a - k.syms[i].addr
			}
			if d < bestDist {
				best, bestDist = pos, d
			}
		}
	}
	return best + 1, nil
}

// Code returns a function's bytes in the target: from the vmlinux image
// at its kallsyms address, or from its module's object file.
func (k *Kernel) Code(object, name string, sympos int) ([]byte, error) {
	if object != "vmlinux" {
		syms, err := k.moduleSyms(object, name)
		if err != nil {
			return nil, err
		}
		i := max(sympos-1, 0)
		if i >= len(syms) {
			return nil, fmt.Errorf("%w: %s,%d in %s", ErrNoSymbol, name, sympos, object)
		}
		return syms[i].Bytes(), nil
	}
	idx := k.byName[name]
	i := max(sympos-1, 0)
	if i >= len(idx) {
		return nil, fmt.Errorf("%w: %s,%d in vmlinux", ErrNoSymbol, name, sympos)
	}
	s := k.syms[idx[i]]
	// The size of a kallsyms symbol is the distance to the next one.
	var size uint64
	for j := idx[i] + 1; j < len(k.syms); j++ {
		if k.syms[j].addr > s.addr {
			size = k.syms[j].addr - s.addr
			break
		}
	}
	for _, sec := range k.image.Sections {
		if sec.Type == elf.SHT_PROGBITS && s.addr >= sec.Addr && s.addr+size <= sec.Addr+sec.Size {
			b := make([]byte, size)
			if _, err := sec.ReadAt(b, int64(s.addr-sec.Addr)); err != nil {
				return nil, err
			}
			return b, nil
		}
	}
	return nil, fmt.Errorf("%w: %s at %#x is in no section of the image", ErrNoSymbol, name, s.addr)
}

// ObjectOf finds the object a compiled file's functions belong to: a
// module of the image package in the source's directory (or a parent),
// else vmlinux.
func (k *Kernel) ObjectOf(source string, funcs []string) (string, error) {
	for dir := filepath.Dir(source); dir != "." && dir != "/"; dir = filepath.Dir(dir) {
		kos, _ := filepath.Glob(filepath.Join(k.modDir, "kernel", dir, "*.ko"))
		for _, ko := range kos {
			name := strings.ReplaceAll(strings.TrimSuffix(filepath.Base(ko), ".ko"), "-", "_")
			if k.definesAll(name, funcs) {
				return name, nil
			}
		}
	}
	if k.definesAll("vmlinux", funcs) {
		return "vmlinux", nil
	}
	return "", fmt.Errorf("%w: none of %s is in vmlinux or a module under %s (is the module built for this kernel?)", ErrNoSymbol, strings.Join(funcs, ", "), filepath.Dir(source))
}

// definesAll: every function that exists out of line in the pre build
// must be in the object; at least one must be.
func (k *Kernel) definesAll(object string, funcs []string) bool {
	found := 0
	for _, f := range funcs {
		if k.Defines(object, f) {
			found++
		}
	}
	return found > 0 && found == len(funcs)
}
