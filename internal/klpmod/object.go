package klpmod

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
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
	// Entry: the registration refers to this new function (a klp
	// callback), so it gets a global alias too.
	Entry bool `json:"entry,omitempty"`
	// Alias, if set, is the name of that global alias: one the fix
	// author's hooks refer to (STITCH_NEW).
	Alias string `json:"alias,omitempty"`
}

// Ref says how the patch reaches a symbol it does not carry.
type Ref struct {
	// Exported: the kernel exports the symbol, so an ordinary relocation
	// resolved by the module loader will do.
	Exported bool
	// Object and Sympos locate the original for a klp relocation.
	Object string
	Sympos int
	// Carry: the target kernel has no copy of this function of the
	// patched file (its build inlined it everywhere), so the patch
	// carries one.
	Carry bool
	// Name is the target's name of the symbol when it is not the one
	// asked for (a static local its build numbered otherwise).
	Name string
	// Internal: another object of the patch defines the symbol (new in
	// the fix): the module's own link resolves it, by its name.
	Internal bool
}

// Resolver tells how to reach name, a symbol of the patched object
// (local says whether it is file-local) or one it refers to.
type Resolver func(name string, local bool) (Ref, error)

// ObjectInput is one compiled object of the fix (the post-fix .o) and
// what to take from it.
type ObjectInput struct {
	Object string // klp object: "vmlinux" or a module name
	Post   []byte // the post-fix object file
	// Layout is the target kernel's special-section layout: the entries
	// of the carried functions are cut out of the tables it describes.
	Layout  *layout.Layout
	Funcs   []Func
	NewData []string // static data the fix adds: carried, not referenced
	// Export names carried symbols, new in the fix, that other objects
	// of the patch use: they stay global in the diff object.
	Export []string
	// PreNames maps a local symbol of the post object to its name in
	// the pre object where the two differ (a renumbered static local,
	// xstats.2 for xstats.0): the running kernel has the pre-fix name,
	// so references to it are resolved by that name.
	PreNames map[string]string
	Resolve  Resolver
}

// preName is the running kernel's name of a symbol of the post object.
func (in *ObjectInput) preName(name string) string {
	if n, ok := in.PreNames[name]; ok {
		return n
	}
	return name
}

// symbolAt returns the named function or object symbol of sec that a
// relocation with the given section-relative addend refers to. A
// PC-relative addend is the target minus the distance from the field to
// the end of the instruction (4, plus any immediate after the field), so
// a few offsets past it are tried. Last, an address just past an object
// is taken as its end (a loop's bound: pool + ARRAY_SIZE(pool)).
func symbolAt(sec *elfobj.Section, addend int64, typ elf.R_X86_64) *elfobj.Symbol {
	named := func(s *elfobj.Symbol) bool {
		return s != nil && (s.Type == elf.STT_FUNC || s.Type == elf.STT_OBJECT)
	}
	biases := []int64{0}
	if elfobj.PCRelative(typ) {
		biases = []int64{4, 5, 6, 8}
	}
	for _, bias := range biases {
		if off := addend + bias; off >= 0 {
			if s := sec.SymbolAt(uint64(off)); named(s) {
				return s
			}
		}
	}
	for _, bias := range biases {
		if off := addend + bias; off > 0 {
			if s := sec.SymbolAt(uint64(off) - 1); named(s) && s.Type == elf.STT_OBJECT && s.Value+s.Size == uint64(off) {
				return s
			}
		}
	}
	return nil
}

// KeySections hold entries the module loader acts on before livepatch has
// applied klp relocations: their keys must be exported symbols (or the
// entries dropped, see droppedSite).
var keySections = map[string]string{
	"__jump_table":       "static key",
	".static_call_sites": "static call",
}

// builder accumulates the diff object.
type builder struct {
	in    *ObjectInput
	o     *elfobj.Object
	keep  map[*elfobj.Section]bool // carried sections of the post object
	order []*elfobj.Section
	undef map[string]bool // undefined symbols the output needs
	alias map[string]string
	// branches are the jump labels rewritten into tests of their keys.
	branches []StaticBranch
}

