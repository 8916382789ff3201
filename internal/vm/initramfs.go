package vm

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// Initramfs is an in-memory description of a newc cpio archive, the format
// the kernel unpacks into its initial root filesystem
// (Documentation/driver-api/early-userspace/buffer-format.rst).
type Initramfs struct {
	entries map[string]entry
}

type entry struct {
	mode  uint32 // file type and permission bits, as in stat(2)
	src   string // host file to copy (regular files)
	data  []byte // contents (regular files given in memory, symlink targets)
	rdev  [2]uint32
	isDir bool
}

// Mode bits of the newc header.
const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
)

// NewInitramfs returns an archive holding only the root directory.
func NewInitramfs() *Initramfs {
	return &Initramfs{entries: map[string]entry{}}
}

// AddFile copies the host file src to dst in the archive, with the given
// permission bits. The file is read when the archive is written.
func (r *Initramfs) AddFile(dst, src string, perm os.FileMode) error {
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("add %s: %w", src, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("add %s: not a regular file", src)
	}
	return r.add(dst, entry{mode: modeRegular | uint32(perm.Perm()), src: src})
}

// AddData puts data at dst in the archive.
func (r *Initramfs) AddData(dst string, data []byte, perm os.FileMode) error {
	return r.add(dst, entry{mode: modeRegular | uint32(perm.Perm()), data: data})
}

// AddSymlink makes dst a symbolic link to target.
func (r *Initramfs) AddSymlink(dst, target string) error {
	return r.add(dst, entry{mode: modeSymlink | 0o777, data: []byte(target)})
}

// AddCharDev makes dst a character device node.
func (r *Initramfs) AddCharDev(dst string, major, minor uint32, perm os.FileMode) error {
	return r.add(dst, entry{mode: modeCharDev | uint32(perm.Perm()), rdev: [2]uint32{major, minor}})
}

// AddDir makes the directory dst (and its parents).
func (r *Initramfs) AddDir(dst string) error {
	return r.add(dst, entry{mode: modeDir | 0o755, isDir: true})
}

func (r *Initramfs) add(dst string, e entry) error {
	name, err := cleanName(dst)
	if err != nil {
		return err
	}
	if old, ok := r.entries[name]; ok && !(old.isDir && e.isDir) {
		return fmt.Errorf("initramfs: %s added twice", dst)
	}
	// The kernel creates parents only if the archive lists them first.
	for dir := path.Dir(name); dir != "."; dir = path.Dir(dir) {
		if old, ok := r.entries[dir]; ok && !old.isDir {
			return fmt.Errorf("initramfs: %s: parent %s is not a directory", dst, dir)
		}
		r.entries[dir] = entry{mode: modeDir | 0o755, isDir: true}
	}
	r.entries[name] = e
	return nil
}

// cleanName turns a guest path into the archive's relative form.
func cleanName(p string) (string, error) {
	name := strings.TrimPrefix(path.Clean("/"+p), "/")
	if name == "" {
		return "", fmt.Errorf("initramfs: %q names the root directory", p)
	}
	return name, nil
}

// WriteTo writes the archive in newc format. Parents come before children
// because names are written in sorted order.
func (r *Initramfs) WriteTo(w io.Writer) (int64, error) {
	bw := bufio.NewWriter(w)
	cw := &countWriter{w: bw}
	names := make([]string, 0, len(r.entries))
	for n := range r.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	ino := uint32(1)
	for _, n := range names {
		e := r.entries[n]
		data := e.data
		if e.src != "" {
			var err error
			if data, err = os.ReadFile(e.src); err != nil {
				return cw.n, fmt.Errorf("initramfs: %w", err)
			}
		}
		nlink := uint32(1)
		if e.isDir {
			nlink = 2
		}
		if err := writeEntry(cw, ino, e.mode, nlink, e.rdev, n, data); err != nil {
			return cw.n, err
		}
		ino++
	}
	if err := writeEntry(cw, 0, 0, 1, [2]uint32{}, "TRAILER!!!", nil); err != nil {
		return cw.n, err
	}
	return cw.n, bw.Flush()
}

func writeEntry(w *countWriter, ino, mode, nlink uint32, rdev [2]uint32, name string, data []byte) error {
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
	io.WriteString(w, hdr)
	io.WriteString(w, name)
	w.Write([]byte{0})
	w.pad()
	w.Write(data)
	w.pad()
	return w.err
}

// countWriter tracks the offset for newc's 4-byte alignment and keeps the
// first error so writeEntry can check once.
type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}

func (c *countWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.Write(make([]byte, 4-r))
	}
}
