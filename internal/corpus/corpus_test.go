package corpus

import (
	"context"
	"fmt"
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
	s := Summarize([]Result{{Outcome: Applied}, {Outcome: Refused}, {Outcome: Applied}, {Outcome: BuildFailed}, {Outcome: NoChange}})
	if s.Total != 5 || s.Outcomes[Applied] != 2 || s.Share != 0.4 || s.ShareNeeded != 0.5 {
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
	b := func(_ context.Context, fix *build.Fix, _ string) (*build.Result, error) {
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
