package kbuild

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
)

// batchRelease is the kernel whose tree the batch test compiles in: the
// one `stitch corpus --cumulative` was measured on.
const batchRelease = "6.1.0-53-amd64"

// TestCompilePairs compiles two real objects (vmlinux and a module)
// before and after in one batch, and checks the tree is restored, also
// when the batch fails.
func TestCompilePairs(t *testing.T) {
	p, err := kernel.Open(context.Background(), kernel.CacheDir(), batchRelease)
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("no kernel %s: %v", batchRelease, err)
		}
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	tree, err := PrepareTree(ctx, OptionsFor(p))
	if err != nil {
		if os.Getenv("CI") == "" && (errors.Is(err, ErrNoSource) || errors.Is(err, ErrCompiler)) {
			t.Skipf("no kernel tree: %v", err)
		}
		t.Fatal(err)
	}
	edit := map[string][2]string{
		"net/ipv4/ipmr_base.c": {"mrt = kzalloc(sizeof(*mrt), GFP_KERNEL);", "mrt = kzalloc(sizeof(*mrt), GFP_KERNEL_ACCOUNT);"},
		"net/sched/em_text.c":  {"if (len < sizeof(*conf) || len < (sizeof(*conf) + conf->pattern_len))", "if (len < sizeof(*conf) || len <= (sizeof(*conf) + conf->pattern_len))"},
	}
	var jobs []PairJob
	orig := map[string][]byte{}
	for src, e := range edit {
		b, err := os.ReadFile(filepath.Join(tree.Dir, src))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte(e[0])) {
			t.Fatalf("%s has no %q", src, e[0])
		}
		orig[src] = b
		jobs = append(jobs, PairJob{Object: src[:len(src)-2] + ".o", Src: src, Patched: bytes.Replace(b, []byte(e[0]), []byte(e[1]), 1)})
	}
	if err := tree.CompilePairs(ctx, jobs, "", t.TempDir()); err != nil {
		t.Fatal(err)
	}
	for _, j := range jobs {
		a, _ := os.ReadFile(j.Pre)
		b, _ := os.ReadFile(j.Post)
		if len(a) == 0 || bytes.Equal(a, b) {
			t.Errorf("%s: pre and post objects are empty or identical (%d, %d bytes)", j.Object, len(a), len(b))
		}
	}
	restored := func() {
		t.Helper()
		for src, b := range orig {
			if now, err := os.ReadFile(filepath.Join(tree.Dir, src)); err != nil || !bytes.Equal(now, b) {
				t.Fatalf("%s not restored: %v", src, err)
			}
		}
		if _, err := os.Stat(filepath.Join(tree.Dir, swapJournal)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("journal left behind: %v", err)
		}
	}
	restored()
	jobs[1].Patched = []byte("#error broken\n")
	if err := tree.CompilePairs(ctx, jobs, "", t.TempDir()); !errors.Is(err, ErrBuild) {
		t.Errorf("broken source: err = %v, want ErrBuild", err)
	}
	restored()
	jobs[1].Src = jobs[0].Src
	if err := tree.CompilePairs(ctx, jobs, "", t.TempDir()); err == nil {
		t.Error("a source swapped twice accepted")
	}
}

// TestRestoreSeveralSwapped: a journal of several files (CompilePairs
// interrupted) restores each.
func TestRestoreSeveralSwapped(t *testing.T) {
	dir := t.TempDir()
	tree := &Tree{Dir: dir}
	for _, f := range []string{"a.c", "b/c.c"} {
		p := filepath.Join(dir, f)
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte("patched"), 0o644)
		os.WriteFile(p+".stitch-orig", []byte("orig "+f), 0o644)
	}
	os.WriteFile(filepath.Join(dir, swapJournal), []byte("a.c\nb/c.c"), 0o644)
	if err := tree.restoreSwapped(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"a.c", "b/c.c"} {
		if b, _ := os.ReadFile(filepath.Join(dir, f)); string(b) != "orig "+f {
			t.Errorf("%s: %q", f, b)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, swapJournal)); !errors.Is(err, os.ErrNotExist) {
		t.Error("journal left")
	}
}
