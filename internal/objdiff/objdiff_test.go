package objdiff

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// kernelFlags are the code-generation flags of an x86-64 kernel build that
// matter to the differ.
var kernelFlags = []string{
	"-O2", "-mfentry", "-pg", "-mrecord-mcount", "-ffunction-sections", "-fdata-sections",
	"-fno-pic", "-fno-PIE", "-mcmodel=kernel", "-mno-red-zone", "-fno-strict-aliasing",
	"-fno-common", "-mno-sse", "-mno-mmx", "-fno-asynchronous-unwind-tables",
}

// compiler returns gcc-12 (the kernel's compiler) or gcc.
func compiler(t testing.TB) string {
	for _, cc := range []string{"gcc-12", "gcc"} {
		if p, err := exec.LookPath(cc); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no gcc in PATH")
	}
	t.Skip("no gcc in PATH")
	return ""
}

// compileCase builds testdata/<name>/{pre,post}.c and returns the objects.
func compileCase(t *testing.T, name string) (pre, post string) {
	t.Helper()
	return compileCaseTB(t, name)
}

func compileCaseTB(t testing.TB, name string) (pre, post string) {
	t.Helper()
	cc := compiler(t)
	dir := filepath.Join("testdata", name)
	flags := slices.Clone(kernelFlags)
	if extra, err := os.ReadFile(filepath.Join(dir, "cflags")); err == nil {
		flags = append(flags, strings.Fields(string(extra))...)
	}
	inc, err := filepath.Abs("testdata")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	// Both versions are compiled as the same file name, as a kernel
	// build compiles them, so that __FILE__ strings agree.
	build := func(which string) string {
		src, err := os.ReadFile(filepath.Join(dir, which+".c"))
		if err != nil {
			t.Fatal(err)
		}
		work := filepath.Join(out, which)
		if err := os.MkdirAll(work, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(work, name+".c"), src, 0o644); err != nil {
			t.Fatal(err)
		}
		args := append(slices.Clone(flags), "-I", inc, "-c", name+".c", "-o", name+".o")
		cmd := exec.Command(cc, args...)
		cmd.Dir = work
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", cc, strings.Join(args, " "), err, b)
		}
		return filepath.Join(work, name+".o")
	}
	return build("pre"), build("post")
}

func names(fs []Func) []string {
	out := []string{}
	for _, f := range fs {
		out = append(out, f.Name)
	}
	return out
}

func kinds(ps []Problem) []string {
	out := []string{}
	for _, p := range ps {
		out = append(out, p.Kind+":"+p.Symbol)
	}
	return out
}

