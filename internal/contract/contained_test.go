package contract

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func validContained() *Contained {
	return &Contained{
		Version: ManifestVersion, Name: "stitch_cmdline",
		Kernel: KernelID{Release: "6.1.0-57-amd64", BuildID: "0123456789abcdef0123456789abcdef01234567"},
		CVEs:   []string{"CVE-2026-1111"},
		Fixes: []Fix{{Name: "cmdline.patch", Hash: strings.Repeat("cd", 32), CVEs: []string{"CVE-2026-2222"},
			Files: []string{"fs/proc/cmdline.c"}, Upstream: "0123456789abcdef0123456789abcdef01234567"}},
		Checked: "2026-11-30T12:00:00Z",
	}
}

func TestContainedRoundTrip(t *testing.T) {
	c := validContained()
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseContained(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, c) {
		t.Fatalf("round trip: %+v, want %+v", got, c)
	}
	if cves := got.AllCVEs(); !reflect.DeepEqual(cves, []string{"CVE-2026-1111", "CVE-2026-2222"}) {
		t.Errorf("AllCVEs %v", cves)
	}
	if up := got.Upstreams(); len(up) != 1 || up[0] != c.Fixes[0].Upstream {
		t.Errorf("Upstreams %v", up)
	}
	path := filepath.Join(t.TempDir(), "stitch_cmdline"+ContainedSuffix)
	os.WriteFile(path, b, 0o644)
	if _, err := ReadContained(path); err != nil {
		t.Errorf("read %s: %v", path, err)
	}
	os.WriteFile(path, append(b, make([]byte, maxContainedSize)...), 0o644)
	if _, err := ReadContained(path); !errors.Is(err, ErrBadContained) {
		t.Errorf("a record over the size limit: %v", err)
	}
}

func TestContainedRefusesBadFields(t *testing.T) {
	for name, mutate := range map[string]func(*Contained){
		"version":         func(c *Contained) { c.Version = 2 },
		"bad name":        func(c *Contained) { c.Name = "../x" },
		"no name":         func(c *Contained) { c.Name = "" },
		"bad release":     func(c *Contained) { c.Kernel.Release = "../etc" },
		"no build-id":     func(c *Contained) { c.Kernel.BuildID = "" },
		"upper build-id":  func(c *Contained) { c.Kernel.BuildID = "ABCDEF0123" },
		"bad cve":         func(c *Contained) { c.CVEs = []string{"CVE-26-1"} },
		"bad fix cve":     func(c *Contained) { c.Fixes[0].CVEs = []string{"cve-2026-1111"} },
		"no fixes":        func(c *Contained) { c.Fixes = nil },
		"fix hash":        func(c *Contained) { c.Fixes[0].Hash = "abc" },
		"fix name path":   func(c *Contained) { c.Fixes[0].Name = "a/b.patch" },
		"fix name empty":  func(c *Contained) { c.Fixes[0].Name = "" },
		"fix file escape": func(c *Contained) { c.Fixes[0].Files = []string{"../../etc/passwd"} },
		"fix file abs":    func(c *Contained) { c.Fixes[0].Files = []string{"/etc/passwd"} },
		"upstream":        func(c *Contained) { c.Fixes[0].Upstream = "HEAD~1" },
		"short upstream":  func(c *Contained) { c.Fixes[0].Upstream = "abc" },
		"checked":         func(c *Contained) { c.Checked = "yesterday" },
		"no checked":      func(c *Contained) { c.Checked = "" },
	} {
		c := validContained()
		mutate(c)
		b, _ := json.Marshal(c)
		if _, err := ParseContained(b); !errors.Is(err, ErrBadContained) {
			t.Errorf("%s: %v, want ErrBadContained", name, err)
		}
	}
	good, _ := json.Marshal(validContained())
	for name, b := range map[string]string{
		"truncated":     string(good[:len(good)-1]),
		"unknown field": strings.Replace(string(good), `"name":`, `"patched":true,"name":`, 1),
		"trailing data": string(good) + "{}",
		"an array":      "[" + string(good) + "]",
	} {
		if _, err := ParseContained([]byte(b)); !errors.Is(err, ErrBadContained) {
			t.Errorf("%s: %v, want ErrBadContained", name, err)
		}
	}
	// A manifest is not a contained record (objects, module: unknown).
	m, _ := json.Marshal(validManifest())
	if _, err := ParseContained(m); !errors.Is(err, ErrBadContained) {
		t.Errorf("a manifest parsed as a contained record: %v", err)
	}
}

// The manifest takes the same upstream rule.
func TestManifestUpstream(t *testing.T) {
	m := validManifest()
	m.Fixes[0].Upstream = "0123456789ab"
	b, _ := json.Marshal(m)
	if got, err := ParseManifest(b); err != nil || got.Upstreams()[0] != "0123456789ab" {
		t.Fatalf("manifest with an upstream commit: %v", err)
	}
	m.Fixes[0].Upstream = "main"
	b, _ = json.Marshal(m)
	if _, err := ParseManifest(b); !errors.Is(err, ErrBadManifest) {
		t.Fatalf("upstream %q: %v", m.Fixes[0].Upstream, err)
	}
}

func TestContainedTargetNames(t *testing.T) {
	c := validContained()
	name := ContainedTargetName(c, strings.Repeat("0123456789abcdef", 4))
	if name != "contained/6.1.0-57-amd64/stitch_cmdline-0123456789abcdef.json" {
		t.Fatalf("name %q", name)
	}
	if !ValidContainedTarget(name) || ValidTarget(name) {
		t.Fatalf("%q: a contained record's name must be one and not a bundle's", name)
	}
	for _, bad := range []string{"", "contained/../x-0123456789abcdef.json", "6.1/x-0123456789abcdef.json",
		"contained/6.1/x-0123456789abcdef.stitch", "contained/6.1/a/x-0123456789abcdef.json"} {
		if ValidContainedTarget(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzParseContained(f *testing.F) {
	b, _ := json.Marshal(validContained())
	f.Add(b)
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseContained(data) // must not panic
		if err == nil && c.Validate() != nil {
			t.Fatal("ParseContained returned a record Validate refuses")
		}
	})
}
