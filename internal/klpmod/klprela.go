package klpmod

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
)

// Values from include/uapi/linux/elf.h that debug/elf does not name.
const (
	shfRelaLivepatch = 0x00100000 // SHF_RELA_LIVEPATCH
	shnLivepatch     = 0xff20     // SHN_LIVEPATCH
)

// ErrBadModule means a linked .ko is not in the shape klp relocations
// can be added to.
var ErrBadModule = errors.New("cannot add klp relocations to module")

// KlpSymPrefix starts the name of every symbol livepatch resolves:
// .klp.sym.<object>.<name>,<sympos>.
const KlpSymPrefix = ".klp.sym."

// KlpSymName is the klp symbol for name in object ("vmlinux" or a module
// name); sympos 0 says the name is unique in that object.
func KlpSymName(object, name string, sympos int) string {
	return fmt.Sprintf("%s%s.%s,%d", KlpSymPrefix, object, name, sympos)
}

// rawSection is one section of an ELF file being rewritten.
type rawSection struct {
	hdr  elf.Section64
	name string
	data []byte
}

// ConvertKlpSyms turns a linked livepatch module's references to
// non-exported symbols into klp relocations, rewriting the file at path.
//
// The module refers to such a symbol through an undefined symbol, either
// already named .klp.sym.<object>.<name>,<sympos> (Stitch's own objects)
// or named in rename, which maps it to its klp name (C sources, where the
// assembler cannot spell a klp name); the linker and modpost (with
// KBUILD_MODPOST_WARN) leave undefined symbols alone. Here each becomes an
// SHN_LIVEPATCH symbol, and every relocation against it moves from its
// ordinary .rela section into .klp.rela.<object>.<section>, as
// Documentation/livepatch/module-elf-format.rst describes, so the module
// loader skips it and livepatch applies it when <object> is there. This
// cannot happen before linking: the linker does not know SHN_LIVEPATCH.
// It returns the number of relocations moved per object.
func ConvertKlpSyms(path string, rename map[string]string) (map[string]int, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out, moved, err := convertKlpSyms(raw, rename)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, out, 0o644); err != nil {
		return nil, err
	}
	return moved, os.Rename(tmp, path)
}

func convertKlpSyms(raw []byte, rename map[string]string) (out []byte, moved map[string]int, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: corrupt ELF (%v)", ErrBadModule, p)
		}
	}()
	f, err := elf.NewFile(bytes.NewReader(raw))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadModule, err)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB || f.Type != elf.ET_REL || f.Machine != elf.EM_X86_64 {
		return nil, nil, fmt.Errorf("%w: not an x86-64 relocatable object", ErrBadModule)
	}
	secs := make([]rawSection, len(f.Sections))
	symtab := -1
	for i, s := range f.Sections {
		secs[i] = rawSection{name: s.Name, hdr: elf.Section64{
			Type: uint32(s.Type), Flags: uint64(s.Flags), Addr: s.Addr, Off: s.Offset, Size: s.FileSize,
			Link: s.Link, Info: s.Info, Addralign: s.Addralign, Entsize: s.Entsize,
		}}
		if s.Type != elf.SHT_NOBITS && s.Type != elf.SHT_NULL {
			if s.Offset+s.FileSize > uint64(len(raw)) {
				return nil, nil, fmt.Errorf("%w: section %s extends past the end of the file", ErrBadModule, s.Name)
			}
			secs[i].data = raw[s.Offset : s.Offset+s.FileSize]
		}
		if s.Type == elf.SHT_SYMTAB {
			symtab = i
		}
	}
	if symtab < 0 {
		return nil, nil, fmt.Errorf("%w: no symbol table", ErrBadModule)
	}
	syms, err := f.Symbols()
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadModule, err)
	}
	// Find the klp symbols; debug/elf drops the null symbol, so symbol
	// table index i+1 is syms[i].
	symData := bytes.Clone(secs[symtab].data)
	strtab := int(secs[symtab].hdr.Link)
	if strtab >= len(secs) {
		return nil, nil, fmt.Errorf("%w: symbol table links to no string table", ErrBadModule)
	}
	strData := bytes.Clone(secs[strtab].data)
	klpObj := map[uint32]string{}
	for i, sym := range syms {
		name := sym.Name
		idx := uint32(i + 1)
		ent := symData[int(idx)*elf.Sym64Size:]
		if to, ok := rename[name]; ok && sym.Section == elf.SHN_UNDEF {
			name = to
			binary.LittleEndian.PutUint32(ent, uint32(len(strData))) // st_name
			strData = append(append(strData, name...), 0)
		}
		if !strings.HasPrefix(name, KlpSymPrefix) {
			continue
		}
		obj, _, ok := strings.Cut(strings.TrimPrefix(name, KlpSymPrefix), ".")
		if !ok || obj == "" || !strings.Contains(name, ",") {
			return nil, nil, fmt.Errorf("%w: malformed klp symbol %q", ErrBadModule, name)
		}
		if sym.Section != elf.SHN_UNDEF {
			return nil, nil, fmt.Errorf("%w: klp symbol %q is defined in the module", ErrBadModule, name)
		}
		klpObj[idx] = obj
		binary.LittleEndian.PutUint16(ent[6:], shnLivepatch) // st_shndx
	}
	secs[symtab].data, secs[strtab].data = symData, strData
	moved = map[string]int{}
	if len(klpObj) == 0 {
		return raw, moved, nil
	}

	// Split every ordinary relocation section.
	n := len(secs)
	for i := 0; i < n; i++ {
		s := &secs[i]
		if elf.SectionType(s.hdr.Type) != elf.SHT_RELA || s.hdr.Flags&shfRelaLivepatch != 0 || int(s.hdr.Link) != symtab {
			continue
		}
		if len(s.data)%24 != 0 || int(s.hdr.Info) >= n {
			return nil, nil, fmt.Errorf("%w: malformed relocation section %s", ErrBadModule, s.name)
		}
		var keep []byte
		perObj := map[string][]byte{}
		for off := 0; off < len(s.data); off += 24 {
			ent := s.data[off : off+24]
			sym := uint32(binary.LittleEndian.Uint64(ent[8:]) >> 32)
			obj, ok := klpObj[sym]
			if !ok {
				keep = append(keep, ent...)
				continue
			}
			perObj[obj] = append(perObj[obj], ent...)
			moved[obj]++
		}
		if len(perObj) == 0 {
			continue
		}
		s.data = keep
		target := secs[s.hdr.Info].name
		objs := make([]string, 0, len(perObj))
		for o := range perObj {
			objs = append(objs, o)
		}
		sort.Strings(objs)
		for _, o := range objs {
			secs = append(secs, rawSection{
				name: ".klp.rela." + o + "." + target,
				data: perObj[o],
				hdr: elf.Section64{
					Type: uint32(elf.SHT_RELA),
					// SHF_ALLOC keeps the section in memory after load:
					// livepatch applies it later, maybe much later.
					Flags:     uint64(elf.SHF_ALLOC|elf.SHF_INFO_LINK) | shfRelaLivepatch,
					Link:      uint32(symtab),
					Info:      s.hdr.Info,
					Addralign: 8,
					Entsize:   24,
				},
			})
		}
	}
	shstrndx := -1
	for i, s := range f.Sections {
		if s.Name == ".shstrtab" && s.Type == elf.SHT_STRTAB {
			shstrndx = i
		}
	}
	if shstrndx < 0 {
		return nil, nil, fmt.Errorf("%w: no section name table", ErrBadModule)
	}
	out, err = writeELF(f.FileHeader, secs, shstrndx)
	return out, moved, err
}

