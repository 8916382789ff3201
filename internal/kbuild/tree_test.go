package kbuild

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
)

// testProfile opens the default kernel's profile, or skips on a
// developer machine without it (fails in CI).
func testProfile(t *testing.T) *kernel.Profile {
	t.Helper()
	p, err := kernel.Open(context.Background(), kernel.CacheDir(), kernel.Default)
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("no kernel %s (run scripts/install-deps.sh): %v", kernel.Default, err)
		}
		t.Fatal(err)
	}
	return p
}

// testTree prepares the real kernel tree once per test binary run (the
// stamp makes later runs cheap). Without the source package or the
// compiler it skips on a developer machine and fails in CI.
func testTree(t *testing.T) *Tree {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tree, err := PrepareTree(ctx, OptionsFor(testProfile(t)))
	if err != nil {
		if os.Getenv("CI") == "" && (errors.Is(err, ErrNoSource) || errors.Is(err, ErrCompiler)) {
			t.Skipf("no kernel tree (run scripts/install-deps.sh): %v", err)
		}
		t.Fatal(err)
	}
	return tree
}

func TestCompilerMismatch(t *testing.T) {
	ctx := context.Background()
	for _, cfg := range []string{
		"CONFIG_CC_VERSION_TEXT=\"gcc (Imaginary 1.0) 1.0\"\n",
		"CONFIG_CC_VERSION_TEXT=\"no-such-cc-1 (X) 1\"\n",
		"CONFIG_X=y\n",
	} {
		if cc, err := matchCompiler(ctx, []byte(cfg)); !errors.Is(err, ErrCompiler) {
			t.Errorf("%q: matchCompiler = %q, %v; want ErrCompiler", cfg, cc, err)
		}
	}
}

// Without a source package or a config there is nothing to prepare.
func TestNoSource(t *testing.T) {
	for _, o := range []TreeOptions{
		{Release: "6.1.0-54-amd64", Config: "/boot/config-6.1.0-54-amd64"},
		{Release: "6.1.0-54-amd64", Source: kernel.Package{Name: "linux-source-6.1", Version: "6.1.190-1"}},
		{Source: kernel.Package{Name: "linux-source-6.1", Version: "6.1.190-1"}, Config: "/boot/config-6.1.0-54-amd64"},
	} {
		o.Cache = t.TempDir()
		if _, err := PrepareTree(context.Background(), o); !errors.Is(err, ErrNoSource) {
			t.Errorf("%+v: err = %v, want ErrNoSource", o, err)
		}
	}
}

func TestMissingDeb(t *testing.T) {
	o := OptionsFor(testProfile(t))
	o.Cache, o.Deb = t.TempDir(), ""
	_, err := PrepareTree(context.Background(), o)
	if !errors.Is(err, ErrNoSource) && !errors.Is(err, ErrCompiler) {
		t.Fatalf("err = %v, want ErrNoSource", err)
	}
}

// TestCompilePair compiles a real object before and after a real fix and
// checks that the tree is restored.
func TestCompilePair(t *testing.T) {
	tree := testTree(t)
	ctx := context.Background()
	const src = "net/ipv4/ipmr_base.c"
	patch := []byte(`--- a/net/ipv4/ipmr_base.c
+++ b/net/ipv4/ipmr_base.c
@@ -38,7 +38,7 @@
 	struct mr_table *mrt;
 	int err;
 
-	mrt = kzalloc(sizeof(*mrt), GFP_KERNEL);
+	mrt = kzalloc(sizeof(*mrt), GFP_KERNEL_ACCOUNT);
 	if (!mrt)
 		return ERR_PTR(-ENOMEM);
 	mrt->id = id;
`)
	orig, err := os.ReadFile(filepath.Join(tree.Dir, src))
	if err != nil {
		t.Fatal(err)
	}
	files, port, err := tree.PatchedFiles(ctx, patch)
	if err != nil {
		t.Fatal(err)
	}
	if port.Status != PortClean {
		t.Errorf("port %s, want clean", port.Summary())
	}
	if bytes.Equal(files[src], orig) || !bytes.Contains(files[src], []byte("GFP_KERNEL_ACCOUNT);")) {
		t.Fatalf("patched file not patched")
	}
	out := t.TempDir()
	pre, post, err := tree.CompilePair(ctx, "net/ipv4/ipmr_base.o", src, files[src], "", out)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(pre)
	b, _ := os.ReadFile(post)
	if len(a) == 0 || bytes.Equal(a, b) {
		t.Errorf("pre and post objects are empty or identical (%d, %d bytes)", len(a), len(b))
	}
	now, err := os.ReadFile(filepath.Join(tree.Dir, src))
	if err != nil || !bytes.Equal(now, orig) {
		t.Fatalf("tree not restored: %v", err)
	}
	if _, err := os.Stat(filepath.Join(tree.Dir, swapJournal)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("journal left behind: %v", err)
	}
	// A failing build restores the tree too.
	if _, _, err := tree.CompilePair(ctx, "net/ipv4/ipmr_base.o", src, []byte("#error broken\n"), "", out); !errors.Is(err, ErrBuild) {
		t.Errorf("broken source: err = %v, want ErrBuild", err)
	}
	now, _ = os.ReadFile(filepath.Join(tree.Dir, src))
	if !bytes.Equal(now, orig) {
		t.Fatal("tree not restored after a failed build")
	}
}

