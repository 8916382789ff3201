package build

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/contract"
)

const body = "--- a/fs/proc/cmdline.c\n+++ b/fs/proc/cmdline.c\n@@ -1 +1 @@\n-a\n+b\n"

// The three places a fix names its upstream commit, as stable trees and
// git format-patch write them.
func TestUpstreamCommit(t *testing.T) {
	const sha = "0123456789abcdef0123456789abcdef01234567"
	for name, tt := range map[string]struct{ header, want string }{
		"stable":   {"Subject: [PATCH 6.1 12/99] net: fix\n\ncommit " + sha + " upstream.\n\nText.\n", sha},
		"bracket":  {"Subject: net: fix\n\n[ Upstream commit 0123456789AB ]\n\nCVE-2024-1234\n", "0123456789ab"},
		"mbox":     {"From " + sha + " Mon Sep 17 00:00:00 2001\nSubject: x\n", sha},
		"both":     {"From ffffffffffffffffffffffffffffffffffffffff Mon Sep 17 00:00:00 2001\nSubject: x\n\ncommit " + sha + " upstream\n", sha},
		"none":     {"Subject: x\n\nSee commit " + sha + " for the bug.\n", ""},
		"short":    {"From 1234 Mon Sep 17 00:00:00 2001\n", ""},
		"no diff?": {"", ""},
	} {
		f, err := ParseFix("x.patch", []byte(tt.header+body))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if f.Upstream != tt.want {
			t.Errorf("%s: upstream %q, want %q", name, f.Upstream, tt.want)
		}
		if f.Upstream != "" && !contract.ValidCommit(f.Upstream) {
			t.Errorf("%s: %q not a valid commit for the manifest", name, f.Upstream)
		}
	}
}

func writeVariants(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "CVE-2024-1234-cmdline")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for n, s := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestVariants(t *testing.T) {
	const up = "commit 0123456789abcdef0123456789abcdef01234567 upstream.\n\n"
	dir := writeVariants(t, map[string]string{
		"6.1.patch":     "Subject: fix (CVE-2024-1234)\n\n" + up + body,
		"6.12.patch":    "Subject: fix\n\n" + strings.ReplaceAll(body, "+b", "+c"), // names neither: inherits
		"5.10.patch":    "Subject: fix\n\n" + up + "CVE-2024-1234\n" + strings.ReplaceAll(body, "+b", "+d"),
		"default.patch": "Subject: fix\n\n" + up + strings.ReplaceAll(body, "+b", "+e"),
		"README":        "how these were made",
	})
	v, err := LoadFix(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := v.Variants(); !reflect.DeepEqual(got, []string{"5.10", "6.1", "6.12", "default"}) {
		t.Errorf("variants %v", got)
	}
	for series, want := range map[string]string{"6.1": "+b", "6.12": "+c", "5.10": "+d", "4.19": "+e"} {
		f, err := v.For(series)
		if err != nil {
			t.Fatalf("%s: %v", series, err)
		}
		if !strings.Contains(string(f.Diff), want) {
			t.Errorf("%s: picked %s", series, f.Diff)
		}
		if f.Name != "CVE-2024-1234-cmdline" || f.Upstream != "0123456789abcdef0123456789abcdef01234567" || !reflect.DeepEqual(f.CVEs, []string{"CVE-2024-1234"}) {
			t.Errorf("%s: identity %q %q %v", series, f.Name, f.Upstream, f.CVEs)
		}
	}
	if f, _ := v.For("4.19"); f.Variant != DefaultVariant {
		t.Errorf("4.19 got variant %q", f.Variant)
	}
	if n := v.ModuleName(); n != "stitch_CVE_2024_1234_cmdline" {
		t.Errorf("module name %q", n)
	}

	// Without a default, a series with no variant is named in the error.
	dir = writeVariants(t, map[string]string{"6.1.patch": body, "6.12.patch": body})
	v, err = LoadFix(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.For("5.15"); !errors.Is(err, ErrNoVariant) || !strings.Contains(err.Error(), "6.1, 6.12, not for 5.15") {
		t.Errorf("5.15: %v", err)
	}

	// A single file is the fix for every series.
	single := filepath.Join(t.TempDir(), "one.patch")
	os.WriteFile(single, []byte(body), 0o644)
	v, err = LoadFix(single)
	if err != nil {
		t.Fatal(err)
	}
	if f, err := v.For("9.9"); err != nil || f != v.Single || v.Variants() != nil || v.ModuleName() != "stitch_one" {
		t.Errorf("single: %v %v", f, err)
	}
}

func TestVariantsRefused(t *testing.T) {
	for name, files := range map[string]map[string]string{
		"other upstream": {
			"6.1.patch":  "commit 0123456789abcdef0123456789abcdef01234567 upstream.\n" + body,
			"6.12.patch": "commit 1123456789abcdef0123456789abcdef01234567 upstream.\n" + body,
		},
		"other CVEs": {"6.1.patch": "CVE-2024-1234\n" + body, "6.12.patch": "CVE-2024-1234 CVE-2024-5678\n" + body},
		"bad name":   {"6.1.patch": body, "linux-6.1.patch": body},
		"empty":      {"README": "nothing"},
		"not a diff": {"6.1.patch": "hello\n"},
	} {
		_, err := LoadFix(writeVariants(t, files))
		if !errors.Is(err, ErrBadFix) {
			t.Errorf("%s: %v, want ErrBadFix", name, err)
		}
	}
	if _, err := LoadFix(filepath.Join(t.TempDir(), "missing.patch")); !errors.Is(err, ErrBadFix) {
		t.Errorf("missing: %v", err)
	}
}
