package corpus

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeCorpus(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// A fix with DIR/livepatch/NAME.patch is built from that form, and counts
// as applied with the fix author's help; one with NAME.refused is refused
// with the author's reason even if it built.
func TestReadIndexLivepatchForm(t *testing.T) {
	const patch = "--- a/kernel/b.c\n+++ b/kernel/b.c\n@@ -1 +1 @@\n-x\n+y\n"
	dir := writeCorpus(t, map[string]string{
		"index.tsv":     "a\tkernel/a.c\t1\tvmlinux\nb\tkernel/b.c\t2\tvmlinux\nc\tkernel/c.c\t2\tvmlinux\n",
		"fixes/a.patch": patch, "fixes/b.patch": patch, "fixes/c.patch": patch,
		"livepatch/b.patch":   patch,
		"livepatch/c.refused": "The work item may be queued\nin live objects.\n",
	})
	es, err := ReadIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	if es[0].Livepatch != "" || es[0].Patch != filepath.Join(dir, "fixes", "a.patch") {
		t.Errorf("a: %+v: want the upstream diff", es[0])
	}
	if want := filepath.Join(dir, "livepatch", "b.patch"); es[1].Livepatch != want || es[1].Patch != want {
		t.Errorf("b: %+v: want the livepatch form", es[1])
	}
	if es[2].AuthorRefusal != "The work item may be queued in live objects." {
		t.Errorf("c: refusal %q", es[2].AuthorRefusal)
	}

	built := Result{Entry: es[2], Outcome: NotRun, Module: "c.ko"}
	authorRefuses(&built)
	if built.Outcome != Refused || built.Module != "" || !strings.HasPrefix(built.Reason, "fix author: The work item") {
		t.Errorf("built but refused by the author: %+v", built)
	}
	refused := Result{Entry: es[2], Outcome: Refused, Reason: "struct x changed layout"}
	authorRefuses(&refused)
	if refused.Reason != "struct x changed layout; fix author: The work item may be queued in live objects." {
		t.Errorf("refused: reason %q", refused.Reason)
	}

	s := Summarize([]Result{{Entry: es[0], Outcome: Applied}, {Entry: es[1], Outcome: Applied}, refused})
	if s.WithHooks != 1 || s.ShareAutomatic != 1.0/3 {
		t.Errorf("summary %+v: want b counted as applied with the author's help", s)
	}
}

// A fix may not have both a livepatch form and a refusal.
func TestReadIndexLivepatchBoth(t *testing.T) {
	const patch = "--- a/kernel/b.c\n+++ b/kernel/b.c\n@@ -1 +1 @@\n-x\n+y\n"
	dir := writeCorpus(t, map[string]string{
		"index.tsv": "b\tkernel/b.c\t2\tvmlinux\n", "fixes/b.patch": patch,
		"livepatch/b.patch": patch, "livepatch/b.refused": "no",
	})
	if _, err := ReadIndex(dir); err == nil || !strings.Contains(err.Error(), "keep one") {
		t.Fatalf("ReadIndex: %v, want an error naming both", err)
	}
}
