package kallsyms

import (
	"bytes"
	"cmp"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"slices"
)

// The tables scripts/kallsyms.c writes into .rodata, each label 8-byte
// aligned. 6.1 (with CONFIG_KALLSYMS_BASE_RELATIVE) writes them in this
// order:
//
//	kallsyms_offsets        int32[num_syms]
//	kallsyms_relative_base  uint64
//	kallsyms_num_syms       uint32
//	kallsyms_names          per symbol: length (ULEB128, 1 or 2 bytes), token bytes
//	kallsyms_markers        uint32[(num_syms+255)/256]: names offset of every 256th symbol
//	kallsyms_seqs_of_names  3 bytes per symbol (6.2 and 6.3 only, here)
//	kallsyms_token_table    256 NUL-terminated strings
//	kallsyms_token_index    uint16[256]: offset of each string in the token table
//
// Since 6.4 (6.12 included) the addresses come last instead: num_syms,
// names, markers, token_table, token_index, then kallsyms_offsets,
// kallsyms_relative_base and kallsyms_seqs_of_names.
//
// A stripped vmlinux has no symbols for these labels, so they are found by
// shape. The token index is distinctive on its own (256 increasing
// offsets from 0 that land exactly on the NULs of 256 printable strings
// just before it). kallsyms_num_syms is then looked for before the token
// table, and accepted only if exactly num_syms names walk to an aligned
// markers table whose every entry matches the walk and which ends where
// the token table (or the 6.2 name sequence table) begins. The offsets
// and the relative base (a kernel address) are taken from before
// num_syms or after the token index, whichever layout fits. Last, every
// name must expand through the tokens to a type letter and a name, and
// the addresses must come out sorted, as scripts/kallsyms sorts them.

// maxSyms bounds num_syms candidates; real kernels have a few hundred
// thousand symbols.
const maxSyms = 1 << 24

// DecodeVmlinux decodes the kallsyms tables of a vmlinux ELF image.
func DecodeVmlinux(vmlinux []byte) (t *Table, err error) {
	defer recoverInto(&err)
	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("%w: only 64-bit little-endian kernels are read", ErrUnsupported)
	}
	ro := f.Section(".rodata")
	if ro == nil || ro.Type != elf.SHT_PROGBITS {
		return nil, fmt.Errorf("%w: no .rodata section (section headers stripped?)", ErrFormat)
	}
	if ro.Offset+ro.Size > uint64(len(vmlinux)) {
		return nil, fmt.Errorf("%w: .rodata beyond the end of the file", ErrFormat)
	}
	sects := allocSections(f)
	syms, err := decodeTables(vmlinux[ro.Offset:ro.Offset+ro.Size], ro.Addr, sects)
	if err != nil {
		return nil, err
	}
	fillSizes(syms, func(addr uint64) uint64 {
		if s := sectionAt(sects, addr); s != nil {
			return s.Addr + s.Size
		}
		return 0
	})
	return newTable(syms), nil
}

// allocSections returns the sections that occupy memory, by address.
func allocSections(f *elf.File) []*elf.Section {
	var out []*elf.Section
	for _, s := range f.Sections {
		if s.Flags&elf.SHF_ALLOC != 0 && s.Size > 0 {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b *elf.Section) int {
		if a.Addr != b.Addr {
			return cmp.Compare(a.Addr, b.Addr)
		}
		return cmp.Compare(b.Size, a.Size) // the enclosing one first
	})
	return out
}

// sectionAt returns the section holding addr, or nil.
func sectionAt(sects []*elf.Section, addr uint64) *elf.Section {
	i, _ := slices.BinarySearchFunc(sects, addr, func(s *elf.Section, a uint64) int {
		if s.Addr > a {
			return 1
		}
		return -1
	})
	// Sections before i start at or below addr; take the nearest that
	// still covers it.
	for j := i - 1; j >= 0; j-- {
		if s := sects[j]; addr < s.Addr+s.Size {
			return s
		}
	}
	return nil
}

