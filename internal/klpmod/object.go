package klpmod

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// ErrUnpatchable means the functions cannot be carried by a livepatch
// module as they are; the error says why.
var ErrUnpatchable = errors.New("cannot live-patch")

// Func is a function the patch carries: a changed one, which replaces
// the running kernel's function of the same name, or a new one, which
// only the changed ones call.
type Func struct {
	Name   string `json:"name"`
	Sympos int    `json:"sympos"` // of the original, for klp_func.old_sympos
	New    bool   `json:"new"`
}

// Ref says how the patch reaches a symbol it does not carry.
type Ref struct {
	// Exported: the kernel exports the symbol, so an ordinary relocation
	// resolved by the module loader will do.
	Exported bool
	// Object and Sympos locate the original for a klp relocation.
	Object string
	Sympos int
}

// Resolver tells how to reach name, a symbol of the patched object
// (local says whether it is file-local) or one it refers to.
type Resolver func(name string, local bool) (Ref, error)

// ObjectInput is one compiled object of the fix (the post-fix .o) and
// what to take from it.
type ObjectInput struct {
	Object  string // klp object: "vmlinux" or a module name
	Post    []byte // the post-fix object file
	Funcs   []Func
	NewData []string // static data the fix adds: carried, not referenced
	Resolve Resolver
}

// rela is one x86-64 RELA entry.
type rela struct {
	off    uint64
	sym    uint32
	typ    elf.R_X86_64
	addend int64
}

// object is a parsed relocatable object: debug/elf's view plus the
// relocations of each section and raw symbol indices.
type object struct {
	f     *elf.File
	syms  []elf.Symbol // syms[i] is symbol table index i; index 0 is null
	relas map[int][]rela
	data  map[int][]byte
}

func parseObject(raw []byte) (o *object, err error) {
	defer func() {
		if p := recover(); p != nil {
			o, err = nil, fmt.Errorf("corrupt ELF object (%v)", p)
		}
	}()
	f, err := elf.NewFile(bytes.NewReader(raw))
	if err != nil {
		return nil, err
	}
	if f.Type != elf.ET_REL || f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("not an x86-64 relocatable object")
	}
	syms, err := f.Symbols()
	if err != nil {
		return nil, err
	}
	o = &object{f: f, syms: append([]elf.Symbol{{}}, syms...), relas: map[int][]rela{}, data: map[int][]byte{}}
	for i, s := range f.Sections {
		if s.Type == elf.SHT_NOBITS || s.Type == elf.SHT_NULL {
			continue
		}
		d, err := s.Data()
		if err != nil {
			return nil, fmt.Errorf("section %s: %w", s.Name, err)
		}
		o.data[i] = d
		if s.Type != elf.SHT_RELA {
			continue
		}
		if len(d)%24 != 0 || int(s.Info) >= len(f.Sections) {
			return nil, fmt.Errorf("malformed relocation section %s", s.Name)
		}
		for off := 0; off < len(d); off += 24 {
			info := binary.LittleEndian.Uint64(d[off+8:])
			r := rela{
				off:    binary.LittleEndian.Uint64(d[off:]),
				sym:    uint32(info >> 32),
				typ:    elf.R_X86_64(uint32(info)),
				addend: int64(binary.LittleEndian.Uint64(d[off+16:])),
			}
			if int(r.sym) >= len(o.syms) {
				return nil, fmt.Errorf("relocation in %s refers to symbol %d of %d", s.Name, r.sym, len(o.syms))
			}
			o.relas[int(s.Info)] = append(o.relas[int(s.Info)], r)
		}
	}
	return o, nil
}

// symbolAt returns the named function or object symbol of section sec
// that a relocation with the given section-relative addend refers to. A
// PC-relative addend is the target minus the distance from the field to
// the end of the instruction (4, plus any immediate after the field), so
// a few offsets past it are tried.
func (o *object) symbolAt(sec int, addend int64, typ elf.R_X86_64) (int, bool) {
	biases := []int64{0}
	if typ == elf.R_X86_64_PC32 || typ == elf.R_X86_64_PLT32 {
		biases = []int64{4, 5, 6, 8}
	}
	for _, bias := range biases {
		off := addend + bias
		if off < 0 {
			continue
		}
		for i, s := range o.syms {
			if int(s.Section) != sec || s.Name == "" {
				continue
			}
			if t := elf.ST_TYPE(s.Info); t != elf.STT_FUNC && t != elf.STT_OBJECT {
				continue
			}
			if s.Value <= uint64(off) && (uint64(off) < s.Value+s.Size || (s.Size == 0 && uint64(off) == s.Value)) {
				return i, true
			}
		}
	}
	return 0, false
}