// writeELF lays a relocatable ELF file out afresh: header, section
// contents in index order, then the section header table. The section
// name table is rebuilt from the sections' names.
func writeELF(fh elf.FileHeader, secs []rawSection, shstrndx int) ([]byte, error) {
	var names bytes.Buffer
	names.WriteByte(0)
	nameOff := make([]uint32, len(secs))
	seen := map[string]uint32{"": 0}
	for i, s := range secs {
		if off, ok := seen[s.name]; ok {
			nameOff[i] = off
			continue
		}
		nameOff[i] = uint32(names.Len())
		seen[s.name] = nameOff[i]
		names.WriteString(s.name)
		names.WriteByte(0)
	}
	secs[shstrndx].data = names.Bytes()

	buf := make([]byte, 64) // ELF header, filled in last
	for i := range secs {
		s := &secs[i]
		s.hdr.Name = nameOff[i]
		if elf.SectionType(s.hdr.Type) == elf.SHT_NULL {
			continue
		}
		if align := s.hdr.Addralign; align > 1 {
			for uint64(len(buf))%align != 0 {
				buf = append(buf, 0)
			}
		}
		s.hdr.Off = uint64(len(buf))
		if elf.SectionType(s.hdr.Type) != elf.SHT_NOBITS {
			s.hdr.Size = uint64(len(s.data))
			buf = append(buf, s.data...)
		}
	}
	for len(buf)%8 != 0 {
		buf = append(buf, 0)
	}
	shoff := uint64(len(buf))
	for _, s := range secs {
		var err error
		if buf, err = binary.Append(buf, binary.LittleEndian, s.hdr); err != nil {
			return nil, err
		}
	}
	hdr := elf.Header64{
		Type: uint16(fh.Type), Machine: uint16(fh.Machine), Version: uint32(fh.Version),
		Shoff: shoff, Flags: 0, Ehsize: 64, Shentsize: 64,
		Shnum: uint16(len(secs)), Shstrndx: uint16(shstrndx),
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	hdr.Ident[elf.EI_OSABI] = byte(fh.OSABI)
	var h bytes.Buffer
	if err := binary.Write(&h, binary.LittleEndian, hdr); err != nil {
		return nil, err
	}
	copy(buf, h.Bytes())
	return buf, nil
}
