package objdiff

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"strconv"
	"strings"

	"golang.org/x/arch/x86/x86asm"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// side is one object of the comparison with the correlation seen from it.
type side struct {
	obj  *elfobj.Object
	c    *correlation
	post bool
	// lines is the evidence of moved source lines, shared by both sides.
	lines *lineShifts
}

// counterpart returns the symbol on the other side, or nil.
func (s side) counterpart(sym *elfobj.Symbol) *elfobj.Symbol {
	if s.post {
		return s.c.post2pre[sym]
	}
	return s.c.pre2post[sym]
}

// literal identifies a reference to a string literal, possibly through a
// local label (.LC0), by the literal's text and the offset into it: its
// place in the string section moves whenever another literal of the file
// is added or removed.
func literal(r elfobj.Reloc) (string, bool) {
	str, rel, ok := literalText(r)
	if !ok {
		return "", false
	}
	return "str:" + strconv.Quote(str) + "+" + strconv.FormatInt(rel, 10), true
}

// literalText is the string literal a relocation points into and the
// offset of the pointer from the literal's place.
func literalText(r elfobj.Reloc) (string, int64, bool) {
	t, off := r.Target()
	if t == nil || t.Section == nil || !t.Section.Strings() {
		return "", 0, false
	}
	place := int64(t.Value) + off + r.Place() - r.Addend
	str, ok := t.Section.String(place)
	if !ok {
		return "", 0, false
	}
	return str, int64(t.Value) + off - place, true
}

// ident names what a relocation points to in terms that mean the same in
// both objects: the post-side name of a correlated symbol plus the offset
// into it, the text of a string literal, or an external symbol's name.
func (s side) ident(r elfobj.Reloc) string {
	t, off := r.Target()
	if t == nil {
		return "?"
	}
	o := strconv.FormatInt(off, 10)
	if str, ok := literal(r); ok {
		return str
	}
	if t.Type == elf.STT_SECTION {
		sec := t.Section
		if sec == nil {
			return "sec:" + t.Name + "+" + o
		}
		place := off + r.Place() - r.Addend
		if sec.Name == ".altinstr_replacement" {
			// Offsets into the replacement pool move when any
			// alternative of the file changes; the entry's own bytes
			// say which replacement it is.
			return "altinstr_replacement"
		}
		if sec.Flags&elf.SHF_MERGE != 0 && sec.Entsize > 0 && place >= 0 && uint64(place)+sec.Entsize <= uint64(len(sec.Data)) {
			return "const:" + string(sec.Data[place:uint64(place)+sec.Entsize]) + "+" + strconv.FormatInt(off-place, 10)
		}
		return "sec:" + baseName(sec.Name) + "+" + o
	}
	if !t.Defined() {
		return "ext:" + t.Name + "+" + o
	}
	if !candidate(t) {
		return "sym:" + t.Name + "+" + o
	}
	name := t.Name
	if s.post {
		if s.c.post2pre[t] == nil {
			return "new:" + name + "+" + o
		}
	} else {
		m := s.c.pre2post[t]
		if m == nil {
			return "gone:" + name + "+" + o
		}
		name = m.Name
	}
	return "sym:" + name + "+" + o
}

// masked returns data with every relocation field zeroed. Objects already
// have zeros there, except REL-style leftovers, so this is cheap insurance.
func masked(data []byte, relocs []elfobj.Reloc, base uint64) []byte {
	out := bytes.Clone(data)
	for _, r := range relocs {
		o := r.Offset - base
		for i := 0; i < elfobj.SizeOf(r.Type) && o+uint64(i) < uint64(len(out)); i++ {
			out[o+uint64(i)] = 0
		}
	}
	return out
}