func (o *object) symbol(name string) (int, bool) {
	for i, s := range o.syms {
		if s.Name == name && s.Section != elf.SHN_UNDEF {
			typ := elf.ST_TYPE(s.Info)
			if typ == elf.STT_FUNC || typ == elf.STT_OBJECT {
				return i, true
			}
		}
	}
	return 0, false
}

// Entry sizes of the special sections whose entries point at code (x86-64,
// Linux 6.1: arch/x86/include/asm/{bug,extable,jump_label,alternative,
// static_call,paravirt_types}.h and objtool). An entry is carried when its
// first relocation points into a carried section.
var specialSections = map[string]int{
	"__bug_table":        12,
	"__ex_table":         12,
	"__jump_table":       16,
	".altinstructions":   12,
	".static_call_sites": 8,
	".retpoline_sites":   4,
	".return_sites":      4,
	".orc_unwind_ip":     4,
	"__mcount_loc":       8,
	".smp_locks":         4,
	".parainstructions":  16,
	".ibt_endbr_seal":    4,
}

// KeySections hold entries the module loader acts on before livepatch has
// applied klp relocations: their keys must be exported symbols.
var keySections = map[string]string{
	"__jump_table":       "static key",
	".static_call_sites": "static call",
}

// builder accumulates the diff object.
type builder struct {
	in       *ObjectInput
	o        *object
	keep     map[int]bool // carried sections, by index in the post object
	order    []int
	undef    map[string]bool // undefined symbols the output needs
	alias    map[string]string
	problems []string
}

// WriteObject writes the diff object for one compiled object of a fix:
// the functions in.Funcs with everything they need, references to the
// rest of the kernel as ordinary undefined symbols (exported ones) or klp
// symbols, and the special-section entries of the carried functions. It
// returns the object and, for each changed function, the global alias
// the generated klp_func registration names as new_func.
func WriteObject(in *ObjectInput, aliasPrefix string) ([]byte, map[string]string, error) {
	o, err := parseObject(in.Post)
	if err != nil {
		return nil, nil, fmt.Errorf("read post-fix object: %w", err)
	}
	b := &builder{in: in, o: o, keep: map[int]bool{}, undef: map[string]bool{}, alias: map[string]string{}}
	for _, fn := range in.Funcs {
		i, ok := o.symbol(fn.Name)
		if !ok || elf.ST_TYPE(o.syms[i].Info) != elf.STT_FUNC {
			return nil, nil, fmt.Errorf("%w: %s is not a function of the post-fix object", ErrUnpatchable, fn.Name)
		}
		b.carry(int(o.syms[i].Section))
		if !fn.New {
			b.alias[fn.Name] = fmt.Sprintf("%s%d", aliasPrefix, len(b.alias))
		}
	}
	for _, name := range in.NewData {
		i, ok := o.symbol(name)
		if !ok {
			return nil, nil, fmt.Errorf("%w: new data %s is not in the post-fix object", ErrUnpatchable, name)
		}
		b.carry(int(o.syms[i].Section))
	}
	// Carrying a section can make others needed (string literals, a .cold
	// part, an alternative's replacement code, ...), and brings its
	// special-section entries: go on until nothing changes.
	done := 0
	for {
		for ; done < len(b.order); done++ {
			for _, r := range o.relas[b.order[done]] {
				if _, err := b.resolve(r); err != nil {
					return nil, nil, fmt.Errorf("%s+%#x: %w", o.f.Sections[b.order[done]].Name, r.off, err)
				}
			}
		}
		for _, sp := range b.specials() {
			for _, r := range sp.rels {
				if _, err := b.resolve(r); err != nil {
					return nil, nil, fmt.Errorf("%s entry: %w", o.f.Sections[sp.sec].Name, err)
				}
			}
		}
		if done == len(b.order) {
			break
		}
	}
	if err := b.checkKeys(); err != nil {
		return nil, nil, err
	}
	out, err := b.write()
	if err != nil {
		return nil, nil, err
	}
	return out, b.alias, nil
}

