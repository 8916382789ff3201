package build

import (
	"fmt"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/klpmod"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// redirected tells whether the hooks take over a refusal: a changed
// notrace function that data points to, whose pointers the hooks
// re-point to the patch's copy (STITCH_REDIRECTS).
func redirected(ch *klpmod.CompiledHooks, p objdiff.Problem) bool {
	return ch != nil && p.Kind == objdiff.KindNoFentryData && slices.Contains(ch.Redirects, p.Symbol)
}

// unusedRedirects names the STITCH_REDIRECTS declarations that match no
// such function: the fix author meant another function, or the build
// found that nothing needs re-pointing.
func unusedRedirects(ch *klpmod.CompiledHooks, objs []compiled) []string {
	if ch == nil {
		return nil
	}
	var out []string
	for _, fn := range ch.Redirects {
		found := false
		for _, c := range objs {
			found = found || slices.ContainsFunc(c.Diff.Unsafe, func(p objdiff.Problem) bool {
				return p.Kind == objdiff.KindNoFentryData && p.Symbol == fn
			})
		}
		if !found {
			out = append(out, fmt.Sprintf("the hooks declare STITCH_REDIRECTS(%s), but %s is not a changed function without a __fentry__ call that data points to (see the build's reasons for it, if any): remove the declaration", fn, fn))
		}
	}
	return out
}

// newFunc is how the module carries a new function of the diff: a copy
// the hooks refer to (STITCH_NEW) gets the global name they use.
func newFunc(ch *klpmod.CompiledHooks, fn objdiff.Func) klpmod.Func {
	f := klpmod.Func{Name: fn.Name, New: true}
	if fn.Notrace && ch != nil && slices.Contains(ch.Redirects, fn.Name) {
		f.Entry, f.Alias = true, klpmod.NewPrefix+fn.Name
	}
	return f
}

// notraceReport is what the manifest says of the notrace functions the
// patch carries as copies, and how their callers reach them.
func notraceReport(d *objdiff.Result) []contract.Notrace {
	var out []contract.Notrace
	for _, r := range d.Notrace {
		out = append(out, contract.Notrace{Function: r.Func, Via: r.Callers, Data: r.Data})
	}
	return out
}

// reportNotrace tells the build's progress how each changed function
// without a __fentry__ call is carried: an automatic decision, with why.
func reportNotrace(report func(Step), source string, d *objdiff.Result) {
	for _, r := range d.Notrace {
		var via []string
		if len(r.Callers) > 0 {
			via = append(via, "its callers "+strings.Join(r.Callers, ", ")+", which the patch replaces")
		}
		if len(r.Data) > 0 {
			via = append(via, "the pointers to it in "+strings.Join(r.Data, ", ")+", which the hooks must re-point")
		}
		report(Step{Name: "notrace", Detail: fmt.Sprintf("%s: %s has no __fentry__ call: the patch carries a new copy, which the running kernel reaches only through %s (no other path in its file reaches it)", source, r.Func, strings.Join(via, ", and "))})
	}
}