// WriteObject writes the diff object for one compiled object of a fix:
// the functions in.Funcs with everything they need, references to the
// rest of the kernel as ordinary undefined symbols (exported ones) or klp
// symbols, and the special-section entries of the carried functions. It
// returns the object and, for each changed function, the global alias
// the generated klp_func registration names as new_func.
func WriteObject(in *ObjectInput, aliasPrefix string) ([]byte, map[string]string, error) {
	w, err := Write(in, aliasPrefix)
	if err != nil {
		return nil, nil, err
	}
	return w.Object, w.Alias, nil
}

// Written is a diff object (see WriteObject) and what was decided on
// the way that the build report shows.
type Written struct {
	Object []byte
	Alias  map[string]string
	// Branches are the jump labels on keys the kernel does not export,
	// rewritten into tests of the key (see stubJumpLabels).
	Branches []StaticBranch
}

// Write is WriteObject, with its decisions.
func Write(in *ObjectInput, aliasPrefix string) (*Written, error) {
	o, err := elfobj.Parse(in.Post)
	if err != nil {
		return nil, fmt.Errorf("read post-fix object: %w", err)
	}
	var names []string
	for _, sec := range o.Sections {
		names = append(names, sec.Name)
	}
	if err := in.Layout.Check(names); err != nil {
		// Its entries for the carried code could not be cut out.
		return nil, fmt.Errorf("%w: %w", ErrUnpatchable, err)
	}
	b := &builder{in: in, o: o, keep: map[*elfobj.Section]bool{}, undef: map[string]bool{}, alias: map[string]string{}}
	for _, fn := range in.Funcs {
		s := o.Symbol(fn.Name)
		if s == nil || !s.Func() || !s.Defined() {
			return nil, fmt.Errorf("%w: %s is not a function of the post-fix object", ErrUnpatchable, fn.Name)
		}
		b.carry(s.Section)
		if _, ok := b.alias[fn.Name]; !ok && (!fn.New || fn.Entry) {
			b.alias[fn.Name] = fmt.Sprintf("%s%d", aliasPrefix, len(b.alias))
			if fn.Alias != "" {
				b.alias[fn.Name] = fn.Alias
			}
		}
	}
	for _, name := range in.NewData {
		s := o.Symbol(name)
		if s == nil || !s.Defined() {
			return nil, fmt.Errorf("%w: new data %s is not in the post-fix object", ErrUnpatchable, name)
		}
		b.carry(s.Section)
	}
	for _, name := range in.Export {
		if s := o.Symbol(name); s == nil || !s.Defined() || s.Local() || !b.keep[s.Section] {
			return nil, fmt.Errorf("%w: %s, which other objects of the patch use, is not a global the diff object carries", ErrUnpatchable, name)
		}
	}
	if err := b.close(); err != nil {
		return nil, err
	}
	// Jump labels on keys the kernel does not export become tests of the
	// key; what the rewritten code refers to is resolved again.
	if err := b.stubJumpLabels(); err != nil {
		return nil, err
	}
	if err := b.close(); err != nil {
		return nil, err
	}
	if err := b.checkKeys(); err != nil {
		return nil, err
	}
	out, err := b.write()
	if err != nil {
		return nil, err
	}
	return &Written{Object: out, Alias: b.alias, Branches: b.branches}, nil
}

// close resolves every relocation of the carried sections and of their
// special-section entries. Carrying a section can make others needed
// (string literals, a .cold part, an alternative's replacement code,
// ...), and brings its special-section entries: it goes on until
// nothing changes.
func (b *builder) close() error {
	done := 0
	for {
		for ; done < len(b.order); done++ {
			for _, r := range b.order[done].Relocs {
				if _, err := b.resolve(r); err != nil {
					return fmt.Errorf("%s+%#x: %w", b.order[done].Name, r.Offset, err)
				}
			}
		}
		for _, sp := range b.specials() {
			for _, r := range sp.rels {
				if _, err := b.resolve(r); err != nil {
					return fmt.Errorf("%s entry: %w", sp.sec.Name, err)
				}
			}
		}
		if done == len(b.order) {
			return nil
		}
	}
}