func (b *builder) carry(sec int) {
	if !b.keep[sec] {
		b.keep[sec] = true
		b.order = append(b.order, sec)
	}
}

// target is what a relocation of the diff object points at: a carried
// section (sec > 0) or an undefined symbol by name.
type target struct {
	sec    int
	name   string
	addend int64
}

// resolve decides how the diff object reaches a relocation's target.
func (b *builder) resolve(r rela) (target, error) {
	o := b.o
	s := o.syms[r.sym]
	if s.Section == elf.SHN_UNDEF {
		return b.external(s.Name, false, r.addend)
	}
	if s.Section >= elf.SHN_LORESERVE {
		return target{}, fmt.Errorf("%w: relocation against special symbol %s", ErrUnpatchable, s.Name)
	}
	sec := int(s.Section)
	secName := o.f.Sections[sec].Name
	secAddend := r.addend // relative to the start of sec
	if elf.ST_TYPE(s.Info) != elf.STT_SECTION {
		secAddend += int64(s.Value)
	}
	if b.keep[sec] {
		return target{sec: sec, addend: secAddend}, nil
	}
	if elf.ST_TYPE(s.Info) == elf.STT_SECTION {
		// The assembler turns references to local symbols into
		// section-relative ones: find the symbol meant. Anonymous data
		// (string literals, constants) has none and is carried whole.
		i, ok := o.symbolAt(sec, secAddend, r.typ)
		if !ok {
			if !anonymousData(secName) {
				return target{}, fmt.Errorf("%w: reference into %s+%#x, which no symbol covers", ErrUnpatchable, secName, secAddend)
			}
			b.carry(sec)
			return target{sec: sec, addend: secAddend}, nil
		}
		s = o.syms[i]
	}
	switch {
	case strings.Contains(s.Name, ".cold"):
		// A .cold part belongs to its function: carry it along.
		b.carry(sec)
		return target{sec: sec, addend: secAddend}, nil
	case anonymousData(secName) && elf.ST_BIND(s.Info) == elf.STB_LOCAL && len(o.relas[sec]) == 0:
		// A file-local constant without pointers (__func__, a lookup
		// table): a copy is as good as the original, and its name
		// (often "__func__.0") could not be found reliably anyway.
		b.carry(sec)
		return target{sec: sec, addend: secAddend}, nil
	case secName == ".data.once":
		// WARN_ONCE state: a fresh copy only means one more warning.
		b.carry(sec)
		return target{sec: sec, addend: secAddend}, nil
	case strings.HasPrefix(secName, ".init") || strings.HasPrefix(secName, ".exit"):
		return target{}, fmt.Errorf("%w: changed code refers to %s in %s, which the kernel frees after boot", ErrUnpatchable, s.Name, secName)
	}
	return b.external(s.Name, elf.ST_BIND(s.Info) == elf.STB_LOCAL, secAddend-int64(s.Value))
}

// anonymousData tells the read-only sections that may be copied into the
// patch when no symbol names what is referenced: string literals and
// constant pools (a copy of a constant is as good as the original), and
// the replacement code of alternatives, which belongs to the carried code.
func anonymousData(sec string) bool {
	return strings.HasPrefix(sec, ".rodata") || sec == ".altinstr_replacement"
}

// external makes a reference to a symbol the patch does not carry.
func (b *builder) external(name string, local bool, addend int64) (target, error) {
	ref, err := b.in.Resolve(name, local)
	if err != nil {
		return target{}, err
	}
	if ref.Exported {
		b.undef[name] = true
		return target{name: name, addend: addend}, nil
	}
	klp := KlpSymName(ref.Object, name, ref.Sympos)
	b.undef[klp] = true
	return target{name: klp, addend: addend}, nil
}

// special is a special section cut down to the entries of carried code.
type special struct {
	sec  int // in the post object
	data []byte
	rels []rela // offsets relative to data
	kept []int  // indices of the kept entries
}

