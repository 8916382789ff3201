package kernel_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// archive lists this machine's archive, or skips without apt lists (CI
// runs apt-get update first, so it fails there).
func archive(t *testing.T) []kernel.Offer {
	t.Helper()
	if _, err := exec.LookPath("apt-cache"); err != nil {
		testutils.Unavailable(t, "no apt-cache")
	}
	offers, err := kernel.Archive(context.Background())
	if errors.Is(err, kernel.ErrNoLists) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return offers
}

// What Archive says of each kernel agrees with apt-cache madison, asked
// separately, and with the facts of Debian 12's archive of November 2026
// where those kernels are still offered.
func TestArchiveReal(t *testing.T) {
	offers := archive(t)
	sources := map[string]map[string]bool{}
	for _, o := range offers {
		if _, err := kernel.ParseRelease(o.Release); err != nil || strings.Contains(o.Release, "dbg") || strings.Contains(o.Release, "unsigned") {
			t.Errorf("offer %+v", o)
		}
		if sources[o.Source.Name] == nil {
			out, err := exec.Command("apt-cache", "madison", o.Source.Name).Output()
			if err != nil {
				t.Fatalf("apt-cache madison %s: %v", o.Source.Name, err)
			}
			sources[o.Source.Name] = map[string]bool{}
			for _, line := range strings.Split(string(out), "\n") {
				if f := strings.Split(line, "|"); len(f) >= 2 {
					sources[o.Source.Name][strings.TrimSpace(f[1])] = true
				}
			}
		}
		if o.SourceAvailable != sources[o.Source.Name][o.Source.Version] {
			t.Errorf("%s: source %v available %v, but apt-cache madison says %v", o.Release, o.Source, o.SourceAvailable, !o.SourceAvailable)
		}
	}
	by := map[string]kernel.Offer{}
	for _, o := range offers {
		by[o.Release] = o
	}
	for release, want := range map[string]string{
		"6.1.0-47-amd64": "6.1.170-3", "6.1.0-47-cloud-amd64": "6.1.170-3", "6.1.0-53-amd64": "6.1.187-1",
		"6.1.0-54-rt-amd64": "6.1.190-1", "6.1.0-57-amd64": "6.1.192-3",
		"6.1.0-48-amd64": "", "6.1.0-49-amd64": "", "6.1.0-51-cloud-amd64": "", "6.1.0-52-rt-amd64": "",
	} {
		o, ok := by[release]
		if !ok {
			t.Logf("%s: no longer in the archive", release)
			continue
		}
		if o.SourceAvailable != (want != "") || (want != "" && o.Source.Version != want) {
			t.Errorf("%s: source %v available %v; want %q", release, o.Source, o.SourceAvailable, want)
		}
	}
	t.Logf("%d kernels offered", len(offers))
}

// Add refuses what it cannot do before touching anything: a release the
// archive lacks (ErrUnknown, naming those it has) and a kernel whose
// exact source is gone (ErrMissing).
func TestAddRefuses(t *testing.T) {
	offers := archive(t)
	ctx := context.Background()
	cache := t.TempDir()
	_, err := kernel.Add(ctx, cache, "6.1.0-1-amd64", kernel.AddOptions{})
	if !errors.Is(err, kernel.ErrUnknown) || !strings.Contains(err.Error(), offers[0].Release) {
		t.Errorf("unknown release: %v", err)
	}
	for _, o := range offers {
		if o.SourceAvailable {
			continue
		}
		_, err := kernel.Add(ctx, cache, o.Release, kernel.AddOptions{})
		if !errors.Is(err, kernel.ErrMissing) || !strings.Contains(err.Error(), "no source in the archive") || !strings.Contains(err.Error(), o.Source.Version) {
			t.Errorf("%s: %v", o.Release, err)
		}
		break
	}
	if _, err := kernel.Add(ctx, cache, "6.1.0-54-arm64", kernel.AddOptions{}); !errors.Is(err, kernel.ErrBadRelease) {
		t.Errorf("bad release: %v", err)
	}
	if ents, _ := os.ReadDir(cache); len(ents) > 1 {
		t.Errorf("refused adds left %d entries in the cache", len(ents))
	}
}

