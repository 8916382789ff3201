package klpmod

import (
	"cmp"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/arch/x86/x86asm"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// Static branches on keys the patch module cannot link to.
//
// A jump label site (arch/x86/include/asm/jump_label.h) is a NOP or a
// `jmp` of 5 bytes (or 2, a short jump) with a __jump_table entry {code,
// target, key}, the key field's low bit being the branch sense. The kernel
// makes the site jump to target iff static_key_enabled(key) XOR branch
// (kernel/jump_label.c, jump_label_type), where enabled means
// key->enabled != 0: -1 marks a first enable in progress and counts as
// enabled (static_key_count). The module loader sets the sites up at
// load, before livepatch resolves klp relocations, so an entry whose key
// the kernel does not export cannot be carried. Its site is rewritten
// instead into a jump to a stub appended to the function:
//
//	cmpl $0, key(%rip)    ; through a klp relocation, fine in normal text
//	jne/je target         ; jne when the site jumps with the key on
//	jmp site+size
//
// The stub reads the key's count at every pass, so the carried function
// follows the key as the original's site does. The flags are free to
// clobber: gcc marks every x86 asm statement, asm goto included, as
// clobbering them (its RTL has (clobber (reg:CC flags)) for it), so none
// is live across a site. The stub is reached by a direct jump only (no
// ENDBR needed under IBT), pushes nothing, and lies inside the function's
// symbol, which is extended over it: kallsyms, klp_check_stack's range
// check of the new function, and objtool (when it runs on the module)
// see it as the function's. Where the object has ORC tables, each stub
// gets the ORC entry in effect at its site, so a task interrupted in the
// stub still unwinds reliably.

// StaticBranch is a jump label of carried code rewritten into a test of
// its key.
type StaticBranch struct {
	Object string `json:"object"`   // klp object: vmlinux or a module
	Func   string `json:"function"` // the carried function holding the site
	Offset uint64 `json:"offset"`   // of the site in Func
	Size   int    `json:"size"`     // bytes at the site: 5, or 2 (a short jump)
	Key    string `json:"key"`      // the running kernel's symbol of the key
	// JumpsWhenOn: the site jumps to its target while the key is enabled
	// (branch bit 0); otherwise while it is disabled.
	JumpsWhenOn bool   `json:"jumps_when_on"`
	Stub        uint64 `json:"stub"` // offset of the stub in Func
	// Moved is how many bytes of instructions after a 2-byte site out of
	// a short jump's reach were moved into the stub, to make room for a
	// 5-byte jump to it (a detour); 0 for the others.
	Moved int `json:"moved,omitempty"`
	// MovedBefore: the moved instructions are the ones before the site
	// (they run before the test); otherwise the ones after it.
	MovedBefore bool `json:"moved_before,omitempty"`
}

func (s StaticBranch) String() string {
	when := "off"
	if s.JumpsWhenOn {
		when = "on"
	}
	moved := ""
	if s.Moved > 0 {
		where := "after"
		if s.MovedBefore {
			where = "before"
		}
		moved = fmt.Sprintf(", the %d bytes %s it moved into the test", s.Moved, where)
	}
	return fmt.Sprintf("%s:%s+%#x on %s (%d-byte site%s, jumps when %s; test at +%#x)", s.Object, s.Func, s.Offset, s.Key, s.Size, moved, when, s.Stub)
}

// Instruction bytes of a jump label site and of the stub.
var (
	nop5 = []byte{0x0f, 0x1f, 0x44, 0x00, 0x00} // BYTES_NOP5
	nop2 = []byte{0x66, 0x90}                   // BYTES_NOP2
)

const (
	opJmp32 = 0xe9
	opJmp8  = 0xeb
	// stubSize: cmpl $0,disp32(%rip) (7) + jcc rel32 (6) + jmp rel32 (5).
	stubSize = 18
)

// jumpSite is one __jump_table entry of carried code to rewrite.
type jumpSite struct {
	entry  uint64 // offset of the entry in __jump_table
	sec    *elfobj.Section
	off    uint64 // of the site in sec
	size   int
	target elfobj.Reloc // the entry's target field
	key    *elfobj.Symbol
	keyOff int64 // of the static_key in key (a member of a bigger struct)
	branch bool
	name   string // the key in the running kernel
}

// stubJumpLabels rewrites the jump label sites of carried code whose key
// the kernel does not export (and that droppedSite does not leave out)
// into tests of the key and drops their __jump_table entries.
func (b *builder) stubJumpLabels() error {
	jt := b.o.Section("__jump_table")
	l, ok := b.in.Layout.Section("__jump_table")
	if jt == nil || !ok || l.Entry != 16 {
		return nil
	}
	var sites []jumpSite
	for e := 0; e+l.Entry <= len(jt.Data); e += l.Entry {
		entry := jt.RelocsIn(uint64(e), uint64(e+l.Entry))
		if len(entry) == 0 || entry[0].Offset != uint64(e+l.Site) || entry[0].Symbol == nil || !b.keep[entry[0].Symbol.Section] {
			continue
		}
		if b.droppedSite(jt, entry) {
			continue
		}
		s, err := b.jumpSite(jt, uint64(e), entry)
		if err != nil {
			return err
		}
		if s != nil {
			sites = append(sites, *s)
		}
	}
	if len(sites) == 0 {
		return nil
	}
	bySec := map[*elfobj.Section][]jumpSite{}
	var secs []*elfobj.Section
	for _, s := range sites {
		if bySec[s.sec] == nil {
			secs = append(secs, s.sec)
		}
		bySec[s.sec] = append(bySec[s.sec], s)
	}
	for _, sec := range secs {
		if err := b.stubSection(sec, bySec[sec]); err != nil {
			return err
		}
	}
	dropEntries(jt, l.Entry, sites)
	return nil
}

// jumpSite reads the entry at e of __jump_table: nil when its key is
// reachable as it is (exported, or carried).
func (b *builder) jumpSite(jt *elfobj.Section, e uint64, entry []elfobj.Reloc) (*jumpSite, error) {
	code := entry[0]
	if len(entry) != 3 || entry[1].Offset != e+4 || entry[2].Offset != e+8 {
		return nil, fmt.Errorf("%w: __jump_table entry at %#x has %d relocations, not code, target and key", ErrUnpatchable, e, len(entry))
	}
	t, err := b.resolve(entry[2])
	if err != nil {
		return nil, err
	}
	if t.sec != nil || !strings.HasPrefix(t.name, KlpSymPrefix) {
		return nil, nil // the module loader can reach the key
	}
	sec := code.Symbol.Section
	s := &jumpSite{entry: e, sec: sec, target: entry[1], name: strings.TrimPrefix(t.name, KlpSymPrefix)}
	s.off = uint64(placeOf(code))
	where := fmt.Sprintf("%s+%#x", sec.Name, s.off)
	if !sec.Executable() || s.off >= uint64(len(sec.Data)) {
		return nil, fmt.Errorf("%w: the jump label at %s is not in code", ErrUnpatchable, where)
	}
	key, off := entry[2].Target()
	if key == nil || key.Type == elf.STT_SECTION {
		return nil, fmt.Errorf("%w: the jump label at %s has a key no symbol names (%s)", ErrUnpatchable, where, s.name)
	}
	s.key, s.branch, s.keyOff = key, off&1 != 0, off&^3
	code0 := sec.Data[s.off:]
	switch {
	case hasPrefix(code0, nop5), len(code0) >= 5 && code0[0] == opJmp32:
		s.size = 5
	case hasPrefix(code0, nop2), len(code0) >= 2 && code0[0] == opJmp8:
		s.size = 2
	default:
		return nil, fmt.Errorf("%w: the jump label at %s on %s is neither a NOP nor a jmp (% x)", ErrUnpatchable, where, s.name, code0[:min(5, len(code0))])
	}
	if ts := s.target.Symbol; ts == nil || ts.Section == nil || !b.keep[ts.Section] {
		return nil, fmt.Errorf("%w: the jump label at %s on %s jumps outside the carried code", ErrUnpatchable, where, s.name)
	}
	return s, nil
}

// placeOf is the section offset a data relocation (`.long sym - .`)
// designates.
func placeOf(r elfobj.Reloc) int64 {
	if r.Symbol.Type == elf.STT_SECTION {
		return r.Addend
	}
	return int64(r.Symbol.Value) + r.Addend
}

func hasPrefix(b, p []byte) bool { return len(b) >= len(p) && string(b[:len(p)]) == string(p) }

// stubSection appends the stubs of sites (all in sec) to sec and points
// the sites at them. The stubs of short sites come first, the earliest
// site's first, where a 2-byte jump has the best chance to reach.
func (b *builder) stubSection(sec *elfobj.Section, sites []jumpSite) error {
	slices.SortFunc(sites, func(x, y jumpSite) int {
		if x.size != y.size {
			return cmp.Compare(x.size, y.size)
		}
		return cmp.Compare(x.off, y.off)
	})
	oldEnd := uint64(len(sec.Data))
	data := slices.Clone(sec.Data) // the caller's bytes stay as they were
	relocs := slices.Clone(sec.Relocs)
	var stubs []uint64
	var code *codeFacts // decoded when a detour first needs it
	for _, s := range sites {
		stub := uint64(len(data))
		fn := sec.SymbolAt(s.off)
		fnName, fnOff := sec.Name, s.off
		if fn != nil {
			fnName, fnOff = fn.Name, s.off-fn.Value
		}
		// The site: a jump to the stub; no relocation is left in it (a
		// jmp to another section, or the R_X86_64_NONE objtool leaves
		// where it wrote a NOP).
		rel := int64(stub) - int64(s.off) - int64(s.size)
		back := s.off + uint64(s.size) // where the stub's fall-through goes on
		from := s.off                  // the rewritten code: [from, back)
		var moved []byte               // instructions that move into the stub, from movedAt
		var movedAt uint64
		before := false // they come before the site (and run before the test)
		if s.size == 2 && rel > 127 {
			// Out of a short jump's reach: move the instructions after
			// (or else before) the site into the stub, for room for a
			// 5-byte jump.
			if code == nil {
				code = b.decode(sec)
			}
			code.base = s.off - fnOff
			changes := b.orcChanges(sec)
			n, whyAfter := code.detour(s.off+2, changes)
			if whyAfter == "" {
				movedAt, back = s.off+2, s.off+2+n
			} else {
				first, whyBefore := code.detourBefore(s.off, changes)
				if whyBefore != "" {
					return fmt.Errorf("%w: %s+%#x: the static branch on %s (not exported by the kernel, so its jump label cannot be carried) is a 2-byte jump %d bytes before the end of the function, where its test of the key goes (a 2-byte jump reaches 127), and neither the code after it (%s) nor the code before it (%s) can move into the test to make room for a 5-byte jump. Hooks cannot change compiled code; to carry the fix, read the key with static_key_enabled() instead of static_branch_likely/unlikely() in %s, or leave %s unchanged", ErrUnpatchable, fnName, fnOff, s.name, rel, whyAfter, whyBefore, fnName, fnName)
				}
				movedAt, from, before = first, first, true
			}
			end := back
			if before {
				end = s.off
			}
			moved = slices.Clone(sec.Data[movedAt:end])
			for i := from + 5; i < back; i++ {
				data[i] = 0x90 // never executed: nothing enters them
			}
			data[from] = opJmp32
			binary.LittleEndian.PutUint32(data[from+1:], uint32(int32(int64(stub)-int64(from)-5)))
		} else if s.size == 2 {
			data[s.off], data[s.off+1] = opJmp8, byte(int8(rel))
		} else {
			data[s.off] = opJmp32
			binary.LittleEndian.PutUint32(data[s.off+1:], uint32(int32(rel)))
		}
		// The moved instructions, with their relocations: a PC-relative
		// field keeps its distance to the end of its instruction, so its
		// addend holds.
		emitMoved := func() {
			at := uint64(len(data))
			data = append(data, moved...)
			for _, r := range sec.RelocsIn(movedAt, movedAt+uint64(len(moved))) {
				r.Offset = r.Offset - movedAt + at
				relocs = append(relocs, r)
			}
		}
		relocs = slices.DeleteFunc(relocs, func(r elfobj.Reloc) bool {
			return r.Offset >= from && r.Offset < back
		})
		if before {
			emitMoved()
		}

		// cmpl $0, key(%rip): the displacement is relative to the end of
		// the instruction, 5 bytes past the field (an imm8 follows it).
		at := uint64(len(data))
		data = append(data, 0x83, 0x3d, 0, 0, 0, 0, 0x00)
		relocs = append(relocs, elfobj.Reloc{Offset: at + 2, Type: elf.R_X86_64_PC32, Symbol: s.key, Addend: s.keyOff - 5, InCode: true})
		// jne target (the site jumps while the key is on) or je.
		jcc := byte(0x85)
		if s.branch {
			jcc = 0x84
		}
		at = uint64(len(data))
		data = append(data, 0x0f, jcc, 0, 0, 0, 0)
		if ts := s.target.Symbol; ts.Section == sec {
			binary.LittleEndian.PutUint32(data[at+2:], uint32(int32(placeOf(s.target)-int64(at+6))))
		} else {
			relocs = append(relocs, elfobj.Reloc{Offset: at + 2, Type: elf.R_X86_64_PC32, Symbol: ts, Addend: s.target.Addend - 4, InCode: true})
		}
		if !before {
			emitMoved()
		}
		// jmp back past the site (and what moved).
		end := uint64(len(data)) + 5
		data = append(data, opJmp32, 0, 0, 0, 0)
		binary.LittleEndian.PutUint32(data[end-4:], uint32(int32(int64(back)-int64(end))))
		stubs = append(stubs, stub)

		key := s.key.Name
		if s.key.Local() {
			key = b.in.preName(key)
		}
		st := StaticBranch{Object: b.in.Object, Func: fnName, Offset: fnOff, Size: s.size, Key: key, JumpsWhenOn: !s.branch, Stub: stub, Moved: len(moved), MovedBefore: before}
		if fn != nil {
			st.Stub -= fn.Value
		}
		b.branches = append(b.branches, st)
	}
	slices.SortStableFunc(relocs, func(x, y elfobj.Reloc) int { return cmp.Compare(x.Offset, y.Offset) })
	newEnd := uint64(len(data))
	sec.Data, sec.Relocs, sec.Size = data, relocs, newEnd
	// The function ending where the stubs begin now ends after them.
	for _, s := range sec.Syms {
		if s.Type == elf.STT_FUNC && s.Size > 0 && s.Value+s.Size == oldEnd {
			s.Size += newEnd - oldEnd
		}
	}
	return b.orcStubs(sec, sites, stubs, oldEnd, newEnd)
}

// orcStubs gives each stub the ORC entry in effect at its site (it
// changes neither the stack nor the frame) and moves the section's
// terminator (objtool's undefined entry at its end) past the stubs.
// Without ORC tables in the object (objtool runs on the linked module,
// or not at all) there is nothing to do here.
func (b *builder) orcStubs(sec *elfobj.Section, sites []jumpSite, stubs []uint64, oldEnd, newEnd uint64) error {
	ip, orc := b.o.Section(".orc_unwind_ip"), b.o.Section(".orc_unwind")
	l, ok := b.in.Layout.Section(".orc_unwind")
	if ip == nil || orc == nil || !ok || l.Entry <= 0 {
		return nil
	}
	type entry struct {
		idx int
		off int64
	}
	var in []entry
	for _, r := range ip.Relocs {
		if r.Symbol != nil && r.Symbol.Section == sec && r.Offset%4 == 0 {
			in = append(in, entry{int(r.Offset / 4), placeOf(r)})
		}
	}
	if len(in) == 0 {
		return nil
	}
	relocs := slices.Clone(ip.Relocs)
	ipData, orcData := slices.Clone(ip.Data), slices.Clone(orc.Data)
	for i, r := range relocs {
		if r.Symbol != nil && r.Symbol.Section == sec && placeOf(r) == int64(oldEnd) {
			relocs[i].Addend += int64(newEnd - oldEnd)
		}
	}
	for i, s := range sites {
		at := -1
		var best int64 = -1
		for _, e := range in {
			if e.off <= int64(s.off) && e.off > best {
				at, best = e.idx, e.off
			}
		}
		if at < 0 || (at+1)*l.Entry > len(orc.Data) {
			return fmt.Errorf("%w: no ORC entry covers the jump label at %s+%#x", ErrUnpatchable, sec.Name, s.off)
		}
		sym, addend := sec.Sym, int64(stubs[i])
		if sym == nil {
			return fmt.Errorf("%w: %s has no section symbol for the ORC entry of its stub", ErrUnpatchable, sec.Name)
		}
		relocs = append(relocs, elfobj.Reloc{Offset: uint64(len(ipData)), Type: elf.R_X86_64_PC32, Symbol: sym, Addend: addend})
		ipData = append(ipData, 0, 0, 0, 0)
		orcData = append(orcData, orc.Data[at*l.Entry:(at+1)*l.Entry]...)
	}
	ip.Data, ip.Relocs, ip.Size = ipData, relocs, uint64(len(ipData))
	orc.Data, orc.Size = orcData, uint64(len(orcData))
	return nil
}

// codeFacts are what a detour needs to know of a section's code: where
// its instructions start, and the places something may enter it.
type codeFacts struct {
	base   uint64 // reasons name offsets from here (the function's start)
	data   []byte
	starts map[uint64]bool
	order  []uint64        // the starts, ascending
	jumped map[uint64]bool // targets of the section's direct branches
	refs   map[uint64]int  // places relocations designate, with how many
	relocs *elfobj.Section
}

// entered tells whether something may enter the code at off other than
// by falling through.
func (c *codeFacts) entered(off uint64) bool { return c.jumped[off] || c.refs[off] > 0 }

// decode decodes sec from its start, as objtool does, and collects the
// places that may be entered other than by falling through: the
// targets of its direct branches, and whatever a relocation of any
// section of the object designates in it (a jump table, an exception
// fixup, an alternative, another jump label's site or target, an
// annotation), at any place a field of its kind may designate. The ORC
// tables only describe the code.
func (b *builder) decode(sec *elfobj.Section) *codeFacts {
	c := &codeFacts{data: sec.Data, starts: map[uint64]bool{}, jumped: map[uint64]bool{}, refs: map[uint64]int{}, relocs: sec}
	for _, other := range b.o.Sections {
		if other.Name == ".orc_unwind_ip" {
			continue
		}
		for _, r := range other.Relocs {
			if r.Symbol == nil || r.Symbol.Section != sec {
				continue
			}
			base := r.Addend
			if r.Symbol.Type != elf.STT_SECTION {
				base += int64(r.Symbol.Value)
			}
			lo, hi := int64(0), int64(0) // data designates its place
			if r.InCode && elfobj.PCRelative(r.Type) {
				lo, hi = 4, 8 // an instruction's field ends 4 to 8 bytes before it
			}
			for d := lo; d <= hi; d++ {
				if base+d >= 0 {
					c.refs[uint64(base+d)]++
				}
			}
		}
	}
	for off := uint64(0); off < uint64(len(sec.Data)); {
		c.starts[off] = true
		c.order = append(c.order, off)
		if hasPrefix(sec.Data[off:], []byte{0xf3, 0x0f, 0x1e, 0xfa}) { // ENDBR64, which x86asm does not know
			off += 4
			continue
		}
		in, err := x86asm.Decode(sec.Data[off:], 64)
		if err != nil || in.Len == 0 {
			break // what follows cannot be moved: not a start
		}
		n := uint64(in.Len)
		if rel, ok := in.Args[0].(x86asm.Rel); ok && len(sec.RelocsIn(off, off+n)) == 0 {
			if t := int64(off+n) + int64(rel); t >= 0 {
				c.jumped[uint64(t)] = true
			}
		}
		off += n
	}
	return c
}

// detour tells how many bytes of instructions from off (just after a
// 2-byte site) must move into the stub for the site to hold a 5-byte
// jump (at least 3), or why they cannot: something enters them, one is
// a branch or a call, reads memory relative to itself without a
// relocation, or changes the stack (changes lists the offsets where the
// ORC state changes, when the object has ORC).
func (c *codeFacts) detour(off uint64, changes map[uint64]bool) (uint64, string) {
	n := uint64(0)
	for n < 3 {
		at := off + n
		if !c.starts[at] || at >= uint64(len(c.data)) {
			return 0, fmt.Sprintf("the code at +%#x could not be decoded", at-c.base)
		}
		if c.entered(at) {
			return 0, fmt.Sprintf("code jumps to +%#x", at-c.base)
		}
		if changes[at] {
			return 0, fmt.Sprintf("the unwind state changes at +%#x", at-c.base)
		}
		l, why := c.movable(at)
		if why != "" {
			return 0, why
		}
		n += l
		for x := at + 1; x < off+n; x++ {
			if c.entered(x) {
				return 0, fmt.Sprintf("something refers to +%#x", x-c.base)
			}
		}
		if changes[off+n] {
			return 0, fmt.Sprintf("the instruction at +%#x changes the stack", at-c.base)
		}
	}
	return n, ""
}

// movable tells the length of the instruction at at if it can run
// elsewhere (in a stub), or why not: a branch, a call or a return, or
// memory addressed relative to itself without a relocation.
func (c *codeFacts) movable(at uint64) (uint64, string) {
	if hasPrefix(c.data[at:], []byte{0xf3, 0x0f, 0x1e, 0xfa}) {
		return 0, fmt.Sprintf("+%#x is an ENDBR", at-c.base)
	}
	in, err := x86asm.Decode(c.data[at:], 64)
	if err != nil {
		return 0, fmt.Sprintf("the code at +%#x could not be decoded", at-c.base)
	}
	switch in.Op {
	case x86asm.CALL, x86asm.JMP, x86asm.RET, x86asm.UD2, x86asm.INT:
		return 0, fmt.Sprintf("+%#x is a %s", at-c.base, strings.ToLower(in.Op.String()))
	}
	for _, a := range in.Args {
		switch a := a.(type) {
		case x86asm.Rel:
			return 0, fmt.Sprintf("+%#x is a branch", at-c.base)
		case x86asm.Mem:
			if a.Base == x86asm.RIP && len(c.relocs.RelocsIn(at, at+uint64(in.Len))) == 0 {
				return 0, fmt.Sprintf("+%#x addresses memory relative to itself", at-c.base)
			}
		}
	}
	return uint64(in.Len), ""
}

// detourBefore tells where the instructions before a 2-byte site at
// site begin that must move into the stub for the site and them to hold
// a 5-byte jump, or why they cannot. A jump to the first of them is fine
// (it lands on the jump to the stub, which runs them first); nothing
// may enter the others or the site (but the site's own jump label), none
// may be a branch or change the unwind state.
func (c *codeFacts) detourBefore(site uint64, changes map[uint64]bool) (uint64, string) {
	i, ok := slices.BinarySearch(c.order, site)
	switch {
	case !ok:
		return 0, "the site could not be decoded"
	case c.jumped[site] || c.refs[site] > 1:
		return 0, fmt.Sprintf("code jumps to the site, +%#x", site-c.base)
	case changes[site]:
		return 0, fmt.Sprintf("the unwind state changes at the site, +%#x", site-c.base)
	}
	first := site
	for site+2-first < 5 {
		if i--; i < 0 {
			return 0, "the function starts there"
		}
		at := c.order[i]
		if first != site && (c.entered(first) || changes[first]) {
			return 0, fmt.Sprintf("code jumps to +%#x", first-c.base)
		}
		if _, why := c.movable(at); why != "" {
			return 0, why
		}
		if c.refs[at] > 0 {
			return 0, fmt.Sprintf("something refers to +%#x", at-c.base)
		}
		first = at
	}
	return first, ""
}

// orcChanges are the offsets of sec where the object's ORC tables say
// the unwind state changes (none without ORC tables).
func (b *builder) orcChanges(sec *elfobj.Section) map[uint64]bool {
	out := map[uint64]bool{}
	if ip := b.o.Section(".orc_unwind_ip"); ip != nil {
		for _, r := range ip.Relocs {
			if r.Symbol != nil && r.Symbol.Section == sec {
				out[uint64(placeOf(r))] = true
			}
		}
	}
	return out
}

// dropEntries removes the rewritten sites' entries from __jump_table.
func dropEntries(jt *elfobj.Section, size int, sites []jumpSite) {
	gone := map[uint64]bool{}
	for _, s := range sites {
		gone[s.entry] = true
	}
	var data []byte
	var relocs []elfobj.Reloc
	for e := uint64(0); e+uint64(size) <= uint64(len(jt.Data)); e += uint64(size) {
		if gone[e] {
			continue
		}
		base := uint64(len(data))
		data = append(data, jt.Data[e:e+uint64(size)]...)
		for _, r := range jt.RelocsIn(e, e+uint64(size)) {
			r.Offset = r.Offset - e + base
			relocs = append(relocs, r)
		}
	}
	jt.Data, jt.Relocs, jt.Size = data, relocs, uint64(len(data))
}
