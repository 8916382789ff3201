package corpus

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
)

func fix(t *testing.T, name string, files ...string) *build.Fix {
	t.Helper()
	var diff strings.Builder
	for _, f := range files {
		diff.WriteString("--- a/" + f + "\n+++ b/" + f + "\n@@ -1 +1 @@\n-x\n+y\n")
	}
	fx, err := build.ParseFix(name+".patch", []byte(diff.String()))
	if err != nil {
		t.Fatal(err)
	}
	return fx
}

// fakeCompiler makes one pair per C file the fixes change, recording
// each call; conflict fails a joint compile of fixes sharing a file.
type fakeCompiler struct {
	calls    []string
	conflict bool
}

func (c *fakeCompiler) compile(_ context.Context, fixes []*build.Fix) ([]build.Pair, error) {
	var names []string
	seen := map[string]bool{}
	var out []build.Pair
	for _, f := range fixes {
		names = append(names, entryName(f))
	}
	for _, f := range fixes {
		for _, file := range f.Files {
			if seen[file] {
				if c.conflict {
					return nil, errors.New("hunk #1 FAILED at 1 in " + file)
				}
				continue
			}
			seen[file] = true
			out = append(out, build.Pair{Source: file, Pre: []byte("pre " + file), Post: []byte("post " + strings.Join(names, "+")),
				Facts: &kbuild.ObjectFacts{Object: strings.TrimSuffix(file, ".c") + ".o", Module: true, ModNames: []string{"m"}}})
		}
	}
	c.calls = append(c.calls, strings.Join(names, "+"))
	return out, nil
}

func TestPairCacheCompilesOnce(t *testing.T) {
	fc := &fakeCompiler{}
	dir := t.TempDir()
	c := &PairCache{Dir: dir, Compile: fc.compile}
	a := fix(t, "a", "x/a.c")
	for range 2 {
		ps, err := c.Pairs(context.Background(), []*build.Fix{a})
		if err != nil {
			t.Fatal(err)
		}
		if len(ps) != 1 || ps[0].Source != "x/a.c" || string(ps[0].Pre) != "pre x/a.c" || ps[0].Facts == nil || ps[0].Facts.ModNames[0] != "m" {
			t.Fatalf("pairs %+v", ps)
		}
	}
	// A new cache on the same directory (a later run) compiles nothing.
	c2 := &PairCache{Dir: dir, Compile: fc.compile}
	if _, err := c2.Pairs(context.Background(), []*build.Fix{a}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fc.calls, []string{"a"}) {
		t.Fatalf("compiled %v", fc.calls)
	}
}

func TestLevelSourceCompilesFixesOfOneFileTogether(t *testing.T) {
	fc := &fakeCompiler{}
	src := &LevelSource{Cache: &PairCache{Dir: t.TempDir(), Compile: fc.compile}}
	a, b, c := fix(t, "a", "x/a.c"), fix(t, "b", "x/b.c", "x/a.c"), fix(t, "c", "x/c.c")
	ps, err := src.CompilePair(context.Background(), []*build.Fix{a, b, c})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range ps {
		got = append(got, p.Source+"="+string(p.Post))
	}
	// x/a.c carries both fixes; every object once.
	want := []string{"x/a.c=post a+b", "x/b.c=post a+b", "x/c.c=post c"}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("pairs %v, want %v", got, want)
	}
	if !slices.Contains(fc.calls, "a+b") {
		t.Fatalf("calls %v", fc.calls)
	}
}

func TestLevelSourceBlamesTheLaterFixOfAConflict(t *testing.T) {
	fc := &fakeCompiler{conflict: true}
	src := &LevelSource{Cache: &PairCache{Dir: t.TempDir(), Compile: fc.compile}}
	a, b := fix(t, "a", "x/a.c"), fix(t, "b", "x/a.c")
	_, err := src.CompilePair(context.Background(), []*build.Fix{a, b})
	var fe *FixError
	if !errors.As(err, &fe) || fe.Fix != "b" || !strings.Contains(err.Error(), "does not combine with a") {
		t.Fatalf("err %v", err)
	}
	if got := Blame(err, CandidatesOf([]*build.Fix{a, b})); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("blamed %v", got)
	}
}
