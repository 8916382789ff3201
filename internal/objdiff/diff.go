package objdiff

import (
	"debug/elf"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
)

// DiffFiles reads and compares two object files compiled for the kernel
// whose special-section layout is lay.
func DiffFiles(prePath, postPath string, lay *layout.Layout) (*Result, error) {
	pre, err := elfobj.Open(prePath)
	if err != nil {
		return nil, fmt.Errorf("%w: pre: %w", ErrNoObject, err)
	}
	post, err := elfobj.Open(postPath)
	if err != nil {
		return nil, fmt.Errorf("%w: post: %w", ErrNoObject, err)
	}
	return Diff(pre, post, lay), nil
}

// Diff compares a pre and a post object compiled for the kernel whose
// special-section layout is lay. A special section the layout does not
// describe is a problem of the result: the change cannot be judged.
func Diff(pre, post *elfobj.Object, lay *layout.Layout) *Result {
	c := correlate(pre, post)
	lines := newLineShifts(pre, post)
	d := &differ{
		c: c, a: side{obj: pre, c: c, lines: lines}, b: side{obj: post, c: c, post: true, lines: lines},
		lay:       lay,
		res:       &Result{},
		unchanged: map[*elfobj.Symbol]bool{},
		carried:   map[*elfobj.Symbol]bool{},
		notrace:   map[*elfobj.Symbol]bool{},
	}
	d.unknownSpecials(pre)
	d.unknownSpecials(post)
	d.functions()
	d.specialEntries()
	d.data()
	d.notraceInCallers()
	d.coldParents()
	markExitOnly(d.res, post)
	for _, f := range d.changed {
		d.res.Changed = append(d.res.Changed, describe(d.b, f, c.post2pre[f], d.carried))
	}
	for _, f := range d.news {
		fn := describe(d.b, f, nil, d.carried)
		fn.Notrace = d.notrace[f]
		d.res.New = append(d.res.New, fn)
	}
	for b, a := range c.post2pre {
		if a.Name != b.Name && b.Local() {
			if d.res.Renamed == nil {
				d.res.Renamed = map[string]string{}
			}
			d.res.Renamed[b.Name] = a.Name
		}
	}
	if len(d.res.Changed)+len(d.res.New)+len(d.res.Unsafe) > 0 {
		dwarfChecks(pre, post, d.res, d.changed, d.unchanged)
	}
	d.res.sort()
	return d.res
}

// differ holds the state of one comparison.
type differ struct {
	c    *correlation
	a, b side
	lay  *layout.Layout
	res  *Result
	// Post-object functions: changed (to be replaced), new, and the rest.
	changed, news []*elfobj.Symbol
	unchanged     map[*elfobj.Symbol]bool
	// carried are post symbols with a counterpart that the patch carries
	// anyway (constant data with new contents).
	carried map[*elfobj.Symbol]bool
	// notrace are changed functions ftrace cannot redirect, carried as
	// new copies for the replaced functions that use them.
	notrace map[*elfobj.Symbol]bool
}

// replace moves an unchanged function to the changed ones.
func (d *differ) replace(f *elfobj.Symbol) {
	delete(d.unchanged, f)
	d.res.LineOnly = slices.DeleteFunc(d.res.LineOnly, func(n string) bool { return n == f.Name })
	d.changed = append(d.changed, f)
	checkReplaceable(d.res, f)
}

// functions compares every function of the post object with its
// counterpart.
func (d *differ) functions() {
	for _, fb := range d.b.obj.Symbols {
		if !candidate(fb) || fb.Type != elf.STT_FUNC {
			continue
		}
		fa := d.c.post2pre[fb]
		if fa == nil {
			d.news = append(d.news, fb)
			if isInit(fb) {
				d.res.unsafe(KindInit, fb.Name, fmt.Sprintf("new function %s is in %s: init and exit code has already run (or never will) in the running kernel, so a livepatch cannot apply it", fb.Name, fb.Section.Name))
			}
			continue
		}
		switch compareFunc(d.a, fa, d.b, fb) {
		case same:
			d.unchanged[fb] = true
			continue
		case lineOnly:
			d.unchanged[fb] = true
			d.res.LineOnly = append(d.res.LineOnly, fb.Name)
			continue
		}
		d.changed = append(d.changed, fb)
		if isInit(fa) && !isInit(fb) {
			d.res.unsafe(KindInit, fb.Name, fmt.Sprintf("%s was %s code (section %s), freed after use: there is no running function to replace", fb.Name, initKind(fa), fa.Section.Name))
			continue
		}
		checkReplaceable(d.res, fb)
	}
	for _, fa := range d.a.obj.Symbols {
		if candidate(fa) && fa.Type == elf.STT_FUNC && d.c.pre2post[fa] == nil {
			d.res.Removed = append(d.res.Removed, fa.Name)
		}
	}
}

