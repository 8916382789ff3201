package objdiff

import (
	"debug/elf"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// correlation pairs the defined symbols of the pre and post objects.
type correlation struct {
	pre2post map[*elfobj.Symbol]*elfobj.Symbol
	post2pre map[*elfobj.Symbol]*elfobj.Symbol
	// ambiguous are post-object static variables with state left
	// unpaired because their function(s) define several of that name:
	// the value names the function(s); ambiguousCount, how many.
	ambiguous      map[*elfobj.Symbol]string
	ambiguousCount map[*elfobj.Symbol]int
}

func (c *correlation) pair(a, b *elfobj.Symbol) {
	c.pre2post[a] = b
	c.post2pre[b] = a
}

// candidate tells whether a symbol takes part in correlation: defined,
// named, in a loaded section, and not a section or file symbol.
func candidate(s *elfobj.Symbol) bool {
	if s.Section == nil || s.Name == "" || !s.Section.Alloc() || s.Section.Strings() || strings.HasPrefix(s.Name, ".L") {
		return false
	}
	// The kernel's link discards .discard.* (objtool's and
	// __ADDRESSABLE's notes): nothing there reaches the running kernel.
	if strings.HasPrefix(s.Section.Name, ".discard.") {
		return false
	}
	switch s.Type {
	case elf.STT_FUNC, elf.STT_OBJECT, elf.STT_NOTYPE, elf.STT_TLS:
		return true
	}
	return false
}

// class separates functions from data so that a variable never pairs with
// a function of the same name.
func class(s *elfobj.Symbol) string {
	if s.Type == elf.STT_FUNC || s.Section.Executable() {
		return "f:"
	}
	return "d:"
}

// baseName strips the numbers the compiler and the preprocessor put into
// names, which an edit elsewhere in the file renumbers: foo.constprop.0,
// bar.isra.1, count.3 (a static local), __UNIQUE_ID_ddebug412, __key.12.
func baseName(name string) string {
	parts := strings.Split(name, ".")
	out := parts[:1]
	for _, p := range parts[1:] {
		if p != "" && strings.Trim(p, "0123456789") == "" {
			continue
		}
		out = append(out, p)
	}
	b := strings.Join(out, ".")
	if strings.HasPrefix(b, "__UNIQUE_ID_") {
		b = strings.TrimRight(b, "0123456789")
	}
	return b
}

// BaseName is a symbol's name without the numbers the compiler puts in
// it (see baseName): the name a renumbered static local keeps.
func BaseName(name string) string { return baseName(name) }

// correlate pairs symbols: first those whose unnumbered names are unique
// on both sides, then each group of the same base name (see pairGroup).
func correlate(pre, post *elfobj.Object) *correlation {
	c := &correlation{
		pre2post: map[*elfobj.Symbol]*elfobj.Symbol{}, post2pre: map[*elfobj.Symbol]*elfobj.Symbol{},
		ambiguous: map[*elfobj.Symbol]string{}, ambiguousCount: map[*elfobj.Symbol]int{},
	}
	byName := func(o *elfobj.Object) map[string][]*elfobj.Symbol {
		m := map[string][]*elfobj.Symbol{}
		for _, s := range o.Symbols {
			if candidate(s) {
				k := class(s) + s.Name
				m[k] = append(m[k], s)
			}
		}
		return m
	}
	a, b := byName(pre), byName(post)
	for k, as := range a {
		// A numbered name (calls.1) may belong to another variable after
		// an edit renumbered them: those are paired by base name below.
		if bs := b[k]; len(as) == 1 && len(bs) == 1 && baseName(as[0].Name) == as[0].Name {
			c.pair(as[0], bs[0])
		}
	}

	groups := func(o *elfobj.Object, paired map[*elfobj.Symbol]*elfobj.Symbol) (map[string][]*elfobj.Symbol, []string) {
		m := map[string][]*elfobj.Symbol{}
		var keys []string
		for _, s := range o.Symbols {
			if !candidate(s) || paired[s] != nil {
				continue
			}
			k := class(s) + baseName(s.Name)
			if m[k] == nil {
				keys = append(keys, k)
			}
			m[k] = append(m[k], s)
		}
		return m, keys
	}
	ga, keys := groups(pre, c.pre2post)
	gb, _ := groups(post, c.post2pre)
	var usersA, usersB map[*elfobj.Symbol]string
	for _, k := range keys {
		as, bs := ga[k], gb[k]
		if len(bs) == 0 {
			continue
		}
		if len(as) == 1 && len(bs) == 1 {
			c.pair(as[0], bs[0])
			continue
		}
		if usersA == nil {
			usersA, usersB = users(pre), users(post)
		}
		pairGroup(c, k[0] == 'f', as, bs, usersA, usersB)
	}
	return c
}

// pairGroup pairs symbols of the same base name (count.1, count.2, ...):
// constant data by contents, then by the functions that use them, then by
// equal names, and last (functions only) by order of appearance when the
// rest of the groups have the same size. Variables with state that the
// same function(s) use, several of one name (two blocks of a function
// each with its own `static int count`), are not paired by order unless
// their names are the same on both sides (nothing renumbered them): the
// fix may have added or removed one, and pairing the wrong ones would
// hand one variable's state to the other. They stay unpaired, marked
// ambiguous, and the diff refuses them.
func pairGroup(c *correlation, funcs bool, as, bs []*elfobj.Symbol, usersA, usersB map[*elfobj.Symbol]string) {
	if !funcs {
		// Constant data (__func__.N, say) is what it holds.
		pairByContent(c, as, bs)
	}
	unpaired := func(syms []*elfobj.Symbol, paired map[*elfobj.Symbol]*elfobj.Symbol) []*elfobj.Symbol {
		var out []*elfobj.Symbol
		for _, s := range syms {
			if paired[s] == nil {
				out = append(out, s)
			}
		}
		return out
	}
	sa, sb := map[string][]*elfobj.Symbol{}, map[string][]*elfobj.Symbol{}
	for _, s := range unpaired(as, c.pre2post) {
		sa[usersA[s]] = append(sa[usersA[s]], s)
	}
	for _, s := range unpaired(bs, c.post2pre) {
		sb[usersB[s]] = append(sb[usersB[s]], s)
	}
	for sig, x := range sa {
		y := sb[sig]
		if !funcs && sig != "" && (len(x) > 1 || len(y) > 1) && !sameNames(x, y) && (slices.ContainsFunc(x, hasState) || slices.ContainsFunc(y, hasState)) {
			for _, s := range y {
				c.ambiguous[s] = sig
				c.ambiguousCount[s] = max(len(x), len(y))
			}
			continue
		}
		if len(x) > 1 && sameNames(x, y) {
			continue // paired by name below
		}
		if len(x) == len(y) {
			// Same users, same count: the order of definition is the
			// order in the source, which an unrelated edit keeps.
			for i := range x {
				c.pair(x[i], y[i])
			}
		}
	}
	for _, x := range unpaired(as, c.pre2post) {
		for _, y := range unpaired(bs, c.post2pre) {
			if _, amb := c.ambiguous[y]; !amb && x.Name == y.Name {
				c.pair(x, y)
				break
			}
		}
	}
	restA, restB := unpaired(as, c.pre2post), unpaired(bs, c.post2pre)
	if funcs && len(restA) == len(restB) {
		for i := range restA {
			c.pair(restA[i], restB[i])
		}
	}
}

// hasState tells a variable the running kernel may have changed: not a
// constant, a dynamic debug record, or an empty object (a lockdep class
// key without lockdep), whose address is all there is.
func hasState(s *elfobj.Symbol) bool { return !stateless(s) && s.Size > 0 }

// sameNames tells whether two groups of symbols have the same names.
func sameNames(x, y []*elfobj.Symbol) bool {
	if len(x) != len(y) {
		return false
	}
	names := map[string]bool{}
	for _, s := range x {
		names[s.Name] = true
	}
	for _, s := range y {
		if !names[s.Name] {
			return false
		}
	}
	return true
}

// users maps each defined symbol to a canonical list of the functions
// that refer to it (by their base names), which identifies a static local
// by the function it belongs to.
func users(o *elfobj.Object) map[*elfobj.Symbol]string {
	sets := map[*elfobj.Symbol]map[string]bool{}
	for _, f := range o.Symbols {
		if f.Type != elf.STT_FUNC || f.Section == nil {
			continue
		}
		for _, r := range f.Section.RelocsIn(f.Value, f.Value+f.Size) {
			t, _ := r.Target()
			if t == nil || t.Type == elf.STT_SECTION || t == f {
				continue
			}
			if sets[t] == nil {
				sets[t] = map[string]bool{}
			}
			sets[t][baseName(f.Name)] = true
		}
	}
	out := make(map[*elfobj.Symbol]string, len(sets))
	for s, set := range sets {
		names := make([]string, 0, len(set))
		for n := range set {
			names = append(names, n)
		}
		sort.Strings(names)
		out[s] = strings.Join(names, ",")
	}
	return out
}

// pairByContent pairs unpaired read-only objects whose contents are equal
// and unique within their group on both sides.
func pairByContent(c *correlation, as, bs []*elfobj.Symbol) {
	index := func(syms []*elfobj.Symbol, paired map[*elfobj.Symbol]*elfobj.Symbol) map[string][]*elfobj.Symbol {
		m := map[string][]*elfobj.Symbol{}
		for _, s := range syms {
			if paired[s] == nil && s.Section.Flags&elf.SHF_WRITE == 0 && s.Section.Data != nil {
				k := contentKey(s)
				m[k] = append(m[k], s)
			}
		}
		return m
	}
	ma, mb := index(as, c.pre2post), index(bs, c.post2pre)
	for k, x := range ma {
		if y := mb[k]; len(x) == 1 && len(y) == 1 {
			c.pair(x[0], y[0])
		}
	}
}

// contentKey is an object's bytes and what its relocations name, before
// correlation (so by base name, and string literals by their text).
func contentKey(s *elfobj.Symbol) string {
	var b strings.Builder
	b.Write(s.Bytes())
	for _, r := range s.Section.RelocsIn(s.Value, s.Value+s.Size) {
		if str, ok := literal(r); ok {
			fmt.Fprintf(&b, "|%d:%s", r.Offset-s.Value, str)
		} else if t, off := r.Target(); t != nil {
			fmt.Fprintf(&b, "|%d:%s+%d", r.Offset-s.Value, baseName(t.Name), off)
		}
	}
	return b.String()
}
