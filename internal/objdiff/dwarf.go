package objdiff

import (
	"debug/dwarf"
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

	var ch, un []string
	for _, f := range changed {
		ch = append(ch, sourceName(f.Name))
	}
	for f := range unchanged {
		un = append(un, sourceName(f.Name))
	}
	res.Explanations = explain(dpost, ch, un)
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

type layout struct {
	size   int64
	fields []field
}

// layouts collects the complete named structs and unions of every
// compilation unit, keyed "struct name" / "union name".
func layouts(d *dwarf.Data) map[string]layout {
	out := map[string]layout{}
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
		l := layout{size: st.ByteSize}
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
func layoutChange(a, b layout) string {
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

// explain finds functions inlined into changed functions and into no
// unchanged one: the likely cause of those changes. A fix edits the
// object's own source file, so candidates must be defined there, which
// also keeps header helpers (kmalloc and the like) out of the answer.
func explain(d *dwarf.Data, changed, unchanged []string) []Explanation {
	type sub struct {
		name    string
		mainSrc bool
	}
	subs := map[dwarf.Offset]*sub{}
	origin := map[dwarf.Offset]dwarf.Offset{}
	type concrete struct {
		name    string
		origin  dwarf.Offset
		inlined []dwarf.Offset
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
				cur.inlined = append(cur.inlined, o)
			}
		}
		if e.Children {
			depth++
		}
	}
	resolve := func(o dwarf.Offset) *sub {
		for i := 0; i < 8; i++ {
			s := subs[o]
			if s == nil {
				return nil
			}
			if s.name != "" {
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

	isChanged, isUnchanged := map[string]bool{}, map[string]bool{}
	for _, n := range changed {
		isChanged[n] = true
	}
	for _, n := range unchanged {
		isUnchanged[n] = true
	}
	callers := map[string][]string{}
	mainSrc := map[string]bool{}
	tainted := map[string]bool{} // inlined into an unchanged function
	for _, f := range funcs {
		name := f.name
		if name == "" {
			if s := resolve(f.origin); s != nil {
				name = s.name
			}
		}
		for _, o := range f.inlined {
			s := resolve(o)
			if s == nil || s.name == "" || s.name == name {
				continue
			}
			mainSrc[s.name] = s.mainSrc
			switch {
			case isChanged[name]:
				if !slices.Contains(callers[s.name], name) {
					callers[s.name] = append(callers[s.name], name)
				}
			case isUnchanged[name]:
				tainted[s.name] = true
			}
		}
	}
	var out []Explanation
	for callee, fs := range callers {
		if tainted[callee] || !mainSrc[callee] {
			continue
		}
		sort.Strings(fs)
		out = append(out, Explanation{Inlined: callee, Changed: fs})
	}
	slices.SortFunc(out, func(x, y Explanation) int { return strings.Compare(x.Inlined, y.Inlined) })
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
