package objdiff

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// TestCorpus diffs every single-file fix of a corpus directory
// (STITCH_CORPUS=corpus/6.1/fixes, say) against the real tree and
// logs what it finds: a survey, slow, never run by default. Only errors
// reading the objects fail it: a fix may leave the machine code as it was
// (crypto_drbg's only touches a check gcc had already proven dead).
func TestCorpus(t *testing.T) {
	dir := os.Getenv("STITCH_CORPUS")
	if dir == "" {
		t.Skip("set STITCH_CORPUS to a directory of fixes")
	}
	tree := kernelTree(t)
	lay := testlayout.Real(t)
	patches, err := filepath.Glob(filepath.Join(dir, "*.patch"))
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(patches)
	if only := os.Getenv("STITCH_CORPUS_MATCH"); only != "" {
		var keep []string
		for _, p := range patches {
			if strings.Contains(p, only) {
				keep = append(keep, p)
			}
		}
		patches = keep
	}
	ctx := context.Background()
	for _, p := range patches {
		patch, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files, _, err := tree.PatchedFiles(ctx, patch)
		if err != nil || len(files) != 1 {
			t.Logf("%s: skipped (%d files, %v)", filepath.Base(p), len(files), err)
			continue
		}
		for src, patched := range files {
			if !strings.HasSuffix(src, ".c") {
				continue
			}
			obj := strings.TrimSuffix(src, ".c") + ".o"
			pre, post, err := tree.CompilePair(ctx, obj, src, patched, "", t.TempDir())
			if err != nil {
				t.Logf("%s: %s not built: %v", filepath.Base(p), obj, firstLine(err))
				continue
			}
			res, err := DiffFiles(pre, post, lay)
			if err != nil {
				t.Errorf("%s: %v", filepath.Base(p), err)
				continue
			}
			var unsafe []string
			for _, u := range res.Unsafe {
				unsafe = append(unsafe, u.Kind+":"+u.Symbol)
			}
			var expl []string
			for _, e := range res.Explanations {
				expl = append(expl, e.Inlined+"->"+strings.Join(e.Changed, "+"))
			}
			t.Logf("%s: changed %v new %v removed %v data %v line-only %v unsafe %v explained %v",
				filepath.Base(p), names(res.Changed), names(res.New), res.Removed, len(res.NewData), res.LineOnly, unsafe, expl)
			if len(res.Changed)+len(res.New)+len(res.NewData)+len(res.Unsafe)+len(res.Removed) == 0 {
				t.Logf("%s: no machine-code difference", filepath.Base(p))
			}
		}
	}
}

func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}
