// Package kmod reads Linux kernel module files (.ko): the metadata the
// kernel checks before loading one (modinfo, vermagic) and what makes a
// module a livepatch module. It only reads; loading is the livepatch
// package's job.
package kmod

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Errors a caller can test for with errors.Is; each one means the file is
// not something the kernel would accept as a livepatch module.
var (
	ErrNotELF       = errors.New("not an ELF file")
	ErrNotModule    = errors.New("not a kernel module")
	ErrNotLivepatch = errors.New("not a livepatch module")
	ErrVermagic     = errors.New("module built for another kernel")
)

// signatureMagic ends a module signed by scripts/sign-file.
const signatureMagic = "~Module signature appended~\n"

// Module is what Stitch needs to know about a .ko before loading it.
type Module struct {
	Path      string
	Name      string // the name the kernel will give it (modinfo name=)
	Vermagic  string // e.g. "6.1.0-54-amd64 SMP preempt mod_unload modversions "
	Livepatch bool   // modinfo livepatch=Y
	Signed    bool
	// Info holds every modinfo key; keys such as "depends" or "alias"
	// may repeat.
	Info map[string][]string
}

// Release is the kernel release the module was built for: the first word
// of its vermagic.
func (m *Module) Release() string {
	if f := strings.Fields(m.Vermagic); len(f) > 0 {
		return f[0]
	}
	return ""
}

// CheckRelease returns ErrVermagic unless the module was built for the
// kernel release rel (as uname -r prints it).
func (m *Module) CheckRelease(rel string) error {
	if m.Release() != rel {
		return fmt.Errorf("%s: %w: vermagic %q, running kernel %s (rebuild the patch for %s)",
			m.Path, ErrVermagic, strings.TrimSpace(m.Vermagic), rel, rel)
	}
	return nil
}

// Open reads the module at path.
func Open(path string) (*Module, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m, err := Read(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	m.Path = path
	return m, nil
}

// Read parses a module from r. Malformed input yields an error, never a
// panic: debug/elf can panic on some corrupt files, so that is recovered.
func Read(r io.ReaderAt) (m *Module, err error) {
	defer func() {
		if p := recover(); p != nil {
			m, err = nil, fmt.Errorf("%w: corrupt ELF (%v)", ErrNotModule, p)
		}
	}()
	var magic [4]byte
	if _, err := r.ReadAt(magic[:], 0); err != nil || string(magic[:]) != elf.ELFMAG {
		return nil, ErrNotELF
	}
	f, err := elf.NewFile(r)
	if err != nil {
		// The magic matched, so this is a damaged ELF file, most often a
		// truncated download.
		return nil, fmt.Errorf("%w: truncated or corrupt ELF file: %v", ErrNotModule, err)
	}
	if f.Type != elf.ET_REL {
		return nil, fmt.Errorf("%w: ELF type is %v, a module is ET_REL", ErrNotModule, f.Type)
	}
	if f.Machine != elf.EM_X86_64 || f.Class != elf.ELFCLASS64 {
		return nil, fmt.Errorf("%w: built for %v %v, not x86-64", ErrNotModule, f.Class, f.Machine)
	}
	if f.Section(".gnu.linkonce.this_module") == nil {
		return nil, fmt.Errorf("%w: no .gnu.linkonce.this_module section (an object file, not a linked .ko?)", ErrNotModule)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("%w: no .modinfo section", ErrNotModule)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("%w: truncated or corrupt ELF file: read .modinfo: %v", ErrNotModule, err)
	}
	// Make sure the whole file is there: a truncated copy can still have
	// intact headers and .modinfo.
	for _, s := range f.Sections {
		if s.Type == elf.SHT_NOBITS || s.Size == 0 {
			continue
		}
		var b [1]byte
		if _, err := r.ReadAt(b[:], int64(s.Offset+s.Size-1)); err != nil {
			return nil, fmt.Errorf("%w: truncated or corrupt ELF file: section %s extends past the end of the file", ErrNotModule, s.Name)
		}
	}
	m = &Module{Info: ParseModinfo(data)}
	m.Name = first(m.Info["name"])
	m.Vermagic = first(m.Info["vermagic"])
	m.Livepatch = first(m.Info["livepatch"]) == "Y"
	if m.Name == "" || m.Vermagic == "" {
		return nil, fmt.Errorf("%w: modinfo lacks name or vermagic", ErrNotModule)
	}
	m.Signed = hasSignature(r)
	return m, nil
}

// CheckLivepatch returns ErrNotLivepatch unless the module declares
// itself a livepatch module, as the kernel requires of klp_enable_patch
// callers.
func (m *Module) CheckLivepatch() error {
	if !m.Livepatch {
		return fmt.Errorf("%s: %w: modinfo has no livepatch=Y (MODULE_INFO(livepatch, \"Y\") is missing)", m.Path, ErrNotLivepatch)
	}
	return nil
}

// ParseModinfo splits a .modinfo section: NUL-separated key=value strings.
func ParseModinfo(data []byte) map[string][]string {
	info := map[string][]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := bytes.Cut(kv, []byte("="))
		if !ok || len(k) == 0 {
			continue
		}
		info[string(k)] = append(info[string(k)], string(v))
	}
	return info
}

func hasSignature(r io.ReaderAt) bool {
	size, ok := sizeOf(r)
	if !ok || size < int64(len(signatureMagic)) {
		return false
	}
	b := make([]byte, len(signatureMagic))
	if _, err := r.ReadAt(b, size-int64(len(b))); err != nil {
		return false
	}
	return string(b) == signatureMagic
}

func sizeOf(r io.ReaderAt) (int64, bool) {
	switch v := r.(type) {
	case interface{ Size() int64 }:
		return v.Size(), true
	case *os.File:
		fi, err := v.Stat()
		if err != nil {
			return 0, false
		}
		return fi.Size(), true
	}
	return 0, false
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// ErrNoBuildID means ELF notes hold no GNU build-id.
var ErrNoBuildID = errors.New("no GNU build-id note")

// BuildID returns the GNU build-id (hex) from a block of ELF notes: a
// .note.gnu.build-id or .notes section, or the running kernel's
// /sys/kernel/notes.
func BuildID(notes []byte) (string, error) {
	const ntGNUBuildID = 3
	for len(notes) >= 12 {
		namesz := int(binary.LittleEndian.Uint32(notes[0:]))
		descsz := int(binary.LittleEndian.Uint32(notes[4:]))
		typ := binary.LittleEndian.Uint32(notes[8:])
		nameEnd := 12 + align4(namesz)
		descEnd := nameEnd + align4(descsz)
		if namesz < 0 || descsz < 0 || nameEnd > len(notes) || descEnd > len(notes) || nameEnd+descsz > len(notes) {
			break
		}
		if typ == ntGNUBuildID && namesz == 4 && string(notes[12:15]) == "GNU" {
			return hex.EncodeToString(notes[nameEnd : nameEnd+descsz]), nil
		}
		notes = notes[descEnd:]
	}
	return "", ErrNoBuildID
}

func align4(n int) int { return (n + 3) &^ 3 }