// coldParents replaces the parent of every changed split-out part: the
// part is entered by a jump from its parent, so a new part needs a new
// parent.
func (d *differ) coldParents() {
	for i := 0; i < len(d.changed); i++ {
		parent := coldParent(d.changed[i].Name)
		if parent == "" {
			continue
		}
		for fb := range d.unchanged {
			if fb.Name == parent && fb.Section.Executable() {
				d.replace(fb)
				break
			}
		}
	}
}

// data classifies the post object's data: new, carried, or changed in a
// way a livepatch cannot follow.
func (d *differ) data() {
	referrers := referrers(d.b.obj)
	for _, db := range d.b.obj.Symbols {
		if !candidate(db) || class(db) != "d:" || db.Type == elf.STT_NOTYPE {
			continue
		}
		if db.Section.OnceFlags() {
			// WARN_ONCE's flags: the patch carries fresh ones (one more
			// warning at most), so which of the running kernel's each
			// one is does not matter.
			continue
		}
		da := d.c.post2pre[db]
		if fn, ok := d.c.ambiguous[db]; ok {
			d.res.unsafe(KindUncorrelated, db.Name, fmt.Sprintf("static variable %s: %s has %d static variables named %s, and which of the running kernel's each one is cannot be told from the objects (gcc numbers them per file, and the fix may have added, removed or moved one); give them distinct names in the fix", db.Name, fn, d.c.ambiguousCount[db], baseName(db.Name)))
			continue
		}
		if da == nil {
			d.res.NewData = append(d.res.NewData, Data{Name: db.Name, Section: db.Section.Name, Local: db.Local(), Size: db.Size})
			// A new copy of data without state (a constant, a dynamic
			// debug record) loses nothing even if it was the same one.
			if sibling := unmatchedSibling(d.a.obj, d.c, db); sibling != nil && !stateless(db) {
				d.res.unsafe(KindUncorrelated, db.Name, fmt.Sprintf("static variable %s is new but %s of the pre object (same name, different number) has no counterpart: cannot tell whether it is the same variable, whose state the patch would lose", db.Name, sibling.Name))
			}
			continue
		}
		sizeChanged, contentChanged := compareData(d.a, da, d.b, db)
		if !sizeChanged && !contentChanged {
			continue
		}
		if users, ok := funcUsers(db, referrers); ok && stateless(db) {
			// Data without state: the patch carries the new version,
			// and replaces every function that uses it (even one whose
			// code is the same) so that they use the copy.
			d.carried[db] = true
			for _, f := range users {
				if d.unchanged[f] {
					d.replace(f)
				}
			}
			d.res.NewData = append(d.res.NewData, Data{Name: db.Name, Section: db.Section.Name, Local: db.Local(), Size: db.Size, Replaces: da.Name})
			continue
		}
		users, why := readOnlyUsers(db, referrers)
		if why == "" && db.Section.Flags&elf.SHF_WRITE != 0 {
			// Writable data that only functions read, and the patch
			// replaces them all: carried like a constant.
			d.carried[db] = true
			for _, f := range users {
				if d.unchanged[f] {
					d.replace(f)
				}
			}
			d.res.NewData = append(d.res.NewData, Data{Name: db.Name, Section: db.Section.Name, Local: db.Local(), Size: db.Size, Replaces: da.Name,
				Why: fmt.Sprintf("only %s read it, through memory operands: the patch replaces them, and they use the new copy", funcNames(users))})
			continue
		}
		if db.Section.Flags&elf.SHF_WRITE == 0 {
			var from []string
			for _, r := range referrers[db] {
				if r.Type != elf.STT_FUNC {
					from = append(from, r.Name+" in "+r.Section.Name)
				}
			}
			d.res.unsafe(KindData, db.Name, fmt.Sprintf("constant %s (section %s) changed and data refers to it (%s): a livepatch cannot update data already in memory", db.Name, db.Section.Name, strings.Join(from, ", ")))
			continue
		}
		kind, what := KindData, "variable"
		if db.Local() && baseName(db.Name) != db.Name {
			kind, what = KindStaticLocal, "static local variable"
		}
		switch {
		case sizeChanged:
			d.res.unsafe(kind, db.Name, fmt.Sprintf("%s %s changed size from %d to %d bytes: the running kernel keeps the old layout, which unchanged code still uses", what, db.Name, da.Size, db.Size))
		case kind == KindStaticLocal:
			d.res.unsafe(kind, db.Name, fmt.Sprintf("%s %s has a new initial value: the running kernel's copy holds state the patch would not reproduce; keep the initialiser, or use a shadow variable", what, db.Name))
		default:
			d.res.unsafe(kind, db.Name, fmt.Sprintf("initialised data %s (section %s) changed and the running kernel's copy stays in use (%s), so a new copy would not reach it: a livepatch replaces functions, not data already in memory; update it in place from a callback (STITCH_UPDATES_DATA) or leave it alone", db.Name, db.Section.Name, why))
		}
	}
}