func (b *builder) carry(sec *elfobj.Section) {
	if !b.keep[sec] {
		b.keep[sec] = true
		b.order = append(b.order, sec)
	}
}

// target is what a relocation of the diff object points at: a carried
// section, or else an undefined symbol by name.
type target struct {
	sec    *elfobj.Section
	name   string
	addend int64
}

// resolve decides how the diff object reaches a relocation's target.
func (b *builder) resolve(r elfobj.Reloc) (target, error) {
	s := r.Symbol
	if s.Shndx == elf.SHN_UNDEF {
		return b.external(s.Name, false, r.Addend)
	}
	if s.Section == nil {
		return target{}, fmt.Errorf("%w: relocation against special symbol %s", ErrUnpatchable, s.Name)
	}
	sec := s.Section
	secAddend := r.Addend // relative to the start of sec
	if s.Type != elf.STT_SECTION {
		secAddend += int64(s.Value)
	}
	if b.keep[sec] {
		return target{sec: sec, addend: secAddend}, nil
	}
	if s.Type == elf.STT_SECTION {
		// The assembler turns references to local symbols into
		// section-relative ones: find the symbol meant. Anonymous data
		// (string literals, constants) has none and is carried whole.
		if s = symbolAt(sec, secAddend, r.Type); s == nil {
			if !anonymousData(sec.Name) {
				return target{}, fmt.Errorf("%w: reference into %s+%#x, which no symbol covers", ErrUnpatchable, sec.Name, secAddend)
			}
			b.carry(sec)
			return target{sec: sec, addend: secAddend}, nil
		}
	}
	switch {
	case strings.Contains(s.Name, ".cold"):
		// A .cold part belongs to its function: carry it along.
		b.carry(sec)
		return target{sec: sec, addend: secAddend}, nil
	case anonymousData(sec.Name) && s.Local() && len(sec.Relocs) == 0:
		// A file-local constant without pointers (__func__, a lookup
		// table): a copy is as good as the original, and its name
		// (often "__func__.0") could not be found reliably anyway.
		b.carry(sec)
		return target{sec: sec, addend: secAddend}, nil
	case sec.OnceFlags(), sec.Name == "__dyndbg", s.Local() && s.Size == 0:
		// State with no identity worth keeping: WARN_ONCE flags (a
		// fresh copy means one more warning), dynamic debug descriptors
		// (the patch's pr_debug sites register under the patch module's
		// name), and empty objects such as lockdep class keys without
		// lockdep.
		b.carry(sec)
		return target{sec: sec, addend: secAddend}, nil
	case strings.HasPrefix(sec.Name, ".init") || strings.HasPrefix(sec.Name, ".exit"):
		return target{}, fmt.Errorf("%w: changed code refers to %s in %s, which the kernel frees after boot", ErrUnpatchable, s.Name, sec.Name)
	}
	if s.Func() && s.Local() {
		ref, err := b.in.Resolve(b.in.preName(s.Name), true)
		if err != nil {
			return target{}, err
		}
		if ref.Carry {
			b.carry(sec)
			return target{sec: sec, addend: secAddend}, nil
		}
	}
	return b.external(s.Name, s.Local(), secAddend-int64(s.Value))
}

// anonymousData tells the read-only sections that may be copied into the
// patch when no symbol names what is referenced: string literals and
// constant pools (a copy of a constant is as good as the original), and
// the replacement and fallback code of alternatives (static_cpu_has),
// which belongs to the carried code.
func anonymousData(sec string) bool {
	return strings.HasPrefix(sec, ".rodata") || sec == ".altinstr_replacement" || sec == ".altinstr_aux"
}

