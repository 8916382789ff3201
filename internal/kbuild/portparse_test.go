package kbuild

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

// Messages as GNU patch 2.7 prints them (LC_ALL=C), including the
// shapes seen on the 6.1 kernels.
func TestParsePatchOutput(t *testing.T) {
	out := `checking file block/blk-mq.c
Hunk #2 succeeded at 1220 (offset 4 lines).
Hunk #3 succeeded at 7 with fuzz 1.
Hunk #4 succeeded at 10 with fuzz 2 (offset -1 line).
Hunk #5 FAILED at 2953.
Hunk #6 FAILED at 3000 (different line endings).
2 out of 6 hunks FAILED
patching file 'net/a b.c'
can't find file to patch at input line 3
Perhaps you used the wrong -p or --strip option?
The text leading up to this was:
--------------------------
|--- a/fs/gone.c
|+++ b/fs/gone.c
--------------------------
No file to patch.  Skipping patch.
1 out of 1 hunk ignored
checking file fs/x.c
Hunk #1 ignored at 12.
checking file fs/y.c (renamed from fs/old y.c)
`
	got := parsePatchOutput(out)
	want := []patchedFile{
		{Name: "block/blk-mq.c", Hunks: map[int]hunkOutcome{
			2: {Line: 1220, Offset: 4},
			3: {Line: 7, Fuzz: 1},
			4: {Line: 10, Fuzz: 2, Offset: -1},
			5: {Line: 2953, Failed: true},
			6: {Line: 3000, Failed: true},
		}},
		{Name: "net/a b.c", Hunks: map[int]hunkOutcome{}},
		{Name: "fs/gone.c", Missing: true, Hunks: map[int]hunkOutcome{}},
		{Name: "fs/x.c", Hunks: map[int]hunkOutcome{1: {Line: 12, Failed: true}}},
		{Name: "fs/y.c", Hunks: map[int]hunkOutcome{}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parsed\n%+v\nwant\n%+v", got, want)
	}
	if got := parsePatchOutput("Hunk #1 FAILED at 3.\npatch: **** Only garbage was found in the patch input.\n"); len(got) != 0 {
		t.Errorf("hunk lines before any file: %+v", got)
	}
}

// What the port needs of the shared parser (internal/udiff tests the
// parser itself): -p1 paths, /dev/null as "", hunks by their counts, and
// a failing hunk's text.
func TestParseDiff(t *testing.T) {
	diff := "From 0123 Mon Sep 17 00:00:00 2001\nSubject: x\n\n--- a/x\n" + // a mail header's "--- a/x" without +++ is text
		"diff -Nupr src.orig/fs/x.c src/fs/x.c\n--- src.orig/fs/x.c\t2024-01-01\n+++ src/fs/x.c\t2024-01-01\n" +
		"@@ -1,4 +1,3 @@ func\n one\n--- removed line starting with dashes\n\n three\n" +
		"@@ -10 +9,2 @@\n ten\n+eleven\n\\ No newline at end of file\n" +
		"--- /dev/null\n+++ b/fs/new.c\n@@ -0,0 +1 @@\n+new\n" +
		"--- a/fs/old.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-old\n-- \n2.39.2\n"
	files, err := parseDiff([]byte(diff))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 {
		t.Fatalf("%d files, want 3: %+v", len(files), files)
	}
	x := files[0]
	if x.Old != "fs/x.c" || x.New != "fs/x.c" || len(x.Hunks) != 2 {
		t.Fatalf("fs/x.c: %+v", x)
	}
	if h := x.Hunks[1]; h.OldStart != 10 || h.NewStart != 9 {
		t.Errorf("hunk 2: %+v", h)
	}
	if txt := hunkText(x, 0); !strings.Contains(txt, "--- removed line") || strings.Contains(txt, "@@ -10") {
		t.Errorf("hunk 1 text %q", txt)
	}
	if files[1].Old != "" || files[1].New != "fs/new.c" || files[2].Old != "fs/old.c" || files[2].New != "" {
		t.Errorf("created/deleted: %+v %+v", files[1], files[2])
	}
	for name, bad := range map[string]string{
		"empty":     "",
		"truncated": "--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,3 @@\n a\n-b\n",
		"escapes":   "--- a/../x.c\n+++ b/../x.c\n@@ -1 +1 @@\n-a\n+b\n",
		"absolute":  "--- /x.c\n+++ /x.c\n@@ -1 +1 @@\n-a\n+b\n",
	} {
		if _, err := parseDiff([]byte(bad)); !errors.Is(err, ErrBadDiff) {
			t.Errorf("%s: err = %v, want ErrBadDiff", name, err)
		}
	}
}

// The rule of Port, on reports as patch gives them.
func TestDecide(t *testing.T) {
	secs, err := parseDiff([]byte("--- a/f.c\n+++ b/f.c\n@@ -10,3 +10,3 @@\n a\n-b\n+B\n c\n@@ -50,3 +50,3 @@\n d\n-e\n+E\n f\n"))
	if err != nil {
		t.Fatal(err)
	}
	file := func(h map[int]hunkOutcome) []patchedFile {
		return []patchedFile{{Name: "f.c", Hunks: h}}
	}
	none := file(map[int]hunkOutcome{})
	failed := file(map[int]hunkOutcome{1: {Line: 10, Failed: true}, 2: {Line: 50, Failed: true}})
	for _, tt := range []struct {
		name     string
		fwd, rev []patchedFile
		status   PortStatus
		results  []HunkResult
		reason   string // a substring of the reason
	}{
		{"clean", none, failed, PortClean, []HunkResult{HunkApplies, HunkApplies}, ""},
		{"offset", file(map[int]hunkOutcome{2: {Line: 54, Offset: 4}}), failed, PortOffset, []HunkResult{HunkApplies, HunkApplies}, ""},
		{"fuzz", file(map[int]hunkOutcome{1: {Line: 12, Offset: 2}, 2: {Line: 50, Fuzz: 1}}), failed, PortFuzz, []HunkResult{HunkApplies, HunkApplies}, ""},
		{"contained", failed, none, PortContained, []HunkResult{HunkContained, HunkContained}, ""},
		{"contained, moved", failed, file(map[int]hunkOutcome{1: {Line: 30, Offset: 20}}), PortContained, []HunkResult{HunkContained, HunkContained}, ""},
		{"forward fuzz, reverse exact: contained", file(map[int]hunkOutcome{1: {Line: 10, Fuzz: 2}}), none, PortContained, []HunkResult{HunkContained, HunkContained}, ""},
		{"forward exact, reverse moved: applies", none, file(map[int]hunkOutcome{2: {Line: 90, Offset: 40}}), PortClean, []HunkResult{HunkApplies, HunkApplies}, ""},
		{"both equally", file(map[int]hunkOutcome{1: {Line: 20, Offset: 10}}), file(map[int]hunkOutcome{2: {Line: 60, Offset: 10}}), PortFails, []HunkResult{HunkApplies, HunkApplies}, "both forward and in reverse"},
		{"reverse only with fuzz", failed, file(map[int]hunkOutcome{1: {Line: 10, Fuzz: 1}}), PortFails, []HunkResult{HunkContained, HunkContained}, "only with fuzz"},
		{"partly contained", file(map[int]hunkOutcome{2: {Line: 50, Failed: true}}), file(map[int]hunkOutcome{1: {Line: 10, Failed: true}}), PortFails, []HunkResult{HunkApplies, HunkContained}, "partly contained: f.c #2 already in this kernel, f.c #1 not"},
		{"fails", file(map[int]hunkOutcome{2: {Line: 50, Failed: true}}), failed, PortFails, []HunkResult{HunkApplies, HunkFails}, "f.c #2 (@@ -50,3 +50,3 @@) FAILED at 50"},
		{"missing file", []patchedFile{{Name: "f.c", Missing: true}}, []patchedFile{{Name: "f.c", Missing: true}}, PortFails, []HunkResult{HunkFails, HunkFails}, "no such file"},
		{"not reached", nil, nil, PortFails, []HunkResult{HunkFails, HunkFails}, "FAILED"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := decide(secs, tt.fwd, tt.rev)
			if p.Status != tt.status {
				t.Fatalf("status %s, want %s (%s)", p.Status, tt.status, p.Reason)
			}
			var res []HunkResult
			for _, h := range p.Hunks {
				res = append(res, h.Result)
				if h.Result == HunkFails && !strings.Contains(h.Text, "@@ ") {
					t.Errorf("failing hunk %s without its text", h.Name())
				}
			}
			if !reflect.DeepEqual(res, tt.results) {
				t.Errorf("hunk results %v, want %v", res, tt.results)
			}
			if !strings.Contains(p.Reason, tt.reason) {
				t.Errorf("reason %q, want it to say %q", p.Reason, tt.reason)
			}
			if (p.Status == PortFails) != (p.Reason != "") {
				t.Errorf("status %s with reason %q", p.Status, p.Reason)
			}
		})
	}
	p := decide(secs, file(map[int]hunkOutcome{2: {Line: 54, Offset: 4, Fuzz: 1}}), failed)
	if s := p.Summary(); s != "fuzz (f.c #2 +4 fuzz 1)" {
		t.Errorf("summary %q", s)
	}
	if h := p.Hunks[1]; h.Line != 54 || h.Offset != 4 || h.Fuzz != 1 || h.File != "f.c" || h.Number != 2 {
		t.Errorf("hunk facts %+v", h)
	}
}

func FuzzParsePatchOutput(f *testing.F) {
	f.Add("checking file a.c\nHunk #2 succeeded at 1220 with fuzz 1 (offset 4 lines).\nHunk #1 FAILED at 3.\n")
	f.Add("can't find file to patch at input line 3\n|--- a/x\n|+++ b/x\nNo file to patch.  Skipping patch.\n")
	f.Add("Hunk #99999999999999999999 succeeded at 99999999999999999999 (offset -99999999999999999999 lines).")
	f.Fuzz(func(t *testing.T, out string) {
		for _, pf := range parsePatchOutput(out) {
			for n, h := range pf.Hunks {
				if n < 0 || h.Fuzz < 0 || h.Line < 0 {
					t.Fatalf("negative figures from %q: %d %+v", out, n, h)
				}
			}
		}
	})
}
