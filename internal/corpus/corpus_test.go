package corpus

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/testutils"
)

func TestReadIndexRealCorpus(t *testing.T) {
	all, err := ReadIndex(testutils.Corpus(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 193 {
		t.Errorf("%d fixes, the corpus README says 193", len(all))
	}
	vmlinux := 0
	for _, e := range all {
		if e.Location == "vmlinux" {
			vmlinux++
		}
		if !strings.HasSuffix(e.File, ".c") || e.Lines <= 0 {
			t.Errorf("entry %+v", e)
		}
	}
	// "about 40 % in vmlinux"
	if share := float64(vmlinux) / float64(len(all)); share < 0.3 || share > 0.5 {
		t.Errorf("%.0f%% in vmlinux", 100*share)
	}
	sel, err := Select(all, "^fs_", 3)
	if err != nil || len(sel) != 3 || !strings.HasPrefix(sel[2].Name, "fs_") {
		t.Errorf("Select = %v, %v", sel, err)
	}
	if _, err := Select(all, "(", 0); err == nil {
		t.Error("a bad filter was accepted")
	}
}

func TestReadIndexBad(t *testing.T) {
	if _, err := ReadIndex(t.TempDir()); err == nil {
		t.Error("a directory without index.tsv was accepted")
	}
}

func TestSummarize(t *testing.T) {
	s := Summarize([]Result{{Outcome: Applied}, {Outcome: Refused}, {Outcome: Applied, Entry: Entry{Hooks: "hooks/x.c"}}, {Outcome: BuildFailed}, {Outcome: NoChange}, {Outcome: Refused, Entry: Entry{Hooks: "hooks/y.c"}}})
	if s.Total != 6 || s.Outcomes[Applied] != 2 || s.WithHooks != 1 || s.Share != 2.0/6 || s.ShareAutomatic != 1.0/6 || s.ShareNeeded != 0.4 {
		t.Errorf("Summarize = %+v", s)
	}
}

// How a fix fits another kernel's source decides its outcome before any
// build: the builder here stands for a kernel whose source already has
// one fix and lacks the context of another.
func TestBuildAllPortOutcomes(t *testing.T) {
	all, err := ReadIndex(testutils.Corpus(t))
	if err != nil {
		t.Fatal(err)
	}
	entries := all[:3]
	ports := map[string]*kbuild.Port{
		entries[0].Name: {Status: kbuild.PortContained},
		entries[1].Name: {Status: kbuild.PortFails, Reason: "hunk #1 FAILED at 373"},
	}
	b := func(_ context.Context, fix *build.Fix, _, _ string) (*build.Result, error) {
		if p := ports[strings.TrimSuffix(fix.Name, ".patch")]; p != nil {
			return nil, fmt.Errorf("build %s: %w", fix.Name, &kbuild.PortError{Release: "6.1.0-57-amd64", Port: p})
		}
		return nil, fmt.Errorf("%w: compiles to the same code", build.ErrNothing)
	}
	rs := BuildAll(context.Background(), entries, b, t.TempDir(), nil)
	want := []struct{ outcome, port string }{{Contained, "contained"}, {NotPorted, "fails"}, {NoChange, ""}}
	for i, r := range rs {
		if r.Outcome != want[i].outcome || r.Port != want[i].port {
			t.Errorf("%s: outcome %s, port %q; want %s, %q (%s)", r.Name, r.Outcome, r.Port, want[i].outcome, want[i].port, r.Reason)
		}
	}
	if !strings.Contains(rs[1].Reason, "373") {
		t.Errorf("not-ported reason %q does not name the hunk", rs[1].Reason)
	}
	s := Summarize(rs)
	if s.NotNeeded() != 2 || s.ShareNeeded != 0 {
		t.Errorf("summary %+v: want 2 not needed", s)
	}
}

// A fix with DIR/hooks/NAME.c is built with those hooks; the others
// without.
func TestReadIndexHooks(t *testing.T) {
	dir := t.TempDir()
	const patch = "--- a/kernel/b.c\n+++ b/kernel/b.c\n@@ -1 +1 @@\n-x\n+y\n"
	for name, body := range map[string]string{
		"index.tsv":     "# name\tfile\tlines\tlocation\na\tkernel/a.c\t1\tvmlinux\nb\tkernel/b.c\t2\tvmlinux\n",
		"fixes/a.patch": patch, "fixes/b.patch": patch, "hooks/b.c": "/* hooks */",
		"hooks/c.c": "/* a fix not in the index: ignored */",
	} {
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	es, err := ReadIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 || es[0].Hooks != "" || es[1].Hooks != filepath.Join(dir, "hooks", "b.c") {
		t.Fatalf("entries %+v: want hooks for b only", es)
	}
	got := map[string]string{}
	b := func(_ context.Context, fix *build.Fix, hooks, _ string) (*build.Result, error) {
		got[fix.Name] = hooks
		return nil, build.ErrNothing
	}
	if _, err := buildOne(context.Background(), es[1], b, t.TempDir()); !errors.Is(err, build.ErrNothing) {
		t.Fatalf("buildOne: %v", err)
	}
	if got["b.patch"] != es[1].Hooks {
		t.Errorf("builder got hooks %q for b, want %q", got["b.patch"], es[1].Hooks)
	}
}
