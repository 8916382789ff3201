package livepatch

import (
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
)

// ErrNoKcore means the running kernel's memory cannot be read.
var ErrNoKcore = errors.New("cannot read kernel memory")

// Kcore reads the running kernel's memory through /proc/kcore, an ELF
// core file whose PT_LOAD segments map kernel virtual addresses. Reading
// it needs root (CAP_SYS_RAWIO).
type Kcore struct {
	f     *os.File
	loads []elf.ProgHeader
}

// OpenKcore opens /proc/kcore (under k.Root).
func (k *Kernel) OpenKcore() (kc *Kcore, err error) {
	path := k.path("/proc/kcore")
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v (needs root and CONFIG_PROC_KCORE)", ErrNoKcore, err)
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %s is not a readable core file (%v)", ErrNoKcore, path, p)
		}
		if err != nil {
			f.Close()
		}
	}()
	ef, err := elf.NewFile(f)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoKcore, path, err)
	}
	kc = &Kcore{f: f}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_LOAD {
			kc.loads = append(kc.loads, p.ProgHeader)
		}
	}
	return kc, nil
}

// Read returns n bytes of kernel memory at virtual address addr.
func (kc *Kcore) Read(addr uint64, n int) ([]byte, error) {
	for _, p := range kc.loads {
		if addr < p.Vaddr || addr+uint64(n) > p.Vaddr+p.Memsz {
			continue
		}
		b := make([]byte, n)
		if _, err := kc.f.ReadAt(b, int64(p.Off+addr-p.Vaddr)); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: read %d bytes at %#x: %v", ErrNoKcore, n, addr, err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("%w: address %#x is in no segment of /proc/kcore", ErrNoKcore, addr)
}

// Close releases /proc/kcore.
func (kc *Kcore) Close() error { return kc.f.Close() }