// specialEntries replaces the functions whose code is the same but whose
// special-section entries changed (a WARN_ON that became WARN_ON_ONCE
// changes only its __bug_table flags; an exception fixup can move): the
// patch carries a copy of the function with the new entries, which the
// kernel consults for the module's code.
func (d *differ) specialEntries() {
	ga, gb := entryGroups(d.a, d.lay), entryGroups(d.b, d.lay)
	for fb := range d.unchanged {
		if !slices.Equal(ga[d.c.post2pre[fb]], gb[fb]) {
			d.replace(fb)
		}
	}
}

// checkReplaceable records why a function the patch must replace cannot
// be, if it cannot.
func checkReplaceable(res *Result, f *elfobj.Symbol) {
	switch {
	case isInit(f):
		res.Unsafe = append(res.Unsafe, initProblem(f))
	case !hasFentry(f) && coldParent(f.Name) == "":
		res.unsafe(KindNoFentry, f.Name, fmt.Sprintf("%s changed but has no __fentry__ call (notrace, or the compiler built it without ftrace instrumentation), so ftrace cannot redirect it; patch its callers instead", f.Name))
	}
}

func (r *Result) unsafe(kind, sym, reason string) {
	r.Unsafe = append(r.Unsafe, Problem{Kind: kind, Symbol: sym, Reason: reason})
}

func (r *Result) sort() {
	// Empty lists, not null, in JSON.
	r.Changed = nonNil(r.Changed)
	r.New = nonNil(r.New)
	r.Removed = nonNil(r.Removed)
	r.NewData = nonNil(r.NewData)
	r.LineOnly = nonNil(r.LineOnly)
	r.Unsafe = nonNil(r.Unsafe)
	r.Explanations = nonNil(r.Explanations)
	byName := func(x, y Func) int { return strings.Compare(x.Name, y.Name) }
	slices.SortFunc(r.Changed, byName)
	slices.SortFunc(r.New, byName)
	slices.SortFunc(r.NewData, func(x, y Data) int { return strings.Compare(x.Name, y.Name) })
	sort.Strings(r.Removed)
	sort.Strings(r.LineOnly)
	slices.SortFunc(r.Notrace, func(x, y NotraceRoute) int { return strings.Compare(x.Func, y.Func) })
	slices.SortFunc(r.Unsafe, func(x, y Problem) int {
		if c := strings.Compare(x.Kind, y.Kind); c != 0 {
			return c
		}
		return strings.Compare(x.Symbol, y.Symbol)
	})
}

func isInit(f *elfobj.Symbol) bool { return initKind(f) != "" }

func initKind(f *elfobj.Symbol) string {
	n := f.Section.Name
	switch {
	case strings.HasPrefix(n, ".init.") || n == ".head.text":
		return "__init"
	case strings.HasPrefix(n, ".exit."):
		return "__exit"
	}
	return ""
}

// hasFentry tells whether the function calls __fentry__ in its first
// instructions (after an endbr64 when IBT is on), where ftrace hooks it.
func hasFentry(f *elfobj.Symbol) bool {
	for _, r := range f.Section.RelocsIn(f.Value, f.Value+16) {
		if r.Symbol != nil && r.Symbol.Name == "__fentry__" {
			return true
		}
	}
	return false
}

