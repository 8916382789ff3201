package build

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/testutils"
)

func TestParseFixFormatPatch(t *testing.T) {
	diff := `From 1234 Mon Sep 17 00:00:00 2001
From: A Developer <a@example.org>
Subject: [PATCH] proc: fix a leak in cmdline (CVE-2099-12345)

Fixes CVE-2099-12345 and CVE-2099-54321.

diff --git a/fs/proc/cmdline.c b/fs/proc/cmdline.c
--- a/fs/proc/cmdline.c
+++ b/fs/proc/cmdline.c
@@ -1 +1 @@
-a
+b
--- a/include/linux/x.h	2024-01-01
+++ b/include/linux/x.h	2024-01-01
@@ -1 +1 @@
-a
+b
`
	f, err := ParseFix("x.patch", []byte(diff))
	if err != nil {
		t.Fatal(err)
	}
	if f.Description != "proc: fix a leak in cmdline (CVE-2099-12345)" {
		t.Errorf("description = %q", f.Description)
	}
	if want := []string{"CVE-2099-12345", "CVE-2099-54321"}; !reflect.DeepEqual(f.CVEs, want) {
		t.Errorf("CVEs = %v, want %v", f.CVEs, want)
	}
	if want := []string{"fs/proc/cmdline.c", "include/linux/x.h"}; !reflect.DeepEqual(f.Files, want) {
		t.Errorf("files = %v, want %v", f.Files, want)
	}
	if len(f.Hash) != 64 {
		t.Errorf("hash = %q", f.Hash)
	}
}

func TestParseFixCorpus(t *testing.T) {
	dir := filepath.Join(testutils.Corpus(t), "fixes")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		f, err := ParseFix(e.Name(), b)
		if err != nil {
			t.Errorf("%s: %v", e.Name(), err)
			continue
		}
		// Corpus names are the file's path with / turned into _.
		want := strings.TrimSuffix(e.Name(), ".patch")
		if len(f.Files) != 1 || strings.NewReplacer("/", "_", ".c", "").Replace(f.Files[0]) != want {
			t.Errorf("%s: files %v", e.Name(), f.Files)
		}
	}
}

func TestParseFixBad(t *testing.T) {
	for name, diff := range map[string]string{
		"empty":        "",
		"no diff":      "just some text\n",
		"escapes tree": "--- a/../etc/passwd\n+++ b/../etc/passwd\n",
		"no prefix":    "--- x.c\n+++ x.c\n",
	} {
		if _, err := ParseFix(name, []byte(diff)); !errors.Is(err, ErrBadFix) {
			t.Errorf("%s: err = %v, want ErrBadFix", name, err)
		}
	}
}

func FuzzParseFix(f *testing.F) {
	f.Add([]byte("--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n"))
	f.Add([]byte("[ Upstream commit 0123456789AB ]\n--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fix, err := ParseFix("fuzz", data)
		if err == nil && len(fix.Files) == 0 {
			t.Fatal("accepted a fix that changes no file")
		}
		if err == nil && fix.Upstream != "" && !contract.ValidCommit(fix.Upstream) {
			t.Fatalf("upstream %q, which the manifest refuses", fix.Upstream)
		}
	})
}

// What the manifest will carry is checked by the fleet's rules before
// anything is compiled: a bad --cve or --name fails at once, not at
// publish time (issue 12, finding 10). The source is never touched.
func TestBuildRefusesBadManifestInputFirst(t *testing.T) {
	f, err := ParseFix("x.patch", []byte("--- a/fs/proc/cmdline.c\n+++ b/fs/proc/cmdline.c\n@@ -1 +1 @@\n-a\n+b\n"))
	if err != nil {
		t.Fatal(err)
	}
	for name, o := range map[string]Options{
		"cve":  {CVEs: []string{"CVE-2024-1"}},
		"name": {Name: "has a space"},
	} {
		o.Work = t.TempDir()
		if _, err := Build(context.Background(), nil, nil, []*Fix{f}, o); !errors.Is(err, contract.ErrBadManifest) {
			t.Errorf("%s: %v, want ErrBadManifest before compiling", name, err)
		}
	}
}