// A kernel added from the debs of the default cache (`make kernels` put
// them there) into a fresh cache, without downloading: its profile opens,
// its boot image decodes, and an external module builds against its
// extracted headers with the kernel's vermagic. Then it is removed.
func TestAddFromCachedDebs(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped in -short mode: extracts a kernel (half a gigabyte) and builds a module")
	}
	archive(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	release := testutils.TestKernels()[0]
	debs, err := kernel.DebsOf(ctx, release)
	if err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	if err := os.MkdirAll(filepath.Join(cache, "debs"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range debs {
		src := filepath.Join(kernel.CacheDir(), "debs", d)
		if _, err := os.Stat(src); err != nil {
			testutils.Unavailable(t, "%s is not in the cache (make kernels fetches it): %v", d, err)
		}
		if err := os.Symlink(src, filepath.Join(cache, "debs", d)); err != nil {
			t.Fatal(err)
		}
	}
	var progress strings.Builder
	start := time.Now()
	a, err := kernel.Add(ctx, cache, release, kernel.AddOptions{Progress: &progress})
	if err != nil {
		t.Fatalf("%v\n%s", err, progress.String())
	}
	t.Logf("added %s in %.1fs:\n%s", release, time.Since(start).Seconds(), progress.String())
	for _, d := range a.Debs {
		if !d.Reused {
			t.Errorf("%s was downloaded again", d.Name)
		}
	}
	p, err := kernel.Open(ctx, cache, release)
	if err != nil {
		t.Fatal(err)
	}
	if p.Origin != kernel.OriginCache || p.BootImage != filepath.Join(cache, "kernels", release, "root/boot/vmlinuz-"+release) ||
		p.SourceDeb != filepath.Join(cache, "debs", debs[4]) || p.Compiler == "" || p.Image.Version != p.Headers.Version {
		t.Errorf("profile %+v", p)
	}
	// The modules are indexed as on an installed system.
	if dep, err := os.ReadFile(filepath.Join(p.Modules, "modules.dep")); err != nil || !strings.Contains(string(dep), "kernel/fs/binfmt_misc.ko:") {
		t.Errorf("modules.dep: %v (%d bytes)", err, len(dep))
	}
	// Nothing of the kernel points outside its directory.
	if dst, err := filepath.EvalSymlinks(filepath.Join(p.Modules, "build")); err != nil || dst != p.HeadersDir {
		t.Errorf("modules/build -> %s, %v", dst, err)
	}
	if dst, err := filepath.EvalSymlinks(filepath.Join(p.HeadersDir, "scripts")); err != nil || !strings.HasPrefix(dst, filepath.Join(cache, "kernels", release, "root")) {
		t.Errorf("headers' scripts -> %s, %v", dst, err)
	}
	// Again: already there, nothing done.
	if a, err := kernel.Add(ctx, cache, release, kernel.AddOptions{}); err != nil || !a.Ready {
		t.Errorf("second add: %+v, %v", a, err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "hello.c"), []byte("#include <linux/module.h>\nstatic int __init hello_init(void) { return 0; }\nmodule_init(hello_init);\nMODULE_LICENSE(\"GPL\");\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "Kbuild"), []byte("obj-m := hello.o\n"), 0o644)
	ko, err := kbuild.BuildModule(ctx, p.HeadersDir, dir, "hello", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(ko)
	if err != nil || !strings.Contains(string(b), "vermagic="+release+" ") {
		t.Errorf("%s: no vermagic=%s (%v)", ko, release, err)
	}
	rm, err := kernel.Remove(ctx, cache, release, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kernel.Open(ctx, cache, release); !errors.Is(err, kernel.ErrUnknown) {
		t.Errorf("after rm %v: open: %v", rm.Paths, err)
	}
	if _, err := os.Lstat(filepath.Join(cache, "debs", debs[0])); err != nil {
		t.Errorf("rm without purge removed the debs: %v", err)
	}
}

// The kernels `make kernels` fetched open from the cache.
func TestTestKernels(t *testing.T) {
	for _, p := range testutils.Profiles(t, testutils.TestKernels()...) {
		if p.Origin != kernel.OriginCache {
			t.Errorf("%s comes from the %s", p.Release, p.Origin)
		}
		if _, err := os.Stat(p.SourceDeb); err != nil {
			t.Errorf("%s: %v", p.Release, err)
		}
	}
}

// Remove refuses the system's kernels and ones it does not know.
func TestRemoveRefuses(t *testing.T) {
	ctx := context.Background()
	if _, err := os.Stat("/boot/vmlinuz-" + kernel.Default); err == nil {
		if _, err := kernel.Remove(ctx, t.TempDir(), kernel.Default, true); !errors.Is(err, kernel.ErrSystem) {
			t.Errorf("system kernel: %v", err)
		}
	}
	if _, err := kernel.Remove(ctx, t.TempDir(), "6.1.0-1-amd64", false); !errors.Is(err, kernel.ErrUnknown) {
		t.Errorf("unknown kernel: %v", err)
	}
}
