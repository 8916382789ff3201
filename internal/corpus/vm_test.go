package corpus_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/corpus"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// TestCorpusSubset runs the whole path on a few real fixes: vmlinux and
// modules, applied ones and a refusal. The full corpus is a benchmark:
// stitch corpus corpus/6.1.
func TestCorpusSubset(t *testing.T) {
	vmKernel := testutils.RequireVM(t)
	testutils.RequireHeaders(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	all, err := corpus.ReadIndex(testutils.Corpus(t))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"block_blk-mq":                corpus.Applied, // a tracepoint and a static call in the block layer's hot path
		"crypto_af_alg":               corpus.Applied, // a module
		"drivers_block_loop":          corpus.Applied, // a module
		"drivers_block_null_blk_main": corpus.Applied, // init code changed on a failure path: carried with its hooks
		"net_rds_tcp":                 corpus.Refused, // a sysctl table the kernel registered, and a handler's parameters changed
		"fs_xfs_xfs_iops":             corpus.Applied, // loading xfs makes the kernel ask modprobe for crc32c
	}
	entries, err := corpus.Select(all, "^(block_blk-mq|crypto_af_alg|drivers_block_loop|drivers_block_null_blk_main|fs_xfs_xfs_iops|net_rds_tcp)$", 0)
	if err != nil || len(entries) != len(want) {
		t.Fatalf("select: %v (%d)", err, len(entries))
	}
	profile := testutils.DefaultProfile(t)
	env, err := build.OpenEnv(ctx, profile, kernel.CacheDir(), nil)
	if errors.Is(err, kbuild.ErrNoSource) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	builder := func(ctx context.Context, fix *build.Fix, hooks, out string) (*build.Result, error) {
		return env.Build(ctx, []*build.Fix{fix}, build.Options{Out: out, Work: filepath.Join(out, "work"), Hooks: hooks})
	}
	results := corpus.BuildAll(ctx, entries, builder, t.TempDir(), func(r corpus.Result) {
		t.Logf("built %s: %s %s (%.1fs)", r.Name, r.Outcome, r.Reason, r.BuildTime.Seconds())
	})
	if err := corpus.ApplyAll(ctx, results, corpus.VMOptions{Kernel: vmKernel, Stitch: testutils.StitchBinary(t), Modules: profile.Modules}); err != nil {
		t.Fatal(err)
	}
	for _, r := range results {
		if r.Outcome != want[r.Name] {
			t.Errorf("%s: %s (%s), want %s", r.Name, r.Outcome, r.Reason, want[r.Name])
		}
	}
	t.Logf("summary: %+v", corpus.Summarize(results))
}
