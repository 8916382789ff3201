package build

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/objdiff"
)

// STITCH_CARRIES_INIT(null_init) covers init_module, the alias
// module_init makes of it, in a real gcc object; another name does not.
func TestInitCarriedAlias(t *testing.T) {
	cc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("no gcc")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "m.c")
	code := `int sink(int);
__attribute__((section(".init.text"))) int null_init(void) { return sink(1); }
int init_module(void) __attribute__((alias("null_init")));
__attribute__((section(".init.text"))) int other_init(void) { return sink(2); }
`
	if err := os.WriteFile(src, []byte(code), 0o644); err != nil {
		t.Fatal(err)
	}
	obj := filepath.Join(dir, "m.o")
	if out, err := exec.Command(cc, "-O2", "-c", src, "-o", obj).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	post, err := os.ReadFile(obj)
	if err != nil {
		t.Fatal(err)
	}
	c := compiled{Source: "m.c", Object: "null_blk", Post: post}
	for _, tc := range []struct {
		sym  string
		want bool
	}{{"null_init", true}, {"init_module", true}, {"other_init", false}} {
		got, err := initCarried(c, objdiff.Problem{Kind: objdiff.KindInit, Symbol: tc.sym}, []string{"null_init"})
		if err != nil || got != tc.want {
			t.Errorf("%s: carried %v, %v; want %v", tc.sym, got, err, tc.want)
		}
	}
	if got, _ := initCarried(c, objdiff.Problem{Kind: objdiff.KindData, Symbol: "null_init"}, []string{"null_init"}); got {
		t.Errorf("a data problem was taken for an init one")
	}
}

// Built-in __exit code that nothing calls needs nothing live; a
// module's does.
func TestBuiltinExit(t *testing.T) {
	p := objdiff.Problem{Kind: objdiff.KindInit, Symbol: "fini", ExitOnly: true}
	if !builtinExit(compiled{Object: "vmlinux"}, p) {
		t.Errorf("vmlinux exit-only function refused")
	}
	if builtinExit(compiled{Object: "ebtable_filter"}, p) {
		t.Errorf("a module's exit function accepted without hooks")
	}
	p.ExitOnly = false
	if builtinExit(compiled{Object: "vmlinux"}, p) {
		t.Errorf("an exit function that code calls was accepted")
	}
}
