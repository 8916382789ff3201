package corpus_test

import (
	"context"
	"errors"
	"io"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/corpus"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// levelKernel is the kernel of the corpus's per-fix results these fixes
// applied on (docs/corpus/2026-11-30-6.1.0-53-amd64.csv), one of the
// Makefile's TEST_KERNELS.
const levelKernel = "6.1.0-53-amd64"

// TestCorpusLevel is `stitch corpus --cumulative` in small: three real
// corpus fixes, one in vmlinux and two in modules, combined into one
// cumulative level built for the real kernel, applied in the VM with the
// modules loaded, replaced by a level without the third, and reverted.
// The whole corpus is a command: stitch corpus --cumulative.
func TestCorpusLevel(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.Profile(t, levelKernel)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	all, err := corpus.ReadIndex(testutils.Corpus(t))
	if err != nil {
		t.Fatal(err)
	}
	entries, err := corpus.Select(all, "^(kernel_cgroup_rstat|fs_exfat_fatent|net_sched_em_text)$", 0)
	if err != nil || len(entries) != 3 {
		t.Fatalf("select: %v (%d)", err, len(entries))
	}
	fixes, err := corpus.ReadFixes(entries)
	if err != nil {
		t.Fatal(err)
	}
	env, err := build.OpenEnv(ctx, p, kernel.CacheDir(), nil)
	if errors.Is(err, kbuild.ErrNoSource) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	lb := corpus.NewLevelBuilder(env, t.TempDir(), func(key string, cached bool, elapsed time.Duration, err error) {
		t.Logf("compiled %s in %.1fs: %v", key, elapsed.Seconds(), err)
	})
	// One batch compiles the three (kbuild.Tree.CompilePairs); the
	// levels then build from the cache.
	lb.Precompile(ctx, fixes, 0, func(n int, elapsed time.Duration, err error) {
		t.Logf("compiled %d fixes in one batch in %.1fs: %v", n, elapsed.Seconds(), err)
	})
	l1, err := lb.Build(ctx, 1, fixes, nil)
	if err != nil {
		t.Fatal(err)
	}
	if l1.Compile != 0 {
		t.Errorf("level 1 compiled again (%v) after the batch", l1.Compile)
	}
	t.Logf("level 1: %d fixes, %d functions, %d objects, %d bytes, %.0fs", len(l1.Fixes), l1.Funcs, l1.Objects, l1.Bytes, l1.Elapsed.Seconds())
	if len(l1.Fixes) != 3 || len(l1.Dropped) != 0 || l1.Objects != 3 || !slices.Equal(l1.Modules, []string{"em_text", "exfat"}) {
		t.Fatalf("level 1: %+v", l1)
	}
	keep, left := corpus.WithoutEvery(l1.Fixes, 3)
	l2, err := lb.Build(ctx, 2, corpus.Pick(fixes, keep), l1)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(l2.Withdrawn, left) || len(l2.Fixes) != 2 || l2.Compile != 0 {
		t.Fatalf("level 2 (compiled again for %v?): %+v", l2.Compile, l2)
	}
	run, err := corpus.RunLevels(ctx, []string{l1.Module, l2.Module}, l1.Modules, append(l1.Files, l2.Files...), corpus.LevelVMOptions{
		Kernel: p.BootImage, Stitch: testutils.StitchBinary(t), Modules: p.Modules, Output: testOutput(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, ph := range run.Phases {
		t.Logf("%s: %.2fs (load %.2fs, transition %.2fs, unload %.2fs), livepatches %v, workloads %v, failed %v", ph.Name, ph.Total.Seconds(), ph.Load.Seconds(), ph.Transition.Seconds(), ph.Unload.Seconds(), ph.Patches, ph.Workloads, ph.Failed)
	}
	if !run.OK || len(run.Loaded) != 2 || len(run.Phases) != 4 {
		t.Fatalf("VM: %+v", run)
	}
	if got := run.Phases[2].Patches; !slices.Equal(got, []string{l2.Name}) {
		t.Errorf("after the replace: livepatches %v", got)
	}
	if !slices.Contains(run.Phases[0].Workloads, "tcp-loopback") {
		t.Errorf("workloads %v: a net/sched fix runs the loopback ones", run.Phases[0].Workloads)
	}
}

// testOutput is where the VM's console goes: stderr with -v.
func testOutput(t *testing.T) io.Writer {
	if !testing.Verbose() {
		return io.Discard
	}
	return os.Stderr
}
