package objdiff

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

type objPair struct{ pre, post string }

// benchPairs returns the object pairs to diff: $STITCH_BENCH_DIR/pre/X.o
// with $STITCH_BENCH_DIR/post/X.o when set, or else every object of
// net/ipv4 in the prepared kernel tree paired with itself (the common case
// of a subdirectory where one file changed) plus the ipmr_base fix.
func benchPairs(b *testing.B) []objPair {
	if dir := os.Getenv("STITCH_BENCH_DIR"); dir != "" {
		pres, err := filepath.Glob(filepath.Join(dir, "pre", "*.o"))
		if err != nil || len(pres) == 0 {
			b.Fatalf("no objects in %s/pre (%v)", dir, err)
		}
		var ps []objPair
		for _, p := range pres {
			ps = append(ps, objPair{p, filepath.Join(dir, "post", filepath.Base(p))})
		}
		return ps
	}
	tree := kernelTree(b)
	ctx := context.Background()
	objs, err := tree.CompileDir(ctx, "net/ipv4", "")
	if err != nil {
		b.Fatal(err)
	}
	// Copies, so that later builds in the tree do not change them.
	out := b.TempDir()
	var ps []objPair
	for _, o := range objs {
		if filepath.Base(o) == "ipmr_base.o" {
			continue
		}
		raw, err := os.ReadFile(o)
		if err != nil {
			b.Fatal(err)
		}
		dst := filepath.Join(out, filepath.Base(o))
		if err := os.WriteFile(dst, raw, 0o644); err != nil {
			b.Fatal(err)
		}
		ps = append(ps, objPair{dst, dst})
	}
	patch, err := os.ReadFile(filepath.Join("testdata", "kernel", "net_ipv4_ipmr_base.patch"))
	if err != nil {
		b.Fatal(err)
	}
	files, _, err := tree.PatchedFiles(ctx, patch)
	if err != nil {
		b.Fatal(err)
	}
	const src = "net/ipv4/ipmr_base.c"
	pre, post, err := tree.CompilePair(ctx, "net/ipv4/ipmr_base.o", src, files[src], "", out)
	if err != nil {
		b.Fatal(err)
	}
	return append(ps, objPair{pre, post})
}

// BenchmarkDiffDir diffs a whole directory of object pairs per iteration.
func BenchmarkDiffDir(b *testing.B) {
	pairs := benchPairs(b)
	lay := testlayout.Real(b)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		for _, p := range pairs {
			if _, err := DiffFiles(p.pre, p.post, lay); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(len(pairs)*b.N)/b.Elapsed().Seconds(), "objects/s")
	b.ReportMetric(float64(len(pairs)), "objects/op")
}
