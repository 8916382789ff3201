package kallsyms

import (
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"log/slog"
	"os"
)

// Image is a vmlinux (extracted from the boot image) with its decoded
// kallsyms: where each symbol is and what bytes it has before boot-time
// patching (ftrace, alternatives, jump labels, ... rewrite some later).
type Image struct {
	Path  string
	Table *Table
	data  []byte
	progs []*elf.Prog
}

// OpenImage extracts (or takes from cacheDir) the vmlinux inside the boot
// image bootImage and decodes its symbols.
func OpenImage(ctx context.Context, bootImage, cacheDir string, log *slog.Logger) (*Image, error) {
	path, err := CachedVmlinux(ctx, bootImage, cacheDir, log)
	if err != nil {
		return nil, err
	}
	return ReadImage(path)
}

// ReadImage reads a vmlinux ELF file and decodes its kallsyms tables.
func ReadImage(path string) (*Image, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read vmlinux: %w", err)
	}
	im, err := NewImage(data)
	if err != nil {
		return nil, fmt.Errorf("decode kallsyms in %s: %w", path, err)
	}
	im.Path = path
	return im, nil
}

// NewImage decodes a vmlinux held in memory; data is kept, not copied.
func NewImage(data []byte) (im *Image, err error) {
	defer recoverInto(&err)
	t, err := DecodeVmlinux(data)
	if err != nil {
		return nil, err
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	im = &Image{Table: t, data: data}
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && p.Off+p.Filesz <= uint64(len(data)) {
			im.progs = append(im.progs, p)
		}
	}
	return im, nil
}

// At returns size bytes of the image at address addr (shared with the
// Image: do not modify them).
func (im *Image) At(addr, size uint64) ([]byte, error) {
	for _, p := range im.progs {
		if addr >= p.Vaddr && addr-p.Vaddr <= p.Filesz && size <= p.Filesz-(addr-p.Vaddr) {
			off := p.Off + addr - p.Vaddr
			return im.data[off : off+size : off+size], nil
		}
	}
	return nil, fmt.Errorf("%w: [%#x, +%#x) is not in the image's file contents", ErrNotFound, addr, size)
}

// Bytes returns the bytes of the vmlinux symbol name (sympos as livepatch
// takes it: 0 for a unique name) and the symbol. A function's size is the
// distance to the next symbol, so it may include alignment padding.
func (im *Image) Bytes(name string, sympos int) ([]byte, Symbol, error) {
	s, err := im.Table.Find(Vmlinux, name, sympos)
	if err != nil {
		return nil, Symbol{}, err
	}
	b, err := im.At(s.Addr, s.Size)
	if err != nil {
		return nil, s, fmt.Errorf("bytes of %s: %w", name, err)
	}
	return b, s, nil
}