// unmatchedSibling returns a pre symbol with the same base name as the
// static local s that correlation left unpaired, or nil.
func unmatchedSibling(pre *elfobj.Object, c *correlation, s *elfobj.Symbol) *elfobj.Symbol {
	base := baseName(s.Name)
	if base == s.Name || !s.Local() {
		return nil
	}
	for _, p := range pre.Symbols {
		if candidate(p) && class(p) == "d:" && c.pre2post[p] == nil && baseName(p.Name) == base {
			return p
		}
	}
	return nil
}

// referrers maps each symbol to the defined symbols whose contents refer
// to it.
func referrers(o *elfobj.Object) map[*elfobj.Symbol][]*elfobj.Symbol {
	m := map[*elfobj.Symbol][]*elfobj.Symbol{}
	for _, s := range o.Symbols {
		if s.Section == nil || s.Size == 0 || s.Type == elf.STT_SECTION {
			continue
		}
		for _, r := range s.Section.RelocsIn(s.Value, s.Value+s.Size) {
			if t, _ := r.Target(); t != nil && t != s && !slices.Contains(m[t], s) {
				m[t] = append(m[t], s)
			}
		}
	}
	return m
}

// stateless tells whether a data object holds nothing the running kernel
// changes: constants, dynamic debug records, whose only state is
// whether someone enabled the message (the patch's copy starts off), and
// empty objects.
func stateless(s *elfobj.Symbol) bool {
	// An empty object (a lockdep class key without lockdep, as
	// mutex_init and init_completion make one) has no state to lose.
	return s.Section.Flags&elf.SHF_WRITE == 0 || s.Section.Name == "__dyndbg" || s.Size == 0
}

// funcUsers finds the functions that use s, directly or through other
// stateless data (the __func__ string a dynamic debug record points to,
// whose record goes with the function that prints it). ok is false when
// data with state refers to s.
func funcUsers(s *elfobj.Symbol, referrers map[*elfobj.Symbol][]*elfobj.Symbol) (funcs []*elfobj.Symbol, ok bool) {
	seen := map[*elfobj.Symbol]bool{s: true}
	queue := []*elfobj.Symbol{s}
	for len(queue) > 0 {
		for _, r := range referrers[queue[0]] {
			switch {
			case seen[r]:
			case r.Type == elf.STT_FUNC:
				funcs = append(funcs, r)
			case r.Section != nil && stateless(r):
				queue = append(queue, r)
			default:
				return nil, false
			}
			seen[r] = true
		}
		queue = queue[1:]
	}
	return funcs, true
}

// describe builds the Func entry of a changed (pa != nil) or new function.
// carried are post symbols with a counterpart that the patch carries anyway.
func describe(s side, f, pa *elfobj.Symbol, carried map[*elfobj.Symbol]bool) Func {
	fn := Func{Name: f.Name, Section: f.Section.Name, Local: f.Local(), Size: f.Size, Refs: []Ref{}}
	if pa != nil && pa.Name != f.Name {
		fn.PreName = pa.Name
	}
	fn.Parent = coldParent(f.Name)
	seen := map[string]bool{}
	for _, r := range f.Section.RelocsIn(f.Value, f.Value+f.Size) {
		t, _ := r.Target()
		if t == nil || t == f || t.Index == 0 {
			continue
		}
		ref := Ref{Name: t.Name, Local: t.Local(), Defined: t.Defined(), Func: t.Type == elf.STT_FUNC}
		if t.Type == elf.STT_SECTION {
			ref.Section = true
		} else if t.Defined() && candidate(t) && (s.c.post2pre[t] == nil || carried[t]) {
			ref.New = true
		}
		if seen[ref.Name] {
			continue
		}
		seen[ref.Name] = true
		fn.Refs = append(fn.Refs, ref)
	}
	slices.SortFunc(fn.Refs, func(x, y Ref) int { return strings.Compare(x.Name, y.Name) })
	return fn
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// coldParent returns foo for foo.cold (or foo.cold.N), else "".
func coldParent(name string) string {
	if i := strings.Index(name, ".cold"); i > 0 {
		return name[:i]
	}
	return ""
}