func TestFixtures(t *testing.T) {
	tests := []struct {
		name     string
		changed  []string
		new      []string
		newData  []string
		lineOnly []string
		unsafe   []string
		explain  map[string][]string
	}{
		{name: "body", changed: []string{"add"}},
		{name: "newhelper", changed: []string{"handle"}, new: []string{"check"}},
		// first gains a static local and a new function last another,
		// which renumbers them all (counter's calls.1 becomes calls.2);
		// counter changes but keeps its own.
		{name: "staticlocal", changed: []string{"counter", "first"}, new: []string{"last"}, newData: []string{"calls.0", "seen.3"}},
		// Two statics of one name in one function, and the fix adds a
		// third: which is which cannot be told, so each is refused.
		{name: "staticlocal_twin", changed: []string{"twin"}, unsafe: []string{KindUncorrelated + ":count.0", KindUncorrelated + ":count.1", KindUncorrelated + ":count.2"}},
		// WARN_ONCE flags renumbered the same way are not refused: the
		// patch carries fresh ones.
		{name: "once_flags", changed: []string{"tcon"}},
		{name: "staticlocal_init", unsafe: []string{KindStaticLocal + ":calls.0"}},
		{name: "constprop", changed: []string{"scale.constprop.0"}},
		// An edit above moves every __LINE__ (bug table, dynamic debug,
		// immediates the line table shows moved): nothing to patch.
		{name: "line", lineOnly: []string{"checked"}},
		// A "FILE:LINE" string literal that moved with its code.
		{name: "line_string", lineOnly: []string{"fill"}},
		// A real constant change next to moved lines still counts: no
		// code at line 64 moved to 65.
		{name: "line_constant", changed: []string{"checked"}},
		// Without debugging information there is no evidence that an
		// immediate is a line number: the function is replaced.
		{name: "line_nodebug", changed: []string{"checked"}},
		{name: "init", changed: []string{"setup"}, unsafe: []string{KindInit + ":setup"}},
		{name: "data", changed: []string{"count"}, newData: []string{"limit"}, unsafe: []string{KindData + ":table"}},
		// Constant data holds no state: its user is replaced (though its
		// code is the same) and uses a new copy.
		{name: "rodata", changed: []string{"limit"}, newData: []string{"limits"}},
		// A new function renumbers the __func__.N strings, which only
		// debug records refer to: they pair by contents.
		{name: "funcnames", new: []string{"gamma_"}, newData: []string{"__func__.0", "descriptor.3"}},
		// A dynamic debug record with a new format goes with its function.
		{name: "dyndbg", changed: []string{"report"}, newData: []string{"descriptor.1"}},
		// The message moves to a new helper: its __func__ string, which
		// only the record refers to, changes with it and is carried.
		{name: "dyndbg_moved", changed: []string{"stop"}, new: []string{"stop_locked"}, newData: []string{"__func__.0"}},
		// Entries of .discard.addressable, new or pointing at init code,
		// never reach the kernel: not new data, no reason to refuse.
		{name: "discard", changed: []string{"clear"}},
		// g's debug record goes and h brings one: records hold no
		// state, so an unmatched one of the same name is no reason to
		// refuse.
		{name: "dyndbg_renumbered", new: []string{"e", "h"}, newData: []string{"__func__.0", "__func__.2", "descriptor.3", "descriptor.5"}},
		{name: "layout", changed: []string{"conn_get"}, unsafe: []string{KindTypeLayout + ":struct conn"}},
		{name: "notrace", changed: []string{"fast"}, unsafe: []string{KindNoFentry + ":fast"}},
		// A static notrace function is carried as a copy for its
		// replaced caller; one an ops table points to is refused.
		{name: "notrace_static", changed: []string{"op_run", "sys_setattr"}, new: []string{"do_sys_setattr"}, unsafe: []string{KindNoFentry + ":op_run"}},
		// Only the unlikely part moved to .text.unlikely changed; its
		// parent jumps to it, so both are replaced.
		{name: "cold", changed: []string{"check", "check.cold"}},
		// Same code, but a BUG became a WARN in the function's entry:
		// the function is replaced by a copy with the new entry.
		{name: "special", changed: []string{"checked"}},
		// A new compound literal renumbers the table's and new strings
		// move theirs: the table's literals still pair by their text.
		{name: "literal", changed: []string{"smbus"}, newData: []string{"smbus_ids"}},
		{name: "inline", changed: []string{"set_a", "set_b"}, explain: map[string][]string{"clamp": {"set_a", "set_b"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pre, post := compileCase(t, tt.name)
			res, err := DiffFiles(pre, post, testlayout.Real(t))
			if err != nil {
				t.Fatal(err)
			}
			check := func(what string, got, want []string) {
				t.Helper()
				if want == nil {
					want = []string{}
				}
				if got == nil {
					got = []string{}
				}
				if !slices.Equal(got, want) {
					t.Errorf("%s = %q, want %q", what, got, want)
				}
			}
			check("changed", names(res.Changed), tt.changed)
			check("new", names(res.New), tt.new)
			var nd []string
			for _, d := range res.NewData {
				nd = append(nd, d.Name)
			}
			check("new data", nd, tt.newData)
			check("line-only", res.LineOnly, tt.lineOnly)
			check("unsafe", kinds(res.Unsafe), tt.unsafe)
			explained := map[string][]string{}
			for _, e := range res.Explanations {
				explained[e.Inlined] = e.Changed
			}
			for callee, want := range tt.explain {
				check("explanation of "+callee, explained[callee], want)
			}
			if tt.explain != nil && len(explained) != len(tt.explain) {
				t.Errorf("explanations = %v, want %v", explained, tt.explain)
			}
			for _, p := range res.Unsafe {
				if !strings.Contains(p.Reason, p.Symbol) && !strings.Contains(p.Reason, strings.TrimPrefix(p.Symbol, "struct ")) {
					t.Errorf("reason %q does not name %s", p.Reason, p.Symbol)
				}
			}
			if res.Patchable() != (len(tt.unsafe) == 0) {
				t.Errorf("Patchable() = %v with unsafe %v", res.Patchable(), res.Unsafe)
			}
			if _, err := json.Marshal(res); err != nil {
				t.Fatal(err)
			}
			if t.Failed() {
				b, _ := json.MarshalIndent(res, "", "  ")
				t.Logf("result: %s", b)
			}
		})
	}
}

// The same object against itself differs in nothing.
func TestIdentical(t *testing.T) {
	pre, _ := compileCase(t, "inline")
	res, err := DiffFiles(pre, pre, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Changed)+len(res.New)+len(res.Removed)+len(res.NewData)+len(res.Unsafe) != 0 {
		t.Fatalf("object differs from itself: %+v", res)
	}
}

// A changed function lists what it refers to, local or not, as the module
// generator needs it.
func TestRefs(t *testing.T) {
	pre, post := compileCase(t, "newhelper")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Changed) != 1 {
		t.Fatalf("changed: %+v", res.Changed)
	}
	refs := map[string]Ref{}
	for _, r := range res.Changed[0].Refs {
		refs[r.Name] = r
	}
	if r, ok := refs["check"]; !ok || !r.Local || !r.Defined || !r.Func || !r.New {
		t.Errorf("ref to check = %+v, want local defined new function", r)
	}
	if r, ok := refs["sink"]; !ok || r.Local || r.Defined {
		t.Errorf("ref to sink = %+v, want external global", r)
	}
	if _, ok := refs["__fentry__"]; !ok {
		t.Errorf("no __fentry__ ref: %+v", res.Changed[0].Refs)
	}
}