// specials cuts every special section of the post object down to the
// entries whose first relocation points into carried code. .orc_unwind
// has no relocations: it follows .orc_unwind_ip entry for entry.
func (b *builder) specials() []special {
	o := b.o
	var out []special
	var orcKept []int
	for sec, s := range o.f.Sections {
		size, ok := specialSections[s.Name]
		if !ok {
			continue
		}
		sp := special{sec: sec}
		d := o.data[sec]
		rs := append([]rela(nil), o.relas[sec]...)
		sort.Slice(rs, func(i, j int) bool { return rs[i].off < rs[j].off })
		for e, ri := 0, 0; e+size <= len(d); e += size {
			var entry []rela
			for ; ri < len(rs) && rs[ri].off < uint64(e+size); ri++ {
				if rs[ri].off >= uint64(e) {
					entry = append(entry, rs[ri])
				}
			}
			if len(entry) == 0 {
				continue
			}
			anchor := o.syms[entry[0].sym]
			if anchor.Section == elf.SHN_UNDEF || anchor.Section >= elf.SHN_LORESERVE || !b.keep[int(anchor.Section)] {
				continue
			}
			base := uint64(len(sp.data))
			sp.data = append(sp.data, d[e:e+size]...)
			for _, r := range entry {
				r.off = r.off - uint64(e) + base
				sp.rels = append(sp.rels, r)
			}
			sp.kept = append(sp.kept, e/size)
		}
		if len(sp.kept) == 0 {
			continue
		}
		if s.Name == ".orc_unwind_ip" {
			orcKept = sp.kept
		}
		out = append(out, sp)
	}
	if orc := o.f.Section(".orc_unwind"); orc != nil && orcKept != nil {
		for i, s := range o.f.Sections {
			if s != orc {
				continue
			}
			sp := special{sec: i, kept: orcKept}
			for _, k := range orcKept {
				if (k+1)*6 <= len(o.data[i]) {
					sp.data = append(sp.data, o.data[i][k*6:(k+1)*6]...)
				}
			}
			out = append(out, sp)
		}
	}
	return out
}