// sameRelocs compares two relocation lists by position, type and target.
func sameRelocs(a side, ra []elfobj.Reloc, baseA uint64, b side, rb []elfobj.Reloc, baseB uint64) bool {
	if len(ra) != len(rb) {
		return false
	}
	for i := range ra {
		x, y := ra[i], rb[i]
		if x.Offset-baseA != y.Offset-baseB || x.Type != y.Type || a.ident(x) != b.ident(y) {
			return false
		}
	}
	return true
}

// funcRelocs compares two functions' relocations like sameRelocs; a pair
// that points to string literals differing only in "FILE:LINE" line
// numbers that moved with their code (see lineShifts) counts as the same
// and sets lines.
func funcRelocs(a side, ra []elfobj.Reloc, baseA uint64, b side, rb []elfobj.Reloc, baseB uint64) (same, lines bool) {
	if len(ra) != len(rb) {
		return false, false
	}
	for i := range ra {
		x, y := ra[i], rb[i]
		if x.Offset-baseA != y.Offset-baseB || x.Type != y.Type {
			return false, false
		}
		if a.ident(x) == b.ident(y) {
			continue
		}
		sx, ox, okx := literalText(x)
		sy, oy, oky := literalText(y)
		if !okx || !oky || ox != oy || !b.lines.literalLinesOnly(sx, sy) {
			return false, false
		}
		lines = true
	}
	return true, lines
}

// funcDiff is the outcome of comparing one pair of functions.
type funcDiff int

const (
	same funcDiff = iota
	lineOnly
	changed
)

func compareFunc(a side, fa *elfobj.Symbol, b side, fb *elfobj.Symbol) funcDiff {
	da, db := fa.Bytes(), fb.Bytes()
	if da == nil || db == nil || len(da) != len(db) {
		return changed
	}
	ra := fa.Section.RelocsIn(fa.Value, fa.Value+fa.Size)
	rb := fb.Section.RelocsIn(fb.Value, fb.Value+fb.Size)
	sameR, literalLines := funcRelocs(a, ra, fa.Value, b, rb, fb.Value)
	if !sameR {
		return changed
	}
	ma, mb := masked(da, ra, fa.Value), masked(db, rb, fb.Value)
	switch {
	case bytes.Equal(ma, mb) && literalLines:
		return lineOnly
	case bytes.Equal(ma, mb):
		return same
	case onlyLines(fa, ma, mb, b.lines):
		return lineOnly
	}
	return changed
}

// lineTakers are kernel functions that take __FILE__/__LINE__-style
// arguments, for call sites that pass no file name string.
var lineTakers = map[string]bool{
	"__might_sleep": true, "__might_resched": true, "__might_fault": true,
	"__cant_sleep": true, "__cant_migrate": true, "__warn_printk": true,
	"warn_slowpath_fmt": true, "lockdep_rcu_suspicious": true, "__might_resched_noirq": true,
}

// argRegs32 are the 32-bit views of the argument registers of the x86-64
// calling convention, where a __LINE__ is passed.
var argRegs32 = map[x86asm.Reg]bool{
	x86asm.EDI: true, x86asm.ESI: true, x86asm.EDX: true,
	x86asm.ECX: true, x86asm.R8L: true, x86asm.R9L: true,
}

