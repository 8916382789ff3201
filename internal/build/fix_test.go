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
	"github.com/stitchpatch/stitch/internal/udiff"
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

// kpatch's integration patches are `diff -Nupr` output (src.orig/ and
// src/, timestamps, a "diff -Nupr" line per file) but module.patch, a git
// diff: each names its files as patch -p1 finds them, every hunk read.
func TestParseFixKpatch(t *testing.T) {
	want := map[string][]string{
		"data-new":                  {"fs/proc/meminfo.c"},
		"gcc-static-local-var-6":    {"net/ipv6/netfilter.c"},
		"macro-callbacks":           {"drivers/input/joydev.c", "drivers/input/misc/pcspkr.c", "fs/aio.c"},
		"module":                    {"fs/xfs/xfs_stats.c", "net/netlink/af_netlink.c"},
		"new-function":              {"drivers/tty/n_tty.c"},
		"new-globals":               {"fs/proc/cmdline.c", "fs/proc/meminfo.c"},
		"shadow-newpid":             {"fs/proc/array.c", "kernel/exit.c", "kernel/fork.c"},
		"special-static":            {"kernel/fork.c"},
		"symvers-disagreement-FAIL": {"drivers/base/core.c", "drivers/usb/core/usb.c"},
		"syscall":                   {"kernel/sys.c"},
		"warn-detect-FAIL":          {"arch/x86/kvm/x86.c"},
	}
	paths, err := filepath.Glob(filepath.Join("testdata", "kpatch-linux-6.2.0", "*.patch"))
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, path := range paths {
		name := strings.TrimSuffix(filepath.Base(path), ".patch")
		files, ok := want[name]
		if !ok {
			continue // an adjusted copy (NAME.6.1.patch)
		}
		seen++
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := ParseFix(filepath.Base(path), b)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !reflect.DeepEqual(f.Files, files) {
			t.Errorf("%s: files %v, want %v", name, f.Files, files)
		}
		if err := f.changesCode(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		d, err := udiff.Parse(b)
		if err != nil {
			t.Fatal(err)
		}
		hunks := 0
		for _, file := range d.Files {
			hunks += len(file.Hunks)
		}
		if n := strings.Count("\n"+string(b), "\n@@ -"); hunks != n {
			t.Errorf("%s: %d hunks read, the text has %d", name, hunks, n)
		}
	}
	if seen != len(want) {
		t.Errorf("%d of kpatch's %d patches found", seen, len(want))
	}
}

// A fix that deletes, renames or mode-changes a file, or changes a
// binary one, is read but refused before anything is compiled.
func TestBuildRefusesNonTextChanges(t *testing.T) {
	for name, diff := range map[string]string{
		"deletes": "--- a/fs/x.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n",
		"renames": "diff --git a/fs/x.c b/fs/y.c\nsimilarity index 100%\nrename from fs/x.c\nrename to fs/y.c\n",
		"mode":    "diff --git a/fs/x.c b/fs/x.c\nold mode 100644\nnew mode 100755\n",
		"binary":  "diff --git a/fw.bin b/fw.bin\nindex 1..2 100644\nBinary files a/fw.bin and b/fw.bin differ\n",
	} {
		f, err := ParseFix(name+".patch", []byte(diff))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_, err = Build(context.Background(), nil, nil, []*Fix{f}, Options{Work: t.TempDir()})
		if !errors.Is(err, ErrUnpatchable) || !strings.Contains(err.Error(), name[:4]) {
			t.Errorf("%s: %v, want ErrUnpatchable naming it", name, err)
		}
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
		"no prefix":    "--- x.c\n+++ x.c\n@@ -1 +1 @@\n-a\n+b\n",
		"absolute":     "--- /usr/src/linux/x.c\n+++ /usr/src/linux/x.c\n@@ -1 +1 @@\n-a\n+b\n",
		"truncated":    "--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,2 @@\n-a\n+b\n",
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
