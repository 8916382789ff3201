package objdiff

import (
	"bytes"
	"debug/dwarf"
	"debug/elf"
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// dwarfChecks adds what only debugging information can tell: struct and
// union layout changes, and which inlined function explains a change.
// Objects without DWARF are compared without these checks.
func dwarfChecks(pre, post *elfobj.Object, res *Result, changed []*elfobj.Symbol, unchanged map[*elfobj.Symbol]bool) {
	// debug/dwarf trusts the data it decodes lazily (types, line
	// tables); corrupt debugging information must cost the checks, not
	// the process. The machine-code diff stands without them.
	n := len(res.Unsafe)
	defer func() {
		if recover() != nil {
			res.Unsafe = res.Unsafe[:n]
			res.Explanations = nil
		}
	}()
	dpre, err := pre.DWARF()
	if err != nil {
		return
	}
	dpost, err := post.DWARF()
	if err != nil {
		return
	}
	la, lb := layouts(dpre), layouts(dpost)
	for name, b := range lb {
		a, ok := la[name]
		if !ok {
			continue
		}
		if why := layoutChange(a, b); why != "" {
			res.unsafe(KindTypeLayout, name, fmt.Sprintf("%s changed layout: %s; existing instances and unchanged code use the old layout (use a shadow variable instead of a new field)", name, why))
		}
	}

	signatureChecks(pre, post, dpre, dpost, res, changed, unchanged)

	var ch, un []string
	for _, f := range changed {
		ch = append(ch, sourceName(f.Name))
	}
	for f := range unchanged {
		un = append(un, sourceName(f.Name))
	}
	res.Explanations = explain(pre, post, inlining(dpre), inlining(dpost), ch, un)
}

// sourceName is the C name of a function symbol: foo for foo.constprop.0.
func sourceName(sym string) string {
	name, _, _ := strings.Cut(sym, ".")
	return name
}

type field struct {
	name           string
	offset         int64
	typ            string
	size           int64
	bitOff, bitLen int64
}

type typeLayout struct {
	size   int64
	fields []field
}

// layouts collects the complete named structs and unions of every
// compilation unit, keyed "struct name" / "union name".
func layouts(d *dwarf.Data) map[string]typeLayout {
	out := map[string]typeLayout{}
	r := d.Reader()
	for {
		e, err := r.Next()
		if err != nil || e == nil {
			return out
		}
		if e.Tag != dwarf.TagStructType && e.Tag != dwarf.TagUnionType {
			continue
		}
		if e.Val(dwarf.AttrDeclaration) != nil || e.Val(dwarf.AttrName) == nil {
			continue
		}
		t, err := d.Type(e.Offset)
		if err != nil {
			continue
		}
		st, ok := t.(*dwarf.StructType)
		if !ok || st.Incomplete {
			continue
		}
		key := st.Kind + " " + st.StructName
		if _, dup := out[key]; dup {
			continue
		}
		l := typeLayout{size: st.ByteSize}
		for _, f := range st.Field {
			l.fields = append(l.fields, field{
				name: f.Name, offset: f.ByteOffset, typ: typeName(f.Type), size: f.Type.Size(),
				bitOff: f.DataBitOffset, bitLen: f.BitSize,
			})
		}
		out[key] = l
	}
}

// typeName names a field's type without expanding nested definitions.
func typeName(t dwarf.Type) string {
	switch t := t.(type) {
	case *dwarf.StructType:
		return t.Kind + " " + t.StructName
	case *dwarf.PtrType:
		return typeName(t.Type) + "*"
	case *dwarf.ArrayType:
		return fmt.Sprintf("%s[%d]", typeName(t.Type), t.Count)
	case *dwarf.TypedefType:
		return t.Name
	case *dwarf.QualType:
		return t.Qual + " " + typeName(t.Type)
	case *dwarf.FuncType:
		return "func"
	}
	return t.Common().Name
}

// layoutChange describes the first difference between two layouts, or "".
func layoutChange(a, b typeLayout) string {
	fa := map[string]field{}
	for i, f := range a.fields {
		fa[fieldKey(f, i)] = f
	}
	for i, f := range b.fields {
		key := fieldKey(f, i)
		old, ok := fa[key]
		switch {
		case !ok:
			return fmt.Sprintf("new field %s at offset %d", key, f.offset)
		case old.offset != f.offset || old.bitOff != f.bitOff:
			return fmt.Sprintf("field %s moved from offset %d to %d", key, old.offset, f.offset)
		case old.typ != f.typ || old.size != f.size || old.bitLen != f.bitLen:
			return fmt.Sprintf("field %s changed type from %s (%d bytes) to %s (%d bytes)", key, old.typ, old.size, f.typ, f.size)
		}
		delete(fa, key)
	}
	for i, f := range a.fields {
		if _, gone := fa[fieldKey(f, i)]; gone {
			return fmt.Sprintf("field %s removed", fieldKey(f, i))
		}
	}
	if a.size != b.size {
		return fmt.Sprintf("size changed from %d to %d bytes", a.size, b.size)
	}
	return ""
}

// inlined describes one function inlined into a caller.
type inlined struct {
	// ranges hold the code of its inlined copies, as offsets into the
	// caller's section (each function has its own, at address 0).
	ranges  [][2]uint64
	mainSrc bool // defined in the compilation unit's own source file
}

// inlining maps each out-of-line function (by C name) to the functions
// inlined into it.
func inlining(d *dwarf.Data) map[string]map[string]*inlined {
	type sub struct {
		name    string
		mainSrc bool
	}
	subs := map[dwarf.Offset]*sub{}
	origin := map[dwarf.Offset]dwarf.Offset{}
	type site struct {
		callee dwarf.Offset
		ranges [][2]uint64
	}
	type concrete struct {
		name   string
		origin dwarf.Offset
		sites  []site
	}
	var funcs []*concrete

	r := d.Reader()
	var files []*dwarf.LineFile
	var cuName string
	var cur *concrete
	depth, curDepth := 0, -1
	for {
		e, err := r.Next()
		if err != nil || e == nil {
			break
		}
		if e.Tag == 0 {
			depth--
			if depth <= curDepth {
				cur, curDepth = nil, -1
			}
			continue
		}
		switch e.Tag {
		case dwarf.TagCompileUnit:
			files, cuName = nil, ""
			if lr, err := d.LineReader(e); err == nil && lr != nil {
				files = lr.Files()
			}
			cuName, _ = e.Val(dwarf.AttrName).(string)
		case dwarf.TagSubprogram:
			s := &sub{}
			s.name, _ = e.Val(dwarf.AttrName).(string)
			if i, ok := e.Val(dwarf.AttrDeclFile).(int64); ok && i >= 0 && int(i) < len(files) && files[i] != nil {
				s.mainSrc = path.Base(files[i].Name) == path.Base(cuName)
			}
			subs[e.Offset] = s
			if o, ok := e.Val(dwarf.AttrAbstractOrigin).(dwarf.Offset); ok {
				origin[e.Offset] = o
			}
			if e.Val(dwarf.AttrLowpc) != nil && cur == nil {
				cur = &concrete{name: s.name}
				cur.origin, _ = e.Val(dwarf.AttrAbstractOrigin).(dwarf.Offset)
				funcs = append(funcs, cur)
				curDepth = depth
			}
		case dwarf.TagInlinedSubroutine:
			if o, ok := e.Val(dwarf.AttrAbstractOrigin).(dwarf.Offset); ok && cur != nil {
				st := site{callee: o}
				st.ranges, _ = d.Ranges(e)
				cur.sites = append(cur.sites, st)
			}
		}
		if e.Children {
			depth++
		}
	}
	resolve := func(o dwarf.Offset) *sub {
		for range 8 {
			s := subs[o]
			if s == nil || s.name != "" {
				return s
			}
			next, ok := origin[o]
			if !ok {
				return s
			}
			o = next
		}
		return nil
	}
	out := map[string]map[string]*inlined{}
	for _, f := range funcs {
		name := f.name
		if name == "" {
			if s := resolve(f.origin); s != nil {
				name = s.name
			}
		}
		for _, st := range f.sites {
			s := resolve(st.callee)
			if name == "" || s == nil || s.name == "" || s.name == name {
				continue
			}
			if out[name] == nil {
				out[name] = map[string]*inlined{}
			}
			in := out[name][s.name]
			if in == nil {
				in = &inlined{mainSrc: s.mainSrc}
				out[name][s.name] = in
			}
			in.ranges = append(in.ranges, st.ranges...)
		}
	}
	return out
}

// explain finds functions inlined into changed functions and into no
// unchanged one: the likely causes of those changes. A fix edits the
// object's own source file, so candidates must be defined there, which
// also keeps header helpers (kmalloc and the like) out. When the code of
// some candidates' inlined copies changed, only those are kept: a callee
// whose copies kept their bytes is most likely a bystander.
func explain(pre, post *elfobj.Object, ipre, ipost map[string]map[string]*inlined, changed, unchanged []string) []Explanation {
	tainted := map[string]bool{} // inlined into an unchanged function
	for _, n := range unchanged {
		for callee := range ipost[n] {
			tainted[callee] = true
		}
	}
	callers := map[string][]string{}
	recoded := map[string]bool{}
	for _, f := range changed {
		for callee, in := range ipost[f] {
			if tainted[callee] || !in.mainSrc {
				continue
			}
			if !slices.Contains(callers[callee], f) {
				callers[callee] = append(callers[callee], f)
			}
			old := ipre[f][callee]
			if old == nil {
				recoded[callee] = true
				continue
			}
			a, b := inlinedCode(pre, f, old.ranges), inlinedCode(post, f, in.ranges)
			if a != nil && b != nil && !bytes.Equal(a, b) {
				recoded[callee] = true
			}
		}
	}
	out := []Explanation{}
	for callee, fs := range callers {
		if len(recoded) > 0 && !recoded[callee] {
			continue
		}
		sort.Strings(fs)
		out = append(out, Explanation{Inlined: callee, Changed: fs})
	}
	slices.SortFunc(out, func(x, y Explanation) int { return strings.Compare(x.Inlined, y.Inlined) })
	return out
}

// inlinedCode returns the bytes of the ranges of the function whose C
// name is caller, or nil when it cannot tell which symbol that is or a
// range lies outside it.
func inlinedCode(o *elfobj.Object, caller string, ranges [][2]uint64) []byte {
	var fn *elfobj.Symbol
	for _, s := range o.Symbols {
		if s.Type == elf.STT_FUNC && s.Section != nil && sourceName(s.Name) == caller && coldParent(s.Name) == "" {
			if fn != nil {
				return nil
			}
			fn = s
		}
	}
	if fn == nil {
		return nil
	}
	// DWARF addresses of a relocatable object are section offsets.
	code, base := fn.Bytes(), fn.Value
	var out []byte
	for _, r := range ranges {
		if r[0] < base || r[0] > r[1] || r[1]-base > uint64(len(code)) {
			return nil
		}
		out = append(out, code[r[0]-base:r[1]-base]...)
	}
	return out
}

// fieldKey names a field; anonymous unions and structs by their position,
// which is as stable as the field order.
func fieldKey(f field, i int) string {
	if f.name != "" {
		return f.name
	}
	return fmt.Sprintf("<anonymous #%d>", i)
}