// onlyLines tells whether two function bodies of the same length, with
// equal relocations, differ only in __LINE__ immediates: `mov $line, %reg`
// into an argument register in a call sequence that also passes a source
// file name or calls a function known to take a line number, where the
// line table shows the code of the old value's line now at the new
// value's line (lineShifts). A constant that changed for any other reason
// does not pass: no code at its old value's line moved to its new one.
func onlyLines(f *elfobj.Symbol, a, b []byte, lines *lineShifts) bool {
	type insn struct{ off, end int }
	var insns []insn
	var diffs []int
	for off := 0; off < len(a); {
		x, errA := x86asm.Decode(a[off:], 64)
		y, errB := x86asm.Decode(b[off:], 64)
		if errA != nil || errB != nil || x.Len != y.Len {
			return false
		}
		in := insn{off: off, end: off + x.Len}
		if !bytes.Equal(a[off:in.end], b[off:in.end]) {
			if !isLineMov(x) || !isLineMov(y) || !lines.movedTo("", int(x.Args[1].(x86asm.Imm)), int(y.Args[1].(x86asm.Imm))) {
				return false
			}
			diffs = append(diffs, len(insns))
		}
		insns = append(insns, in)
		off = in.end
	}
	if len(diffs) == 0 {
		return false
	}
	for _, d := range diffs {
		// The call sequence: from after the previous call to the end of
		// the next call (or jump, for tail calls).
		start, end := 0, len(a)
		for i := d - 1; i >= 0; i-- {
			if isCall(a[insns[i].off:insns[i].end]) {
				start = insns[i].end
				break
			}
		}
		for i := d + 1; i < len(insns); i++ {
			if isCall(a[insns[i].off:insns[i].end]) {
				end = insns[i].end
				break
			}
		}
		if !lineContext(f.Section.RelocsIn(f.Value+uint64(start), f.Value+uint64(end))) {
			return false
		}
	}
	return true
}

func isLineMov(in x86asm.Inst) bool {
	if in.Op != x86asm.MOV || len(in.Args) < 2 {
		return false
	}
	r, ok := in.Args[0].(x86asm.Reg)
	imm, ok2 := in.Args[1].(x86asm.Imm)
	return ok && ok2 && argRegs32[r] && imm > 0 && imm < 1<<20
}

func isCall(code []byte) bool {
	in, err := x86asm.Decode(code, 64)
	return err == nil && (in.Op == x86asm.CALL || in.Op == x86asm.JMP && len(code) == 5)
}

func lineContext(relocs []elfobj.Reloc) bool {
	for _, r := range relocs {
		t, off := r.Target()
		if t == nil {
			continue
		}
		if lineTakers[t.Name] {
			return true
		}
		if t.Section == nil || !t.Section.Strings() {
			continue
		}
		place := int64(t.Value) + off + r.Place() - r.Addend
		if str, ok := t.Section.String(place); ok && (strings.HasSuffix(str, ".c") || strings.HasSuffix(str, ".h")) {
			return true
		}
	}
	return false
}

// compareData compares a correlated pair of data objects: size, contents
// and what their relocations point to.
func compareData(a side, da *elfobj.Symbol, b side, db *elfobj.Symbol) (sizeChanged, contentChanged bool) {
	if da.Size != db.Size {
		return true, false
	}
	ra := da.Section.RelocsIn(da.Value, da.Value+da.Size)
	rb := db.Section.RelocsIn(db.Value, db.Value+db.Size)
	if !sameRelocs(a, ra, da.Value, b, rb, db.Value) {
		return false, true
	}
	ba, bb := da.Bytes(), db.Bytes()
	if (ba == nil) != (bb == nil) {
		return false, true
	}
	ma, mb := masked(ba, ra, da.Value), masked(bb, rb, db.Value)
	if f, ok := dataLineFields[da.Section.Name]; ok && da.Section.Name == db.Section.Name {
		maskLine(ma, f)
		maskLine(mb, f)
	}
	return false, !bytes.Equal(ma, mb)
}

// lineField locates a __LINE__ bit field in the records of a data section.
type lineField struct {
	off  int
	mask uint32 // bits of the little-endian word at off
}

// dataLineFields are the data sections whose records carry a line number
// that moves when the file is edited elsewhere.
var dataLineFields = map[string]lineField{
	// struct _ddebug: four pointers, then lineno:18 in a 32-bit word.
	"__dyndbg": {off: 32, mask: 1<<18 - 1},
}

func maskLine(b []byte, f lineField) {
	if len(b) < f.off+4 {
		return
	}
	w := binary.LittleEndian.Uint32(b[f.off:])
	binary.LittleEndian.PutUint32(b[f.off:], w&^f.mask)
}
