package build_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// TestBuildManyKernels builds real corpus fixes for three real 6.1
// kernels in one call each: Debian's 6.1.0-47 (6.1.170-3, older than the
// fixes' base), 6.1.0-54 (6.1.190-1, their base) and 6.1.0-57
// (6.1.192-3, which already has them). Each kernel's tree is prepared
// once (the cache keeps it) and its environment opened once for the test.
func TestBuildManyKernels(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped in -short mode: builds for three kernels (minutes)")
	}
	kernels := testutils.Profiles(t, "6.1.0-47-amd64", testutils.Release, "6.1.0-57-amd64")
	corpus := filepath.Join(testutils.Corpus(t), "fixes")
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	var mu sync.Mutex
	envs := map[string]*build.Env{}
	open := func(ctx context.Context, p *kernel.Profile) (*build.Env, error) {
		mu.Lock()
		defer mu.Unlock()
		if e := envs[p.Release]; e != nil {
			return e, nil
		}
		e, err := build.OpenEnv(ctx, p, kernel.CacheDir(), nil)
		if err == nil {
			envs[p.Release] = e
		}
		return e, err
	}
	many := func(t *testing.T, kernels []*kernel.Profile, fixes ...string) ([]*build.KernelResult, string) {
		t.Helper()
		var vs []*build.FixVariants
		for _, f := range fixes {
			v, err := build.LoadFix(f)
			if err != nil {
				t.Fatal(err)
			}
			vs = append(vs, v)
		}
		out := t.TempDir()
		var steps []string
		res, err := build.BuildMany(ctx, kernels, vs, build.ManyOptions{
			Options: build.Options{Out: out}, OpenEnv: open,
			Progress: func(s build.KernelStep) {
				if s.Done && s.Name == "kernel" {
					steps = append(steps, s.Release)
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(res) != len(kernels) || len(steps) != len(kernels) {
			t.Fatalf("%d results and %d kernels reported for %d kernels", len(res), len(steps), len(kernels))
		}
		for _, r := range res {
			t.Logf("%s: %s, %s: %s (%.1fs)", r.Release, r.PortSummary(), r.Outcome, r.Reason, r.Elapsed.Seconds())
		}
		return res, out
	}

	t.Run("namei", func(t *testing.T) {
		res, out := many(t, kernels, filepath.Join(corpus, "fs_namei.patch"))
		old, base, fixed := res[0], res[1], res[2]
		for _, r := range []*build.KernelResult{old, base} {
			if r.Outcome != build.OutcomeBuilt {
				t.Fatalf("%s: %s (%v)", r.Release, r.Outcome, r.Err)
			}
			m, err := contract.ReadManifest(r.Manifest)
			if err != nil {
				t.Fatal(err)
			}
			if m.Kernel.Release != r.Release || filepath.Dir(r.Module) != filepath.Join(out, r.Release) {
				t.Errorf("%s: manifest for %s, module at %s", r.Release, m.Kernel.Release, r.Module)
			}
		}
		// Twenty stable releases older: the hunk lands 43 lines higher,
		// and run-pre matching passes against that kernel's own image.
		if p := old.Ports[0].Port; p.Status != kbuild.PortOffset || p.Hunks[0].Offset != -43 {
			t.Errorf("6.1.0-47: port %s, want an offset of -43", p.Summary())
		}
		if p := base.Ports[0].Port; p.Status != kbuild.PortClean {
			t.Errorf("6.1.0-54: port %s, want clean", p.Summary())
		}
		if fixed.Outcome != build.OutcomeContained || fixed.Module != "" {
			t.Fatalf("6.1.0-57: %s %s (%v), want contained and nothing built", fixed.Outcome, fixed.Module, fixed.Err)
		}
		c, err := contract.ReadContained(fixed.Contained)
		if err != nil {
			t.Fatal(err)
		}
		if c.Kernel.Release != "6.1.0-57-amd64" || c.Kernel.BuildID != envs["6.1.0-57-amd64"].Kernel.BuildID() ||
			c.Name != "stitch_fs_namei" || len(c.Fixes) != 1 || c.Fixes[0].Files[0] != "fs/namei.c" {
			t.Errorf("contained record %+v", c)
		}
		if filepath.Base(fixed.Contained) != "stitch_fs_namei"+contract.ContainedSuffix || filepath.Dir(fixed.Contained) != filepath.Join(out, "6.1.0-57-amd64") {
			t.Errorf("contained record at %s", fixed.Contained)
		}
	})

	// A fix as a directory of variants: the 6.1 one, which does not port
	// to 6.1.0-47, is picked for every 6.1 kernel; a kernel refused does
	// not stop the others.
	t.Run("variants", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(corpus, "net_ipv6_exthdrs.patch"))
		if err != nil {
			t.Fatal(err)
		}
		dir := filepath.Join(t.TempDir(), "exthdrs")
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "6.1.patch"), append([]byte("[ Upstream commit 0123456789abcdef0123456789abcdef01234567 ]\n\n"), b...), 0o644)
		os.WriteFile(filepath.Join(dir, "6.12.patch"), []byte("--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n"), 0o644)
		res, _ := many(t, []*kernel.Profile{kernels[0], kernels[2]}, dir)
		old, fixed := res[0], res[1]
		if old.Outcome != build.OutcomeNotPorted || !errors.Is(old.Err, build.ErrBadFix) || !errors.Is(old.Err, kbuild.ErrDoesNotApply) {
			t.Errorf("6.1.0-47: %s (%v), want does-not-apply", old.Outcome, old.Err)
		}
		p := old.Ports[0]
		if p.Variant != "6.1" || p.Port.Hunks[0].Result != kbuild.HunkFails || !strings.Contains(old.Reason, "net/ipv6/exthdrs.c #1 (@@ -373,23 +373,16 @@) FAILED at 373") {
			t.Errorf("6.1.0-47: variant %q, reason %q, hunks %+v", p.Variant, old.Reason, p.Port.Hunks)
		}
		if fixed.Outcome != build.OutcomeContained {
			t.Fatalf("6.1.0-57: %s (%v)", fixed.Outcome, fixed.Err)
		}
		c, err := contract.ReadContained(fixed.Contained)
		if err != nil {
			t.Fatal(err)
		}
		if f := c.Fixes[0]; f.Name != "exthdrs" || f.Variant != "6.1" || f.Upstream != "0123456789abcdef0123456789abcdef01234567" {
			t.Errorf("contained fix %+v", f)
		}

		// No variant for this series and no default.
		os.Remove(filepath.Join(dir, "6.1.patch"))
		res, _ = many(t, kernels[2:], dir)
		if r := res[0]; r.Outcome != build.OutcomeNotPorted || !errors.Is(r.Err, build.ErrNoVariant) {
			t.Errorf("no variant: %s (%v)", r.Outcome, r.Err)
		}
	})
}