// PatchedFiles works on copies and says how the fix fitted.
func TestPatchedFiles(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "fs"), 0o755)
	orig := []byte("zero\none\ntwo\nthree\n")
	if err := os.WriteFile(filepath.Join(dir, "fs", "x.c"), orig, 0o644); err != nil {
		t.Fatal(err)
	}
	tree := &Tree{Release: "test", Dir: dir}
	patch := []byte("--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n")
	files, port, err := tree.PatchedFiles(context.Background(), patch)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(files["fs/x.c"]); got != "zero\none\nTWO\nthree\n" {
		t.Errorf("patched = %q", got)
	}
	if port.Status != PortOffset || port.Hunks[0].Offset != 1 || port.Hunks[0].Line != 2 {
		t.Errorf("port %+v, want an offset of 1 line", port)
	}
	if now, _ := os.ReadFile(filepath.Join(dir, "fs", "x.c")); !bytes.Equal(now, orig) {
		t.Error("the tree was modified")
	}
	_, port, err = tree.PatchedFiles(context.Background(), []byte("--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1 +1 @@\n-nope\n+yes\n"))
	var perr *PortError
	if !errors.Is(err, ErrDoesNotApply) || !errors.As(err, &perr) || port == nil || port.Status != PortFails {
		t.Errorf("a patch that does not apply: %v, port %+v", err, port)
	}
	// Already there: it reverse-applies.
	_, port, err = tree.PatchedFiles(context.Background(), []byte("--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,3 +1,3 @@\n zero\n-ONE\n+one\n two\n"))
	if !errors.Is(err, ErrContained) || port.Status != PortContained {
		t.Errorf("a contained patch: %v, port %+v", err, port)
	}
	t.Run("no patch", func(t *testing.T) {
		t.Setenv("PATH", t.TempDir())
		if _, _, err := tree.PatchedFiles(context.Background(), patch); !errors.Is(err, ErrNoPatchTool) {
			t.Errorf("without GNU patch: %v", err)
		}
	})
}

// A parallel make that races with itself (6.12 compiles an object of
// drivers/block/aoe/ twice at once, as "CC [M]" and "CC", because
// drivers/Makefile lists the directory as drivers/block's Makefile does)
// is run again with one job; other failures are not. make is a script
// here that fails as kbuild does when given -j2.
func TestMakeRetriesDescentRace(t *testing.T) {
	bin := t.TempDir()
	calls := filepath.Join(t.TempDir(), "calls")
	script := `#!/bin/sh
echo "$*" >> ` + calls + `
case "$*" in
*-j2*race*) echo "fixdep: error opening file: drivers/block/aoe/.aoenet.o.d: No such file or directory"; exit 2 ;;
*-j2*other*) echo "aoenet.c:1: error: expected ';'"; exit 2 ;;
*-j1*other*) exit 2 ;;
esac
`
	if err := os.WriteFile(filepath.Join(bin, "make"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	tree := &Tree{Dir: t.TempDir(), CC: "gcc", opts: TreeOptions{Jobs: 2, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Progress: io.Discard}}
	if _, err := tree.make(context.Background(), "race"); err != nil {
		t.Errorf("a race, then one job: %v", err)
	}
	if _, err := tree.make(context.Background(), "other"); !errors.Is(err, ErrBuild) {
		t.Errorf("a compile error: %v, want ErrBuild", err)
	}
	b, _ := os.ReadFile(calls)
	var jobs []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		for _, f := range strings.Fields(l) {
			if strings.HasPrefix(f, "-j") {
				jobs = append(jobs, f+" "+strings.Fields(l)[len(strings.Fields(l))-1])
			}
		}
	}
	if want := []string{"-j2 race", "-j1 race", "-j2 other"}; !slices.Equal(jobs, want) {
		t.Errorf("make ran %q, want %q", jobs, want)
	}
}