// external makes a reference to a symbol the patch does not carry. A
// local one is the running kernel's, under its pre-fix name.
func (b *builder) external(name string, local bool, addend int64) (target, error) {
	if local {
		name = b.in.preName(name)
	}
	ref, err := b.in.Resolve(name, local)
	if err != nil {
		return target{}, err
	}
	if ref.Carry {
		return target{}, fmt.Errorf("%w: the changed code uses %s, which the target kernel does not have", ErrUnpatchable, name)
	}
	if ref.Exported || ref.Internal {
		b.undef[name] = true
		b.nameStaticCallKey(name)
		return target{name: name, addend: addend}, nil
	}
	if ref.Name != "" {
		name = ref.Name
	}
	klp := KlpSymName(ref.Object, name, ref.Sympos)
	b.undef[klp] = true
	return target{name: klp, addend: addend}, nil
}

// nameStaticCallKey adds, next to a reference to a static call's
// trampoline, the static call's key when that is linkable too. Where
// kbuild runs objtool on the whole module (kernels that delay objtool to
// link time, as 6.12 with IBT does), objtool registers each call to a
// trampoline as a static call site, keyed by the key if the object names
// it and by the trampoline if not; the module loader takes a trampoline
// only for a static call whose key the kernel keeps private
// (EXPORT_STATIC_CALL_TRAMP) and refuses the module for the others
// ("Failed to fixup __raw_static_call() usage"). The original object
// named the key in .discard.addressable, which the patch does not carry.
func (b *builder) nameStaticCallKey(tramp string) {
	call, ok := strings.CutPrefix(tramp, "__SCT__")
	if !ok {
		return
	}
	key := "__SCK__" + call
	if ref, err := b.in.Resolve(key, false); err == nil && (ref.Exported || ref.Internal) {
		b.undef[key] = true
	}
}

// special is a special section cut down to the entries of carried code.
type special struct {
	sec  *elfobj.Section // in the post object
	data []byte
	rels []elfobj.Reloc // offsets relative to data
}

// specials cuts every special section of the post object down to the
// entries whose site (the relocation of the field that locates it)
// points into carried code. A table without relocations (.orc_unwind)
// follows another entry for entry.
func (b *builder) specials() []special {
	var out []special
	kept := map[string][]int{} // entries kept, by section
	for _, sec := range b.o.Sections {
		l, ok := b.in.Layout.Section(sec.Name)
		if !ok || l.Follows != "" {
			continue
		}
		size := l.Entry
		sp := special{sec: sec}
		var k []int
		for e := 0; e+size <= len(sec.Data); e += size {
			entry := sec.RelocsIn(uint64(e), uint64(e+size))
			site := slices.IndexFunc(entry, func(r elfobj.Reloc) bool { return r.Offset == uint64(e+l.Site) })
			if site < 0 || entry[site].Symbol == nil || !b.keep[entry[site].Symbol.Section] || b.droppedSite(sec, entry) {
				continue
			}
			base := uint64(len(sp.data))
			sp.data = append(sp.data, sec.Data[e:e+size]...)
			for _, r := range entry {
				r.Offset = r.Offset - uint64(e) + base
				sp.rels = append(sp.rels, r)
			}
			k = append(k, e/size)
		}
		if len(k) == 0 {
			continue
		}
		kept[sec.Name] = k
		out = append(out, sp)
	}
	for _, sec := range b.o.Sections {
		l, ok := b.in.Layout.Section(sec.Name)
		if !ok || l.Follows == "" || kept[l.Follows] == nil {
			continue
		}
		sp := special{sec: sec}
		for _, k := range kept[l.Follows] {
			if (k+1)*l.Entry <= len(sec.Data) {
				sp.data = append(sp.data, sec.Data[k*l.Entry:(k+1)*l.Entry]...)
			}
		}
		out = append(out, sp)
	}
	return out
}

