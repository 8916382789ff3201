package build

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/kbuild"
)

// A miniature source tree: which C files a header fix reaches.
func TestIncluders(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"include/linux/foo.h":   "int foo;\n",
		"include/linux/wide.h":  "int wide;\n",
		"include/linux/other.h": "#include <linux/wide.h>\n",
		"kernel/a.c":            "#include <linux/foo.h>\n",
		"kernel/b.c":            "#  include \"local.h\"\n#include <linux/wide.h>\n",
		"kernel/local.h":        "int local;\n",
		"arch/arm/x.c":          "#include <linux/foo.h>\n",
		"arch/x86/y.c":          "#include <linux/foo.h>\n",
		"kernel/c.c":            "#include <linux/foobar.h>\n",
	}
	for p, c := range files {
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, p), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s := &TreeSource{Tree: &kbuild.Tree{Dir: dir, Release: "test"}}
	ctx := context.Background()
	for h, want := range map[string][]string{
		"include/linux/foo.h": {"arch/x86/y.c", "kernel/a.c"},
		"kernel/local.h":      {"kernel/b.c"},
	} {
		got, err := s.includers(ctx, h)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("includers(%s) = %v, %v; want %v", h, got, err, want)
		}
	}
	if _, err := s.includers(ctx, "include/linux/wide.h"); !errors.Is(err, ErrUnpatchable) || !strings.Contains(err.Error(), "include/linux/other.h") {
		t.Errorf("a header other headers include: %v", err)
	}
}
