package corpus

import (
	"strings"
	"testing"

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