// droppedSite tells the special-section entries whose key the kernel does
// not export but which can safely be left out (their key could not be
// resolved in time anyway; see checkKeys):
//   - a static call site: the call keeps going through the static call's
//     trampoline, which the kernel keeps pointing at the current target;
//   - a tracepoint's jump label: the site stays as compiled, a NOP, so
//     the tracepoint does not fire in the patched function.
func (b *builder) droppedSite(sec *elfobj.Section, entry []elfobj.Reloc) bool {
	if sec.Name != "__jump_table" && sec.Name != ".static_call_sites" {
		return false
	}
	// The key is the entry's last field.
	key, _ := entry[len(entry)-1].Target()
	if len(entry) < 2 || key == nil || key.Type == elf.STT_SECTION {
		return false
	}
	if sec.Name == "__jump_table" && !strings.HasPrefix(key.Name, "__tracepoint_") {
		return false
	}
	name := key.Name
	if key.Local() {
		name = b.in.preName(name)
	}
	ref, err := b.in.Resolve(name, key.Local())
	return err == nil && !ref.Exported && !ref.Internal
}

// checkKeys refuses jump labels and static calls whose key the kernel does
// not export: the module loader sets them up when the module loads, before
// livepatch has resolved any klp relocation.
func (b *builder) checkKeys() error {
	var problems []string
	for _, sp := range b.specials() {
		what, ok := keySections[sp.sec.Name]
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
	secs := []rawSection{{}}
	outIdx := map[*elfobj.Section]int{}
	var outOrder []*elfobj.Section
	type pending struct {
		out  int
		rels []elfobj.Reloc
	}
	var relSecs []pending
	addSection := func(sec *elfobj.Section, data []byte, size uint64) int {
		secs = append(secs, rawSection{name: sec.Name, data: data, hdr: elf.Section64{
			Type: uint32(sec.Type), Flags: uint64(sec.Flags) &^ uint64(elf.SHF_GROUP),
			Addralign: sec.Addralign, Entsize: sec.Entsize, Size: size,
		}})
		outIdx[sec] = len(secs) - 1
		outOrder = append(outOrder, sec)
		return len(secs) - 1
	}
	for _, sec := range b.order {
		i := addSection(sec, sec.Data, sec.Size)
		if len(sec.Relocs) > 0 {
			relSecs = append(relSecs, pending{i, sec.Relocs})
		}
	}
	for _, sp := range b.specials() {
		i := addSection(sp.sec, sp.data, uint64(len(sp.data)))
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
	secSym := map[*elfobj.Section]uint32{}
	for _, sec := range outOrder {
		secSym[sec] = addSym("", elf.ST_INFO(elf.STB_LOCAL, elf.STT_SECTION), outIdx[sec], 0, 0)
	}
	var exported []*elfobj.Symbol
	for _, s := range b.o.Symbols {
		if s.Name == "" || s.Section == nil || (s.Type != elf.STT_FUNC && s.Type != elf.STT_OBJECT) {
			continue
		}
		out, ok := outIdx[s.Section]
		if !ok {
			continue
		}
		if !s.Local() && slices.Contains(b.in.Export, s.Name) {
			exported = append(exported, s)
			continue
		}
		addSym(s.Name, elf.ST_INFO(elf.STB_LOCAL, s.Type), out, s.Value, s.Size)
	}
	firstGlobal := len(syms)
	for _, s := range exported {
		addSym(s.Name, elf.ST_INFO(elf.STB_GLOBAL, s.Type), outIdx[s.Section], s.Value, s.Size)
	}
	fns := make([]string, 0, len(b.alias))
	for fn := range b.alias {
		fns = append(fns, fn)
	}
	sort.Strings(fns)
	for _, fn := range fns {
		s := b.o.Symbol(fn)
		addSym(b.alias[fn], elf.ST_INFO(elf.STB_GLOBAL, elf.STT_FUNC), outIdx[s.Section], s.Value, s.Size)
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
			sym := undefIdx[t.name]
			if t.sec != nil {
				sym = secSym[t.sec]
			}
			data = binary.LittleEndian.AppendUint64(data, r.Offset)
			data = binary.LittleEndian.AppendUint64(data, elf.R_INFO(sym, uint32(r.Type)))
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
	return writeELF(elf.FileHeader{Class: elf.ELFCLASS64, Data: elf.ELFDATA2LSB, Version: elf.EV_CURRENT, Type: elf.ET_REL, Machine: elf.EM_X86_64}, secs, len(secs)-1)
}
