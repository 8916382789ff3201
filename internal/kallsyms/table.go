package kallsyms

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Symbol is one kallsyms entry.
type Symbol struct {
	Name string `json:"name"`
	// Type is the kallsyms/nm type letter: t/T text, d/D data, r/R
	// read-only data, b/B bss, and so on; lower case for local symbols.
	Type   byte   `json:"type"`
	Addr   uint64 `json:"addr"`
	Object string `json:"object"` // Vmlinux or a module's name
	// Sympos is the 1-based position of this symbol among the symbols of
	// the same name in the same object, in kallsyms order.
	Sympos int `json:"sympos"`
	// Size runs to the next higher symbol address of the same object,
	// cut at the end of the symbol's section when that is known (as the
	// kernel's kallsyms_lookup_size_offset sizes symbols). 0 if unknown.
	Size uint64 `json:"size"`
}

// IsText reports whether the symbol is in a code section.
func (s Symbol) IsText() bool { return s.Type == 't' || s.Type == 'T' }

// Line is the symbol as /proc/kallsyms prints it (without the module
// column): "ffffffff81000000 T _text".
func (s Symbol) Line() string { return fmt.Sprintf("%016x %c %s", s.Addr, s.Type, s.Name) }

type objName struct{ object, name string }

// Table is the symbols of one or more objects, in kallsyms order. It is
// read-only once built and safe for concurrent use.
type Table struct {
	syms []Symbol
	// The symbols of each name in each object are chained in kallsyms
	// order: a chain in one array, not a slice per name, saves ~100k
	// allocations for a kernel.
	first map[objName]int32
	next  []int32 // next symbol of the same name and object, or -1
}

// newTable indexes syms (already in kallsyms order, sizes filled) and
// numbers each name's occurrences per object.
func newTable(syms []Symbol) *Table {
	t := &Table{syms: syms, first: make(map[objName]int32, len(syms)), next: make([]int32, len(syms))}
	last := make(map[objName]int32, len(syms))
	for i := range syms {
		k := objName{syms[i].Object, syms[i].Name}
		t.next[i] = -1
		if j, ok := last[k]; ok {
			t.next[j] = int32(i)
			syms[i].Sympos = syms[j].Sympos + 1
		} else {
			t.first[k] = int32(i)
			syms[i].Sympos = 1
		}
		last[k] = int32(i)
	}
	return t
}

// indices returns the positions of name's symbols in object.
func (t *Table) indices(object, name string) []int32 {
	i, ok := t.first[objName{object, name}]
	if !ok {
		return nil
	}
	var out []int32
	for ; i >= 0; i = t.next[i] {
		out = append(out, i)
	}
	return out
}

// Len is the number of symbols.
func (t *Table) Len() int { return len(t.syms) }

// Symbols returns every symbol in kallsyms order. The slice is shared:
// do not modify it.
func (t *Table) Symbols() []Symbol { return t.syms }

// Lookup returns every symbol called name in object (Vmlinux or a module
// name), in kallsyms order; their Sympos are 1, 2, ...
func (t *Table) Lookup(object, name string) []Symbol {
	idx := t.indices(object, name)
	out := make([]Symbol, len(idx))
	for i, j := range idx {
		out[i] = t.syms[j]
	}
	return out
}

// SymbolError is why Find could not resolve a symbol; it wraps
// ErrNotFound or ErrAmbiguous.
type SymbolError struct {
	Object, Name string
	Sympos       int // as asked
	Count        int // how many symbols of that name the object has
	Err          error
}

func (e *SymbolError) Error() string {
	switch {
	case errors.Is(e.Err, ErrAmbiguous):
		return fmt.Sprintf("%s in %s: %v: it occurs %d times; give its sympos", e.Name, e.Object, e.Err, e.Count)
	case e.Count > 0:
		return fmt.Sprintf("%s,%d in %s: %v: it occurs %d times", e.Name, e.Sympos, e.Object, e.Err, e.Count)
	}
	return fmt.Sprintf("%s in %s: %v", e.Name, e.Object, e.Err)
}

func (e *SymbolError) Unwrap() error { return e.Err }

// Find resolves a symbol the way livepatch resolves a klp_func or klp
// relocation: sympos 0 requires the name to be unique in object, sympos N
// picks the Nth occurrence. Failures are *SymbolError.
func (t *Table) Find(object, name string, sympos int) (Symbol, error) {
	idx := t.indices(object, name)
	fail := func(err error) (Symbol, error) {
		return Symbol{}, &SymbolError{Object: object, Name: name, Sympos: sympos, Count: len(idx), Err: err}
	}
	switch {
	case len(idx) == 0:
		return fail(ErrNotFound)
	case sympos == 0 && len(idx) > 1:
		return fail(ErrAmbiguous)
	case sympos == 0:
		return t.syms[idx[0]], nil
	case sympos < 0 || sympos > len(idx):
		return fail(ErrNotFound)
	}
	return t.syms[idx[sympos-1]], nil
}

// KlpSympos is the sympos a livepatch module should record for s: 0 when
// its name is unique in its object, its position otherwise.
func (t *Table) KlpSympos(s Symbol) int {
	if len(t.indices(s.Object, s.Name)) == 1 {
		return 0
	}
	return s.Sympos
}

// Objects returns the objects with symbols in the table, in order of first
// appearance.
func (t *Table) Objects() []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range t.syms {
		if !seen[s.Object] {
			seen[s.Object] = true
			out = append(out, s.Object)
		}
	}
	return out
}

// Has reports whether object defines a symbol called name.
func (t *Table) Has(object, name string) bool {
	_, ok := t.first[objName{object, name}]
	return ok
}

// fillSizes sets each symbol's Size to the distance to the next higher
// address in the same object, bounded by end(addr) when end returns
// non-zero (the end of the section holding addr). Module symbols are in
// symbol-table order, not address order, hence the sort.
func fillSizes(syms []Symbol, end func(uint64) uint64) {
	addrs := map[string][]uint64{}
	for _, s := range syms {
		addrs[s.Object] = append(addrs[s.Object], s.Addr)
	}
	for _, a := range addrs {
		slices.Sort(a)
	}
	for k := range syms {
		s := &syms[k]
		a := addrs[s.Object]
		i, _ := slices.BinarySearch(a, s.Addr+1)
		var next uint64
		if i < len(a) {
			next = a[i]
		}
		var limit uint64
		if end != nil {
			limit = end(s.Addr)
		}
		switch {
		case next != 0 && (limit == 0 || next <= limit):
			s.Size = next - s.Addr
		case limit > s.Addr:
			s.Size = limit - s.Addr
		}
	}
}

// typeLetterValid reports whether c can be a kallsyms type letter.
func typeLetterValid(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '?'
}

// String summarizes the table.
func (t *Table) String() string {
	return fmt.Sprintf("%d symbols in %s", len(t.syms), strings.Join(t.Objects(), ", "))
}

// MarshalJSON writes the type letter as a string.
func (s Symbol) MarshalJSON() ([]byte, error) {
	type plain Symbol
	return json.Marshal(struct {
		plain
		Type string `json:"type"`
	}{plain(s), string(s.Type)})
}
