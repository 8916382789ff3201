package build

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/objdiff"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// A function-local static the target numbered otherwise is found by its
// base name when only one data symbol of the object has it, and refused
// when several do. Real symbols: xfs.ko has one xstats (xstats.0);
// vmlinux has many lockdep __key statics.
func TestRenumberedStatic(t *testing.T) {
	k := openTestKernel(t)
	if got := k.Statics("xfs", "xstats"); !slices.Equal(got, []string{"xstats.0"}) {
		t.Fatalf("xfs's xstats statics = %v, want [xstats.0]", got)
	}
	if got, err := renumberedStatic(k, "xfs", "xstats.2"); err != nil || got != "xstats.0" {
		t.Errorf("xstats.2 in xfs = %q, %v; want xstats.0", got, err)
	}
	_, err := renumberedStatic(k, "vmlinux", "__key.99999")
	if !errors.Is(err, ErrNoSymbol) || !strings.Contains(err.Error(), "statics named __key") {
		t.Errorf("__key.99999 in vmlinux: %v; want refused as ambiguous", err)
	}
	// Functions are not statics: a missing clone is carried, not matched.
	if got, err := renumberedStatic(k, "vmlinux", "cmdline_proc_show.constprop.9"); got != "" || err != nil {
		t.Errorf("a function's clone = %q, %v; want none", got, err)
	}
}

// compileFile compiles C source text as a kernel object would be.
func compileFile(t *testing.T, dir, name, src string) *elfobj.Object {
	t.Helper()
	path := dir + "/" + name + ".c"
	if err := writeFile(path, src); err != nil {
		t.Fatal(err)
	}
	o, err := elfobj.Parse(testutils.CompileObject(t, path))
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// A function new in one file of a fix and called from another is
// carried by the patch module (exported by its object); one only its own
// file calls, or one that no changed file calls, is not exported.
func TestNewGlobalsUsed(t *testing.T) {
	dir := t.TempDir()
	type file struct{ pre, post string }
	files := []file{
		// a.c adds two functions: one b.c calls, one nothing calls.
		{"int a(int x) { return x; }\n",
			"int a(int x) { return x; }\nint new_called(void) { return 1; }\nint new_unused(void) { return 2; }\n"},
		// b.c calls a.c's new function.
		{"extern int sink(int);\nint b(int x) { return sink(x); }\n",
			"extern int sink(int);\nextern int new_called(void);\nint b(int x) { return sink(x + new_called()); }\n"},
	}
	var pres, posts []*elfobj.Object
	var ds []*objdiff.Result
	for i, f := range files {
		name := string(rune('a' + i))
		pre := compileFile(t, dir+"/pre", name, f.pre)
		post := compileFile(t, dir+"/post", name, f.post)
		pres, posts = append(pres, pre), append(posts, post)
		ds = append(ds, objdiff.Diff(pre, post, testlayout.Real(t)))
	}
	got := newGlobalsUsed(pres, posts, ds)
	if !slices.Equal(got[0], []string{"new_called"}) || len(got[1]) != 0 {
		t.Errorf("exports = %q, want a.c's new_called only", got)
	}
	// Without b.c's change nothing calls it: nothing to carry.
	if got := newGlobalsUsed(pres[:1], posts[:1], ds[:1]); len(got[0]) != 0 {
		t.Errorf("exports of a.c alone = %q, want none", got)
	}
}

func writeFile(path, text string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(text), 0o644)
}
