package objdiff

import (
	"debug/dwarf"
	"debug/elf"
	"fmt"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// KindSignature: a replaced function's parameters changed while code the
// patch does not replace still calls it the old way.
const KindSignature = "signature"

// signatureChecks refuses a changed function whose parameter list
// changed (by the DWARF of both objects) when something outside the
// patch calls it: data of the pre object points to it (an ops or sysctl
// table, whose callers pass the old arguments), or an unchanged function
// of the post object calls it. Livepatch redirects the old function to
// the new one, so such a caller would reach the new code with the old
// arguments.
func signatureChecks(pre, post *elfobj.Object, dpre, dpost *dwarf.Data, res *Result, changed []*elfobj.Symbol, unchanged map[*elfobj.Symbol]bool) {
	sa, sb := signatures(dpre), signatures(dpost)
	var refPre, refPost map[*elfobj.Symbol][]*elfobj.Symbol
	for _, f := range changed {
		preName := res.PreName(f.Name)
		a, okA := sa[sourceName(preName)]
		b, okB := sb[sourceName(f.Name)]
		if !okA || !okB || a == b {
			continue
		}
		if refPre == nil {
			refPre, refPost = referrers(pre), referrers(post)
		}
		var callers []string
		if fa := pre.Symbol(preName); fa != nil {
			for _, r := range refPre[fa] {
				if r.Type != elf.STT_FUNC {
					callers = append(callers, "data "+r.Name+" points to it")
				}
			}
		}
		for _, r := range refPost[f] {
			if unchanged[r] {
				callers = append(callers, "unchanged "+r.Name+" calls it")
			}
		}
		if len(callers) == 0 {
			continue
		}
		res.unsafe(KindSignature, f.Name, fmt.Sprintf("%s changed its parameters from (%s) to (%s), and %s: that code is not replaced and would call the new function with the old arguments; keep the parameters (add a new function for the new ones)", f.Name, a, b, strings.Join(callers, ", ")))
	}
}

// signatures maps each function defined in the object to its parameter
// types, by its DWARF subprogram.
func signatures(d *dwarf.Data) map[string]string {
	out := map[string]string{}
	r := d.Reader()
	var name string
	var params []string
	in := false
	depth := 0
	flush := func() {
		if in && name != "" {
			if _, dup := out[name]; !dup {
				out[name] = strings.Join(params, ", ")
			}
		}
		in, name, params = false, "", nil
	}
	for {
		e, err := r.Next()
		if err != nil || e == nil {
			flush()
			return out
		}
		if e.Tag == 0 {
			depth--
			continue
		}
		if e.Tag == dwarf.TagSubprogram {
			flush()
			n, _ := e.Val(dwarf.AttrName).(string)
			// Declarations and concrete instances name no parameters
			// of their own; the abstract or plain definition does.
			if n != "" && e.Val(dwarf.AttrDeclaration) == nil {
				in, name, depth = true, n, 0
			}
		} else if in && depth == 1 && e.Tag == dwarf.TagFormalParameter {
			typ := "?"
			if off, ok := e.Val(dwarf.AttrType).(dwarf.Offset); ok {
				if t, err := d.Type(off); err == nil {
					typ = typeName(t)
				}
			}
			if strings.HasPrefix(typ, "*") {
				typ = "void" + typ
			}
			params = append(params, typ)
		}
		if e.Children {
			depth++
		}
		if in && depth == 0 {
			flush()
		}
	}
}
