package kbuild

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
)

// testProfile opens the default kernel's profile, or skips on a
// developer machine without it (fails in CI).
func testProfile(t *testing.T) *kernel.Profile {
	t.Helper()
	p, err := kernel.Open(context.Background(), CacheDir(), kernel.Default)
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
		{Release: "6.1.0-54-amd64", Source: Source{Package: "linux-source-6.1", Version: "6.1.190-1"}},
		{Source: Source{Package: "linux-source-6.1", Version: "6.1.190-1"}, Config: "/boot/config-6.1.0-54-amd64"},
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

func TestTouched(t *testing.T) {
	p := []byte("--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1 +1 @@\n-a\n+b\n--- a/include/y.h\t2024\n+++ b/include/y.h\t2024\n")
	if got := touched(p); !slices.Equal(got, []string{"fs/x.c", "include/y.h"}) {
		t.Errorf("touched = %q", got)
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
	files, err := tree.PatchedFiles(ctx, patch)
	if err != nil {
		t.Fatal(err)
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

// PatchedFiles works on copies, with patch(1) or, without it, git apply.
func TestPatchedFiles(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "fs"), 0o755)
	orig := []byte("one\ntwo\nthree\n")
	if err := os.WriteFile(filepath.Join(dir, "fs", "x.c"), orig, 0o644); err != nil {
		t.Fatal(err)
	}
	tree := &Tree{Release: "test", Dir: dir}
	patch := []byte("--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n")
	check := func(t *testing.T) {
		files, err := tree.PatchedFiles(context.Background(), patch)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(files["fs/x.c"]); got != "one\nTWO\nthree\n" {
			t.Errorf("patched = %q", got)
		}
		if now, _ := os.ReadFile(filepath.Join(dir, "fs", "x.c")); !bytes.Equal(now, orig) {
			t.Error("the tree was modified")
		}
		if _, err := tree.PatchedFiles(context.Background(), []byte("--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1 +1 @@\n-nope\n+yes\n")); err == nil {
			t.Error("a patch that does not apply was accepted")
		}
	}
	t.Run("patch", check)
	t.Run("git", func(t *testing.T) {
		git, err := exec.LookPath("git")
		if err != nil {
			t.Skip("no git")
		}
		bin := t.TempDir()
		if err := os.Symlink(git, filepath.Join(bin, "git")); err != nil {
			t.Fatal(err)
		}
		t.Setenv("PATH", bin)
		check(t)
	})
}
