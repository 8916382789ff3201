package klpmod

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// A diff object that calls two namespaced exports and a plain one gets
// one import per namespace, and nothing for the symbols it defines.
func TestImportNamespaces(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "diff.c")
	code := `extern int ns_a_one(void), ns_a_two(void), ns_b(void), plain(void);
int defined_here(void) { return 1; }
int new_func(void) { return ns_a_one() + ns_a_two() + ns_b() + plain() + defined_here(); }
`
	if err := os.WriteFile(src, []byte(code), 0o644); err != nil {
		t.Fatal(err)
	}
	obj := testutils.CompileObject(t, src)
	if err := os.WriteFile(filepath.Join(dir, "stitch_diff_0.o_shipped"), obj, 0o644); err != nil {
		t.Fatal(err)
	}
	hook := filepath.Join(dir, "stitch_hook.c")
	if err := os.WriteFile(hook, []byte("MODULE_LICENSE(\"GPL\");\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	symvers := kbuild.Symvers{
		"ns_a_one":     {Module: "vmlinux", Namespace: "NS_A"},
		"ns_a_two":     {Module: "m", Namespace: "NS_A"},
		"ns_b":         {Module: "vmlinux", Namespace: "NS_B"},
		"plain":        {Module: "vmlinux"},
		"defined_here": {Module: "other", Namespace: "NS_NOT_USED"},
	}
	if err := importNamespaces(dir, symvers); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(hook)
	if err != nil {
		t.Fatal(err)
	}
	want := "MODULE_LICENSE(\"GPL\");\nMODULE_INFO(import_ns, \"NS_A\");\nMODULE_INFO(import_ns, \"NS_B\");\n"
	if string(b) != want {
		t.Errorf("stitch_hook.c:\n%s\nwant:\n%s", b, want)
	}
	// Nothing namespaced: the registration is left as it was.
	os.WriteFile(hook, nil, 0o644)
	if err := importNamespaces(dir, kbuild.Symvers{"plain": {Module: "vmlinux"}}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(hook); strings.Contains(string(b), "import_ns") {
		t.Errorf("imports without namespaces: %s", b)
	}
}
