// Package elfobj reads x86-64 ELF relocatable objects (the .o files the
// kernel's build produces) into a model of sections, symbols and RELA
// relocations that the differ and the module writer work on.
//
// Objects come from compilers, but also from users and from disk, so the
// reader treats every one as untrusted: malformed input yields an error
// wrapping ErrMalformed, never a panic.
package elfobj

import (
	"bytes"
	"debug/dwarf"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

var (
	// ErrNotObject means the input is not an x86-64 ELF relocatable object.
	ErrNotObject = errors.New("not an x86-64 ELF relocatable object")
	// ErrMalformed means the input claims to be one but is corrupt.
	ErrMalformed = errors.New("malformed ELF object")
)

// FormatError locates a defect inside an object. It wraps ErrMalformed.
type FormatError struct {
	Section string // section involved, if any
	Msg     string
}

func (e *FormatError) Error() string {
	if e.Section == "" {
		return "malformed ELF object: " + e.Msg
	}
	return fmt.Sprintf("malformed ELF object: section %s: %s", e.Section, e.Msg)
}

func (e *FormatError) Unwrap() error { return ErrMalformed }

// Object is a parsed relocatable object.
type Object struct {
	// Sections is indexed by ELF section index; index 0 is the null section.
	Sections []*Section
	// Symbols is indexed by symbol table index; index 0 is the null symbol.
	Symbols []*Symbol

	// src reads the object's bytes again, for DWARF.
	src io.ReaderAt
}

// Section is one ELF section. RELA sections are not listed separately:
// their entries are in Relocs of the section they apply to.
type Section struct {
	Index     int
	Name      string
	Type      elf.SectionType
	Flags     elf.SectionFlag
	Size      uint64
	Addralign uint64
	Entsize   uint64
	// Data is nil for SHT_NOBITS, the symbol and string tables and
	// debugging sections (read through DWARF).
	Data []byte
	// Relocs are sorted by Offset; those of debugging sections are not
	// decoded (DWARF applies them).
	Relocs []Reloc
	// Rela is the index of the RELA section applying to this one, or 0.
	Rela int
	// Sym is the section's STT_SECTION symbol, if the object has one.
	Sym *Symbol
	// Syms are the other symbols defined in the section, sorted by Value.
	Syms []*Symbol
}

// Symbol is one symbol table entry.
type Symbol struct {
	Index      int
	Name       string
	Bind       elf.SymBind
	Type       elf.SymType
	Visibility elf.SymVis
	// Shndx is the raw section index (SHN_UNDEF, SHN_ABS, ...).
	Shndx elf.SectionIndex
	// Section is where the symbol is defined; nil for undefined,
	// absolute and common symbols.
	Section *Section
	Value   uint64
	Size    uint64
}

// Reloc is one x86-64 RELA entry.
type Reloc struct {
	Offset uint64
	Type   elf.R_X86_64
	Symbol *Symbol
	Addend int64
	// InCode: the relocation patches an instruction (its section is
	// executable), where a PC-relative field is followed by the end of
	// the instruction rather than being its own reference point.
	InCode bool
}

// Local tells whether the symbol is file-local (STB_LOCAL).
func (s *Symbol) Local() bool { return s.Bind == elf.STB_LOCAL }

// Defined tells whether the symbol is defined in a section of the object.
func (s *Symbol) Defined() bool { return s.Section != nil }

// Func tells whether the symbol is a function.
func (s *Symbol) Func() bool { return s.Type == elf.STT_FUNC }

// Executable tells whether the section holds code.
func (s *Section) Executable() bool { return s.Flags&elf.SHF_EXECINSTR != 0 }

// Alloc tells whether the section is loaded into memory.
func (s *Section) Alloc() bool { return s.Flags&elf.SHF_ALLOC != 0 }

// Strings tells whether the section is a mergeable string section
// (.rodata.str1.1 and the like), where only the contents identify a
// string.
func (s *Section) Strings() bool {
	return s.Flags&(elf.SHF_MERGE|elf.SHF_STRINGS) == elf.SHF_MERGE|elf.SHF_STRINGS
}

// OnceFlags tells whether the section holds the kernel's "done once"
// flags of WARN_ONCE and printk_once (include/linux/once_lite.h):
// .data.once up to 6.2, .data..once since.
func (s *Section) OnceFlags() bool { return s.Name == ".data.once" || s.Name == ".data..once" }

// SizeOf is the width in bytes of the field a relocation type patches,
// or 0 for types this reader does not know.
func SizeOf(t elf.R_X86_64) int {
	switch t {
	case elf.R_X86_64_64, elf.R_X86_64_PC64, elf.R_X86_64_GOTOFF64, elf.R_X86_64_GOTPC64, elf.R_X86_64_SIZE64:
		return 8
	case elf.R_X86_64_PC32, elf.R_X86_64_PLT32, elf.R_X86_64_32, elf.R_X86_64_32S,
		elf.R_X86_64_GOTPCREL, elf.R_X86_64_GOTPCRELX, elf.R_X86_64_REX_GOTPCRELX,
		elf.R_X86_64_GOTPC32, elf.R_X86_64_SIZE32, elf.R_X86_64_GOT32, elf.R_X86_64_TPOFF32:
		return 4
	case elf.R_X86_64_16, elf.R_X86_64_PC16:
		return 2
	case elf.R_X86_64_8, elf.R_X86_64_PC8:
		return 1
	}
	return 0
}

// PCRelative tells whether the relocation is computed relative to the
// place it patches (S + A - P).
func PCRelative(t elf.R_X86_64) bool {
	switch t {
	case elf.R_X86_64_PC32, elf.R_X86_64_PLT32, elf.R_X86_64_PC64, elf.R_X86_64_PC16, elf.R_X86_64_PC8,
		elf.R_X86_64_GOTPCREL, elf.R_X86_64_GOTPCRELX, elf.R_X86_64_REX_GOTPCRELX:
		return true
	}
	return false
}

// Open reads the object at path. Debugging sections are left on disk
// until DWARF is called, which keeps a kernel object's read small.
func Open(path string) (*Object, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	o, err := parseGuarded(f, st.Size(), func(off, n uint64) ([]byte, error) {
		b := make([]byte, n)
		_, err := f.ReadAt(b, int64(off))
		return b, err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	o.src = fileAt(path)
	return o, nil
}

// fileAt reads a file by path on each call, so that an Object holds no
// open file.
type fileAt string

func (p fileAt) ReadAt(b []byte, off int64) (int, error) {
	f, err := os.Open(string(p))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.ReadAt(b, off)
}

// Parse reads an object from memory. The Object keeps references into raw.
func Parse(raw []byte) (*Object, error) {
	o, err := parseGuarded(bytes.NewReader(raw), int64(len(raw)), func(off, n uint64) ([]byte, error) {
		return raw[off : off+n : off+n], nil
	})
	if err != nil {
		return nil, err
	}
	o.src = bytes.NewReader(raw)
	return o, nil
}

// parseGuarded parses an object whose bytes r holds; read returns the
// bytes of a range already checked to lie inside the object.
func parseGuarded(r io.ReaderAt, size int64, read func(off, n uint64) ([]byte, error)) (o *Object, err error) {
	// debug/elf is not hardened against every corrupt input; a panic
	// inside it must become an error about the input, not a crash.
	defer func() {
		if p := recover(); p != nil {
			o, err = nil, &FormatError{Msg: fmt.Sprintf("reader failed: %v", p)}
		}
	}()
	return parse(r, uint64(size), read)
}

// debugSection tells whether a section only carries debugging
// information, which the model does not load.
func debugSection(name string) bool {
	name = strings.TrimPrefix(name, ".rela")
	return strings.HasPrefix(name, ".debug_") || strings.HasPrefix(name, ".zdebug_")
}

func parse(r io.ReaderAt, size uint64, read func(off, n uint64) ([]byte, error)) (*Object, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		var fe *elf.FormatError
		magic := make([]byte, 4)
		if _, rerr := r.ReadAt(magic, 0); errors.As(err, &fe) && rerr == nil && string(magic) == elf.ELFMAG {
			return nil, &FormatError{Msg: err.Error()}
		}
		return nil, fmt.Errorf("%w: %v", ErrNotObject, err)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_REL {
		return nil, fmt.Errorf("%w: %s %s %s", ErrNotObject, f.Class, f.Machine, f.Type)
	}
	o := &Object{Sections: make([]*Section, len(f.Sections))}
	var symtab *elf.Section
	for i, s := range f.Sections {
		sec := &Section{
			Index: i, Name: s.Name, Type: s.Type, Flags: s.Flags,
			Size: s.Size, Addralign: s.Addralign, Entsize: s.Entsize,
		}
		o.Sections[i] = sec
		if s.Type == elf.SHT_NOBITS || s.Type == elf.SHT_NULL {
			continue
		}
		// Checked here, before debug/elf reads tables of any claimed size.
		if size < s.Offset || size-s.Offset < s.Size {
			return nil, &FormatError{Section: s.Name, Msg: "extends past end of file"}
		}
		switch {
		case s.Type == elf.SHT_SYMTAB:
			if symtab != nil {
				return nil, &FormatError{Section: s.Name, Msg: "second symbol table"}
			}
			symtab = s
		case s.Type == elf.SHT_STRTAB, debugSection(s.Name):
		default:
			if sec.Data, err = read(s.Offset, s.Size); err != nil {
				return nil, &FormatError{Section: s.Name, Msg: err.Error()}
			}
		}
	}
	if symtab == nil {
		return nil, &FormatError{Msg: "no symbol table"}
	}
	if err := o.readSymbols(f); err != nil {
		return nil, err
	}
	for i, s := range f.Sections {
		if s.Type == elf.SHT_REL {
			return nil, fmt.Errorf("%w: section %s: SHT_REL relocations (x86-64 uses RELA)", ErrNotObject, s.Name)
		}
		if s.Type != elf.SHT_RELA || debugSection(s.Name) {
			continue
		}
		if err := o.readRelas(i, s); err != nil {
			return nil, err
		}
	}
	return o, nil
}

func (o *Object) readSymbols(f *elf.File) error {
	syms, err := f.Symbols()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return &FormatError{Section: ".symtab", Msg: err.Error()}
	}
	// debug/elf drops the null symbol; keep ELF's numbering.
	o.Symbols = make([]*Symbol, len(syms)+1)
	o.Symbols[0] = &Symbol{Name: ""}
	for i, s := range syms {
		sym := &Symbol{
			Index: i + 1, Name: s.Name,
			Bind: elf.ST_BIND(s.Info), Type: elf.ST_TYPE(s.Info), Visibility: elf.ST_VISIBILITY(s.Other),
			Shndx: s.Section, Value: s.Value, Size: s.Size,
		}
		o.Symbols[i+1] = sym
		if s.Section == elf.SHN_UNDEF || s.Section >= elf.SHN_LORESERVE {
			continue
		}
		if int(s.Section) >= len(o.Sections) {
			return &FormatError{Section: ".symtab", Msg: fmt.Sprintf("symbol %q in section %d of %d", s.Name, s.Section, len(o.Sections))}
		}
		sec := o.Sections[s.Section]
		sym.Section = sec
		if sym.Type == elf.STT_SECTION {
			if sym.Name == "" {
				sym.Name = sec.Name
			}
			if sec.Sym == nil {
				sec.Sym = sym
			}
			continue
		}
		sec.Syms = append(sec.Syms, sym)
	}
	for _, sec := range o.Sections {
		sort.SliceStable(sec.Syms, func(i, j int) bool { return sec.Syms[i].Value < sec.Syms[j].Value })
	}
	return nil
}

const relaSize = 24

func (o *Object) readRelas(i int, s *elf.Section) error {
	data := o.Sections[i].Data
	if len(data)%relaSize != 0 {
		return &FormatError{Section: s.Name, Msg: fmt.Sprintf("size %d is not a multiple of %d", len(data), relaSize)}
	}
	if s.Info == 0 || int(s.Info) >= len(o.Sections) {
		return &FormatError{Section: s.Name, Msg: fmt.Sprintf("applies to section %d of %d", s.Info, len(o.Sections))}
	}
	target := o.Sections[s.Info]
	if target.Rela != 0 {
		return &FormatError{Section: s.Name, Msg: "second relocation section for " + target.Name}
	}
	target.Rela = i
	target.Relocs = make([]Reloc, 0, len(data)/relaSize)
	for off := 0; off < len(data); off += relaSize {
		r, err := o.decodeRela(target, data[off:off+relaSize])
		if err != nil {
			return &FormatError{Section: s.Name, Msg: fmt.Sprintf("entry %d: %v", off/relaSize, err)}
		}
		target.Relocs = append(target.Relocs, r)
	}
	sort.SliceStable(target.Relocs, func(a, b int) bool { return target.Relocs[a].Offset < target.Relocs[b].Offset })
	return nil
}

func (o *Object) decodeRela(target *Section, b []byte) (Reloc, error) {
	le := binary.LittleEndian
	info := le.Uint64(b[8:])
	r := Reloc{Offset: le.Uint64(b[0:]), Type: elf.R_X86_64(elf.R_TYPE64(info)), Addend: int64(le.Uint64(b[16:])), InCode: target.Executable()}
	idx := elf.R_SYM64(info)
	if uint64(idx) >= uint64(len(o.Symbols)) {
		return r, fmt.Errorf("symbol %d of %d", idx, len(o.Symbols))
	}
	r.Symbol = o.Symbols[idx]
	if w := SizeOf(r.Type); target.Type != elf.SHT_NOBITS && (w == 0 && r.Type != elf.R_X86_64_NONE || r.Offset > target.Size || target.Size-r.Offset < uint64(w)) {
		return r, fmt.Errorf("%s at %#x outside %s (size %#x)", r.Type, r.Offset, target.Name, target.Size)
	}
	return r, nil
}

// Section returns the first section called name, or nil.
func (o *Object) Section(name string) *Section {
	for _, s := range o.Sections {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// Symbol returns the first non-section symbol called name, or nil.
func (o *Object) Symbol(name string) *Symbol {
	for _, s := range o.Symbols[1:] {
		if s.Name == name && s.Type != elf.STT_SECTION {
			return s
		}
	}
	return nil
}

// SymbolAt returns the symbol of sec whose extent holds off, or nil.
// Zero-sized symbols hold only their own address.
func (sec *Section) SymbolAt(off uint64) *Symbol {
	i := sort.Search(len(sec.Syms), func(i int) bool { return sec.Syms[i].Value > off })
	for j := i - 1; j >= 0; j-- {
		s := sec.Syms[j]
		if off < s.Value+s.Size || off == s.Value {
			return s
		}
		if s.Value < off && s.Size != 0 {
			break
		}
	}
	return nil
}

// RelocsIn returns the relocations of sec whose offsets lie in [start, end).
func (sec *Section) RelocsIn(start, end uint64) []Reloc {
	if end <= start {
		return nil
	}
	lo := sort.Search(len(sec.Relocs), func(i int) bool { return sec.Relocs[i].Offset >= start })
	hi := sort.Search(len(sec.Relocs), func(i int) bool { return sec.Relocs[i].Offset >= end })
	return sec.Relocs[lo:hi]
}

// Bytes returns the contents of sym (nil for NOBITS or out-of-range symbols).
func (s *Symbol) Bytes() []byte {
	if s.Section == nil || s.Section.Data == nil {
		return nil
	}
	d := s.Section.Data
	if s.Value > uint64(len(d)) || uint64(len(d))-s.Value < s.Size {
		return nil
	}
	return d[s.Value : s.Value+s.Size]
}

// Target resolves what a relocation points to. References made through a
// section symbol (as gas emits them for file-local symbols) become the
// real symbol holding the referenced place plus the offset into it; the
// returned offset is the addend relative to the symbol.
// When no symbol covers the place, sym is the section symbol and off the
// offset into the section.
func (r Reloc) Target() (sym *Symbol, off int64) {
	s := r.Symbol
	if s == nil || s.Type != elf.STT_SECTION || s.Section == nil {
		return s, r.Addend
	}
	if !PCRelative(r.Type) || !r.InCode {
		// Absolute, or data like `.long sym - .`: the addend is the place.
		if t := s.Section.SymbolAt(uint64(r.Addend)); r.Addend >= 0 && t != nil {
			return t, r.Addend - int64(t.Value)
		}
		return s, r.Addend
	}
	// The CPU adds a displacement to the end of the instruction, which is
	// 4 bytes after the field, or up to 8 when an immediate follows it.
	for end := int64(4); end <= 8; end++ {
		if place := r.Addend + end; place >= 0 {
			if t := s.Section.SymbolAt(uint64(place)); t != nil {
				return t, r.Addend - int64(t.Value)
			}
		}
	}
	return s, r.Addend
}

// Place is the offset into the target section or symbol that the
// relocation designates: the addend, corrected for the instruction end
// of a PC-relative field in code (assuming no immediate follows it).
func (r Reloc) Place() int64 {
	if PCRelative(r.Type) && r.InCode {
		return r.Addend + 4
	}
	return r.Addend
}

// String returns the NUL-terminated string at off in sec.
func (sec *Section) String(off int64) (string, bool) {
	if off < 0 || off >= int64(len(sec.Data)) {
		return "", false
	}
	b := sec.Data[off:]
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return string(b[:i]), true
	}
	return "", false
}

// DWARF returns the object's debugging information with its relocations
// applied, or an error wrapping io.EOF when it has none.
func (o *Object) DWARF() (d *dwarf.Data, err error) {
	if o.Section(".debug_info") == nil {
		return nil, fmt.Errorf("no DWARF: %w", io.EOF)
	}
	defer func() {
		if r := recover(); r != nil {
			d, err = nil, &FormatError{Section: ".debug_info", Msg: fmt.Sprint(r)}
		}
	}()
	f, err := elf.NewFile(o.src)
	if err != nil {
		return nil, &FormatError{Msg: err.Error()}
	}
	d, err = f.DWARF()
	if err != nil {
		return nil, &FormatError{Section: ".debug_info", Msg: err.Error()}
	}
	return d, nil
}
