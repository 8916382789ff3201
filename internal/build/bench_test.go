package build_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kernel"
)

// BenchmarkDemoFixAllKernels builds the demo's fix for every 6.1 kernel
// ready in the cache, in one BuildMany call:
//
//   - cold: a fresh cache that shares only the downloaded packages and the
//     kernels' extracted files, so every source tree is unpacked and
//     prepared and every vmlinux extracted again;
//   - warm: the same cache once more, everything reused.
//
// Each kernel's time is logged and reported as a metric. It takes minutes
// and about 1.5 GB of disk per kernel (cold):
//
//	go test -run - -bench DemoFixAllKernels -benchtime 1x ./internal/build
func BenchmarkDemoFixAllKernels(b *testing.B) {
	ctx := context.Background()
	src := kernel.CacheDir()
	all, err := kernel.List(ctx, src)
	if err != nil {
		b.Fatal(err)
	}
	var releases []string
	for _, p := range all {
		if p.Series == "6.1" {
			releases = append(releases, p.Release)
		}
	}
	if len(releases) == 0 {
		b.Skip("no 6.1 kernel ready (stitch kernel add)")
	}
	fix, err := build.LoadFix(filepath.Join("..", "demo", "fix", "cmdline.patch"))
	if err != nil {
		b.Fatal(err)
	}
	// The cold cache: links to the packages and the extracted kernels,
	// no prepared trees, no extracted vmlinux.
	cache := b.TempDir()
	for _, d := range append([]string{"debs"}, prefixed("kernels/", releases)...) {
		if _, err := os.Stat(filepath.Join(src, d)); err != nil {
			continue // a system kernel has no entry in kernels/
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(cache, d)), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(src, d), filepath.Join(cache, d)); err != nil {
			b.Fatal(err)
		}
	}
	run := func(b *testing.B) {
		for range b.N {
			profiles := make([]*kernel.Profile, len(releases))
			for i, r := range releases {
				if profiles[i], err = kernel.Open(ctx, cache, r); err != nil {
					b.Fatal(err)
				}
			}
			res, err := build.BuildMany(ctx, profiles, []*build.FixVariants{fix}, build.ManyOptions{
				Options: build.Options{Out: b.TempDir()}, Cache: cache})
			if err != nil {
				b.Fatal(err)
			}
			var total time.Duration
			var rows []string
			for _, r := range res {
				if r.Outcome != build.OutcomeBuilt {
					b.Fatalf("%s: %s: %s", r.Release, r.Outcome, r.Reason)
				}
				total += r.Elapsed
				rows = append(rows, fmt.Sprintf("%s %.1fs", r.Release, r.Elapsed.Seconds()))
				b.ReportMetric(r.Elapsed.Seconds(), "s/"+r.Release)
			}
			b.Logf("%d kernels in %.1fs: %s", len(res), total.Seconds(), strings.Join(rows, ", "))
		}
	}
	b.Run("cold", run)
	b.Run("warm", run)
}

func prefixed(prefix string, names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = prefix + n
	}
	return out
}