func TestNotObject(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.o")
	if err := os.WriteFile(p, []byte("not an object"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := DiffFiles(p, p, nil)
	if !errorsIs(err, ErrNoObject) || !errorsIs(err, elfobj.ErrNotObject) {
		t.Fatalf("err = %v, want ErrNoObject and elfobj.ErrNotObject", err)
	}
}

func TestBaseName(t *testing.T) {
	for in, want := range map[string]string{
		"foo":                           "foo",
		"foo.constprop.0":               "foo.constprop",
		"foo.isra.12":                   "foo.isra",
		"foo.part.0.cold":               "foo.part.cold",
		"calls.3":                       "calls",
		"__key.127":                     "__key",
		"__UNIQUE_ID_ddebug412.5":       "__UNIQUE_ID_ddebug",
		"__UNIQUE_ID___addressable_x86": "__UNIQUE_ID___addressable_x",
	} {
		if got := baseName(in); got != want {
			t.Errorf("baseName(%q) = %q, want %q", in, got, want)
		}
	}
}

// A renumbered static local keeps its identity: counter refers to the
// same variable (calls.1 before, calls.2 after), so it is not new.
func TestStaticLocalCorrelation(t *testing.T) {
	pre, post := compileCase(t, "staticlocal")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range res.Changed {
		if f.Name != "counter" {
			continue
		}
		for _, r := range f.Refs {
			if r.Name == "calls.2" {
				if r.New || !r.Local {
					t.Errorf("counter's calls.2 = %+v, want a local that is not new", r)
				}
				// The running kernel has it by its pre-fix name.
				if got := res.PreName("calls.2"); got != "calls.1" {
					t.Errorf("PreName(calls.2) = %q, want calls.1 (renamed %v)", got, res.Renamed)
				}
				return
			}
		}
		t.Fatalf("counter does not refer to calls.2: %+v", f.Refs)
	}
	t.Fatal("counter not changed")
}

// The function using changed constant data refers to the patch's copy.
func TestCarriedConstant(t *testing.T) {
	pre, post := compileCase(t, "rodata")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.NewData) != 1 || res.NewData[0].Replaces != "limits" {
		t.Fatalf("new data = %+v", res.NewData)
	}
	if len(res.Changed) != 1 {
		t.Fatalf("changed = %+v", res.Changed)
	}
	for _, r := range res.Changed[0].Refs {
		if r.Name == "limits" && !r.New {
			t.Errorf("limit's reference to limits is not marked for the carried copy: %+v", r)
		}
	}
}

func TestNotraceCopyMarked(t *testing.T) {
	pre, post := compileCase(t, "notrace_static")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.New) != 1 || !res.New[0].Notrace {
		t.Errorf("new = %+v, want do_sys_setattr marked notrace", res.New)
	}
}

// TestUnknownSpecialSection: an object with a special section that its
// kernel's layout does not describe (6.12 has no .parainstructions) is
// refused with the reason; with the layout that has it, it is not.
func TestUnknownSpecialSection(t *testing.T) {
	pre, post := compileCase(t, "paravirt")
	lay := testlayout.Real(t)
	res, err := DiffFiles(pre, post, lay)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(names(res.Changed), []string{"through_pv"}) || len(res.Unsafe) > 0 {
		t.Fatalf("6.1: changed %v, unsafe %v", names(res.Changed), res.Unsafe)
	}
	delete(lay.Sections, ".parainstructions")
	if res, err = DiffFiles(pre, post, lay); err != nil {
		t.Fatal(err)
	}
	if got := kinds(res.Unsafe); !slices.Equal(got, []string{KindSpecialSection + ":.parainstructions"}) || !strings.Contains(res.Unsafe[0].Reason, "paravirt_patch_site") {
		t.Errorf("without the layout of .parainstructions: unsafe %v", res.Unsafe)
	}
}
