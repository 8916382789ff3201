package objdiff

import (
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// TestNotraceRoutes checks, on objects gcc compiles with the kernel's
// flags, which changed notrace functions the patch can carry through
// their callers or through data the hooks re-point, and that the others
// are refused with the reason.
func TestNotraceRoutes(t *testing.T) {
	tests := []struct {
		name    string
		changed []string
		new     []string
		unsafe  []string
		routes  []NotraceRoute
		reason  string // in the refusal of the first unsafe symbol
	}{
		// Provable: every reference is a direct call from a traceable
		// function or from a notrace one whose own callers are.
		{name: "notrace_callers", changed: []string{"entry_a", "entry_b"}, new: []string{"scale", "scale_twice"}, unsafe: []string{},
			routes: []NotraceRoute{{Func: "scale", Callers: []string{"entry_a", "scale_twice"}}, {Func: "scale_twice", Callers: []string{"entry_b"}}}},
		// Its address is taken in code: refused though fire calls it.
		{name: "notrace_address", changed: []string{"on_event"}, new: []string{}, unsafe: []string{KindNoFentry + ":on_event"},
			reason: "setup takes its address (not a call)"},
		// Only writable data points to it: carried, and refused unless
		// hooks re-point the table.
		{name: "notrace_data", new: []string{"op_xmit"}, changed: []string{}, unsafe: []string{KindNoFentryData + ":op_xmit"},
			routes: []NotraceRoute{{Func: "op_xmit", Callers: []string{}, Data: []string{"inet_ops"}}}, reason: "STITCH_REDIRECTS(op_xmit)"},
		// A read-only table: no hook can re-point it.
		{name: "notrace_static", changed: []string{"op_run", "sys_setattr"}, new: []string{"do_sys_setattr"}, unsafe: []string{KindNoFentry + ":op_run"},
			routes: []NotraceRoute{{Func: "do_sys_setattr", Callers: []string{"sys_setattr"}}}, reason: "read-only data points to it (table_ops in .rodata"},
		// A global function: callers elsewhere cannot be seen.
		{name: "notrace", changed: []string{"fast"}, new: []string{}, unsafe: []string{KindNoFentry + ":fast"}, reason: "it is global, so other files"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pre, post := compileCase(t, tt.name)
			res, err := DiffFiles(pre, post, testlayout.Real(t))
			if err != nil {
				t.Fatal(err)
			}
			if got := names(res.Changed); !slices.Equal(got, tt.changed) {
				t.Errorf("changed = %v, want %v", got, tt.changed)
			}
			if got := names(res.New); !slices.Equal(got, tt.new) {
				t.Errorf("new = %v, want %v", got, tt.new)
			}
			if got := kinds(res.Unsafe); !slices.Equal(got, tt.unsafe) {
				t.Errorf("unsafe = %v, want %v", got, tt.unsafe)
			}
			if !slices.EqualFunc(res.Notrace, tt.routes, func(a, b NotraceRoute) bool {
				return a.Func == b.Func && slices.Equal(a.Callers, b.Callers) && slices.Equal(a.Data, b.Data)
			}) {
				t.Errorf("routes = %+v, want %+v", res.Notrace, tt.routes)
			}
			if tt.reason != "" && (len(res.Unsafe) == 0 || !strings.Contains(res.Unsafe[0].Reason, tt.reason)) {
				t.Errorf("reason = %+v, want it to contain %q", res.Unsafe, tt.reason)
			}
		})
	}
}