// checkKeys refuses jump labels and static calls whose key the kernel does
// not export: the module loader sets them up when the module loads, before
// livepatch has resolved any klp relocation.
func (b *builder) checkKeys() error {
	var problems []string
	for _, sp := range b.specials() {
		what, ok := keySections[b.o.f.Sections[sp.sec].Name]
		if !ok {
			continue
		}
		for _, r := range sp.rels {
			t, err := b.resolve(r)
			if err != nil {
				return err
			}
			if strings.HasPrefix(t.name, KlpSymPrefix) {
				problems = append(problems, fmt.Sprintf("the changed code uses the %s %s, which the kernel does not export (the module loader would set it up before livepatch can resolve it)", what, strings.TrimPrefix(t.name, KlpSymPrefix)))
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", ErrUnpatchable, strings.Join(problems, "; "))
	}
	return nil
}

// write lays the diff object out: carried sections with their rebuilt
// relocations, the special sections' kept entries, and a symbol table of
// section symbols, the carried sections' named symbols (made local, so
// they cannot clash with the kernel's), the aliases, and the undefined
// symbols.
func (b *builder) write() ([]byte, error) {
	o := b.o
	secs := []rawSection{{}}
	outIdx := map[int]int{} // post section index -> output index
	var outOrder []int      // post section indices in output order
	type pending struct {
		out  int
		rels []rela
	}
	var relSecs []pending
	addSection := func(post int, data []byte) int {
		h := o.f.Sections[post]
		secs = append(secs, rawSection{name: h.Name, data: data, hdr: elf.Section64{
			Type: uint32(h.Type), Flags: uint64(h.Flags) &^ uint64(elf.SHF_GROUP),
			Addralign: h.Addralign, Entsize: h.Entsize, Size: h.Size,
		}})
		outIdx[post] = len(secs) - 1
		outOrder = append(outOrder, post)
		return len(secs) - 1
	}
	for _, sec := range b.order {
		i := addSection(sec, o.data[sec])
		if len(o.relas[sec]) > 0 {
			relSecs = append(relSecs, pending{i, o.relas[sec]})
		}
	}
	for _, sp := range b.specials() {
		i := addSection(sp.sec, sp.data)
		secs[i].hdr.Size = uint64(len(sp.data))
		if len(sp.rels) > 0 {
			relSecs = append(relSecs, pending{i, sp.rels})
		}
	}

	// Symbols: null, section symbols, named locals, then globals.
	var strtab bytes.Buffer
	strtab.WriteByte(0)
	var syms []elf.Sym64
	addSym := func(name string, info byte, shndx int, value, size uint64) uint32 {
		var nameOff uint32
		if name != "" {
			nameOff = uint32(strtab.Len())
			strtab.WriteString(name)
			strtab.WriteByte(0)
		}
		syms = append(syms, elf.Sym64{Name: nameOff, Info: info, Shndx: uint16(shndx), Value: value, Size: size})
		return uint32(len(syms) - 1)
	}
	addSym("", 0, 0, 0, 0)
	secSym := map[int]uint32{}
	for _, post := range outOrder {
		secSym[post] = addSym("", elf.ST_INFO(elf.STB_LOCAL, elf.STT_SECTION), outIdx[post], 0, 0)
	}
	for _, s := range o.syms {
		t := elf.ST_TYPE(s.Info)
		if s.Name == "" || s.Section == elf.SHN_UNDEF || s.Section >= elf.SHN_LORESERVE || (t != elf.STT_FUNC && t != elf.STT_OBJECT) {
			continue
		}
		if out, ok := outIdx[int(s.Section)]; ok {
			addSym(s.Name, elf.ST_INFO(elf.STB_LOCAL, t), out, s.Value, s.Size)
		}
	}
	firstGlobal := len(syms)
	names := make([]string, 0, len(b.alias))
	for fn := range b.alias {
		names = append(names, fn)
	}
	sort.Strings(names)
	for _, fn := range names {
		i, _ := o.symbol(fn)
		s := o.syms[i]
		addSym(b.alias[fn], elf.ST_INFO(elf.STB_GLOBAL, elf.STT_FUNC), outIdx[int(s.Section)], s.Value, s.Size)
	}
	undefIdx := map[string]uint32{}
	undefs := make([]string, 0, len(b.undef))
	for n := range b.undef {
		undefs = append(undefs, n)
	}
	sort.Strings(undefs)
	for _, n := range undefs {
		undefIdx[n] = addSym(n, elf.ST_INFO(elf.STB_GLOBAL, elf.STT_NOTYPE), 0, 0, 0)
	}

	symtabIdx := len(secs) + len(relSecs)
	for _, p := range relSecs {
		var data []byte
		for _, r := range p.rels {
			t, err := b.resolve(r)
			if err != nil {
				return nil, err
			}
			var sym uint32
			if t.sec > 0 {
				sym = secSym[t.sec]
			} else {
				sym = undefIdx[t.name]
			}
			data = binary.LittleEndian.AppendUint64(data, r.off)
			data = binary.LittleEndian.AppendUint64(data, elf.R_INFO(sym, uint32(r.typ)))
			data = binary.LittleEndian.AppendUint64(data, uint64(t.addend))
		}
		secs = append(secs, rawSection{name: ".rela" + secs[p.out].name, data: data, hdr: elf.Section64{
			Type: uint32(elf.SHT_RELA), Flags: uint64(elf.SHF_INFO_LINK),
			Link: uint32(symtabIdx), Info: uint32(p.out), Addralign: 8, Entsize: 24,
		}})
	}
	var symData []byte
	for _, s := range syms {
		var err error
		if symData, err = binary.Append(symData, binary.LittleEndian, s); err != nil {
			return nil, err
		}
	}
	secs = append(secs,
		rawSection{name: ".symtab", data: symData, hdr: elf.Section64{
			Type: uint32(elf.SHT_SYMTAB), Link: uint32(symtabIdx + 1), Info: uint32(firstGlobal),
			Addralign: 8, Entsize: elf.Sym64Size,
		}},
		rawSection{name: ".strtab", data: strtab.Bytes(), hdr: elf.Section64{Type: uint32(elf.SHT_STRTAB), Addralign: 1}},
		rawSection{name: ".shstrtab", hdr: elf.Section64{Type: uint32(elf.SHT_STRTAB), Addralign: 1}},
	)
	return writeELF(o.f.FileHeader, secs, len(secs)-1)
}