// tokens is a located token table.
type tokens struct {
	index [256]int // offsets into the token table
	text  [256]string
}

// decodeTables finds and decodes the kallsyms tables in ro, the contents
// of .rodata loaded at address base.
func decodeTables(ro []byte, base uint64, sects []*elf.Section) ([]Symbol, error) {
	le := binary.LittleEndian
	aligned := func(off int) bool { return (base+uint64(off))%8 == 0 }

	// The token index: scan from the end, where it is.
	var tok *tokens
	var tokStart, tokIndex int
	for p := len(ro) - 512; p >= 0 && tok == nil; p-- {
		if !aligned(p) || le.Uint16(ro[p:]) != 0 || le.Uint16(ro[p+2:]) == 0 {
			continue
		}
		tok, tokStart = tokenTableAt(ro, p, aligned)
		tokIndex = p
	}
	if tok == nil {
		return nil, fmt.Errorf("%w: no kallsyms token table in .rodata (CONFIG_KALLSYMS off?)", ErrFormat)
	}

	inImage := func(a uint64) bool { return sectionAt(sects, a) != nil }
	align8 := func(off int) int {
		for !aligned(off) {
			off++
		}
		return off
	}
	var firstErr error
	for q := tokStart - 8; q >= 0; q-- {
		if !aligned(q) {
			continue
		}
		n := int(le.Uint32(ro[q:]))
		if n == 0 || n > maxSyms || le.Uint32(ro[q+4:]) != 0 {
			continue
		}
		names, marksEnd, ok := walkNames(ro, q+8, n, tokStart, aligned)
		if !ok || align8(marksEnd) != tokStart && align8(marksEnd+3*n) != tokStart {
			continue
		}
		// Where the offsets and the relative base may be: 6.4+ after
		// the token index, 6.1 before num_syms.
		after := align8(tokIndex + 2*256)
		layouts := [][2]int{{after, align8(after + 4*n)}}
		if before := q - 8 - (4*n+7)&^7; before >= 0 {
			layouts = append(layouts, [2]int{before, q - 8})
		}
		for _, l := range layouts {
			offStart, baseAt := l[0], l[1]
			if baseAt < 0 || baseAt+8 > len(ro) || !inImage(le.Uint64(ro[baseAt:])) {
				continue
			}
			offsets := make([]int32, n)
			for i := range offsets {
				offsets[i] = int32(le.Uint32(ro[offStart+4*i:]))
			}
			syms, err := expand(ro[q+8:], names, offsets, le.Uint64(ro[baseAt:]), tok)
			if err == nil {
				return syms, nil
			}
			firstErr = cmp.Or(firstErr, err) // a lookalike; keep looking
		}
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return nil, fmt.Errorf("%w: kallsyms token table at %#x but no names and markers that fit it", ErrFormat, base+uint64(tokStart))
}

// tokenTableAt checks for a token index at p and returns the token table
// that ends right before it, with that table's start.
func tokenTableAt(ro []byte, p int, aligned func(int) bool) (*tokens, int) {
	var t tokens
	for i := range 256 {
		t.index[i] = int(binary.LittleEndian.Uint16(ro[p+2*i:]))
		if i > 0 && t.index[i] <= t.index[i-1]+1 { // every token has a character
			return nil, 0
		}
	}
	// The table starts aligned; the last token's length is unknown, the
	// padding after it is under 8 bytes.
	for lastLen := 1; lastLen < 128; lastLen++ {
		for pad := 0; pad < 8; pad++ {
			start := p - pad - t.index[255] - lastLen - 1
			if start < 0 || !aligned(start) {
				continue
			}
			table := ro[start : p-pad]
			if !bytes.Equal(ro[p-pad:p], make([]byte, pad)) || !validTokens(table, &t.index) {
				continue
			}
			for i := range 256 {
				end := len(table)
				if i < 255 {
					end = t.index[i+1]
				}
				t.text[i] = string(table[t.index[i] : end-1])
			}
			return &t, start
		}
	}
	return nil, 0
}

// validTokens reports whether table is 256 printable strings, each NUL
// terminated, starting at the offsets in index.
func validTokens(table []byte, index *[256]int) bool {
	if table[len(table)-1] != 0 {
		return false
	}
	next := 1
	for i, c := range table {
		if next < 256 && i == index[next]-1 || i == len(table)-1 {
			if c != 0 {
				return false
			}
			next++
			continue
		}
		if c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return next == 257
}

// walkNames walks n length-prefixed names from off and checks the
// markers table after them; it returns the names stream's length and
// where the markers end.
func walkNames(ro []byte, off, n, limit int, aligned func(int) bool) (size, marksEnd int, ok bool) {
	marks := (n + 255) / 256
	if off+n*2 > limit {
		return 0, 0, false
	}
	var recorded []int
	pos := off
	for i := range n {
		if i%256 == 0 {
			recorded = append(recorded, pos-off)
		}
		if pos >= limit {
			return 0, 0, false
		}
		l := int(ro[pos])
		pos++
		if l&0x80 != 0 {
			if pos >= limit {
				return 0, 0, false
			}
			l = l&0x7f | int(ro[pos])<<7
			pos++
		}
		if l == 0 {
			return 0, 0, false
		}
		pos += l
	}
	size = pos - off
	for !aligned(pos) {
		pos++
	}
	if pos+4*marks > limit {
		return 0, 0, false
	}
	for k, want := range recorded {
		if int(binary.LittleEndian.Uint32(ro[pos+4*k:])) != want {
			return 0, 0, false
		}
	}
	return size, pos + 4*marks, true
}

// expand decodes every name and address.
func expand(names []byte, size int, offsets []int32, relBase uint64, tok *tokens) ([]Symbol, error) {
	// With CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64), offsets of ordinary
	// symbols are stored as relBase-1-addr, all negative; without it they
	// are unsigned distances from relBase, nearly all small positives.
	var negative int
	for _, o := range offsets {
		if o < 0 {
			negative++
		}
	}
	absPercpu := negative > len(offsets)/2
	addr := func(o int32) uint64 {
		switch {
		case !absPercpu:
			return relBase + uint64(uint32(o))
		case o >= 0:
			return uint64(o)
		}
		return relBase - 1 - uint64(int64(o))
	}

	// All names go into one string, which the symbols' names share, to
	// allocate once rather than per symbol.
	syms := make([]Symbol, len(offsets))
	ends := make([]int, len(offsets))
	buf := make([]byte, 0, 2*size)
	pos := 0
	for i := range syms {
		l := int(names[pos])
		pos++
		if l&0x80 != 0 {
			l = l&0x7f | int(names[pos])<<7
			pos++
		}
		start := len(buf)
		for _, b := range names[pos : pos+l] {
			buf = append(buf, tok.text[b]...)
		}
		pos += l
		if len(buf)-start < 2 || !typeLetterValid(buf[start]) {
			return nil, fmt.Errorf("%w: kallsyms entry %d expands to %q", ErrFormat, i, buf[start:])
		}
		ends[i] = len(buf)
		syms[i] = Symbol{Type: buf[start], Addr: addr(offsets[i]), Object: Vmlinux}
		if i > 0 && syms[i].Addr < syms[i-1].Addr {
			return nil, fmt.Errorf("%w: kallsyms addresses not sorted at entry %d (%s)", ErrFormat, i, buf[start+1:])
		}
	}
	if pos != size {
		return nil, fmt.Errorf("%w: kallsyms names stream length", ErrFormat)
	}
	all := string(buf)
	start := 0
	for i := range syms {
		syms[i].Name = all[start+1 : ends[i]] // after the type letter
		start = ends[i]
	}
	return syms, nil
}
