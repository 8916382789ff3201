package contract

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/fingerprint"
)

func validManifest() *Manifest {
	return &Manifest{
		Version: ManifestVersion, Name: "fix_cmdline", Module: "fix_cmdline.ko",
		ModuleHash: strings.Repeat("ab", 32),
		Kernel:     KernelID{Release: "6.1.0-54-amd64", BuildID: "887cd47f03581c5baf735611814b0308637cd7f2"},
		Fixes:      []Fix{{Name: "cmdline.patch", Hash: strings.Repeat("cd", 32), Files: []string{"fs/proc/cmdline.c"}}},
		Objects: []Object{{Name: "vmlinux", Functions: []Function{{
			Name: "cmdline_proc_show", Fingerprint: fingerprint.Fingerprint{Size: 42, Masked: [][2]int{{0, 5}}, SHA256: strings.Repeat("ef", 32)},
		}}}},
	}
}

func TestManifestRoundTrip(t *testing.T) {
	m := validManifest()
	m.Fixes[0].Upstream, m.Fixes[0].Variant = "0123456789abcdef0123456789abcdef01234567", "6.1"
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Objects[0].Functions[0].Fingerprint.Masked[0] != [2]int{0, 5} || got.Kernel != m.Kernel || got.Fixes[0].Upstream != m.Fixes[0].Upstream || got.Fixes[0].Variant != "6.1" {
		t.Errorf("round trip lost data: %+v", got)
	}
}

// A manifest with hooks keeps them; one from before hooks existed (no
// hooks field, no callbacks) still reads.
func TestManifestHooks(t *testing.T) {
	m := validManifest()
	m.Hooks = &Hooks{Name: "pipe-hooks.c", Hash: strings.Repeat("0f", 32)}
	m.Objects[0].Callbacks = []string{"pre_patch", "post_unpatch"}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	if *got.Hooks != *m.Hooks || strings.Join(got.Objects[0].Callbacks, ",") != "pre_patch,post_unpatch" {
		t.Errorf("round trip: hooks %+v, callbacks %v", got.Hooks, got.Objects[0].Callbacks)
	}
	old := `{"version":1,"name":"fix_cmdline","module":"fix_cmdline.ko","module_sha256":"` + strings.Repeat("ab", 32) +
		`","kernel":{"release":"6.1.0-54-amd64","build_id":"887cd47f03581c5baf735611814b0308637cd7f2"},"fixes":[],` +
		`"objects":[{"name":"vmlinux","functions":[{"name":"f","sympos":0,"pre_fingerprint":{"size":4,"sha256":"` + strings.Repeat("ef", 32) + `"}}]}],"built":"2026-01-01T00:00:00Z"}`
	if m, err := ParseManifest([]byte(old)); err != nil || m.Hooks != nil {
		t.Errorf("manifest without hooks: %v, hooks %v", err, m)
	}
}

func TestManifestRefusesIncomplete(t *testing.T) {
	for name, mutate := range map[string]func(*Manifest){
		"version":        func(m *Manifest) { m.Version = 99 },
		"no build-id":    func(m *Manifest) { m.Kernel.BuildID = "" },
		"no objects":     func(m *Manifest) { m.Objects = nil },
		"no hash":        func(m *Manifest) { m.ModuleHash = "x" },
		"bad name":       func(m *Manifest) { m.Name = "Bad Name" },
		"module path":    func(m *Manifest) { m.Module = "../x.ko" },
		"bad cve":        func(m *Manifest) { m.CVEs = []string{"cve-1"} },
		"bad func":       func(m *Manifest) { m.Objects[0].Functions[0].Name = "a b" },
		"bad fix":        func(m *Manifest) { m.Fixes[0].Hash = "nope" },
		"bad upstream":   func(m *Manifest) { m.Fixes[0].Upstream = "0123456789AB" },
		"short upstream": func(m *Manifest) { m.Fixes[0].Upstream = "0123" },
		"hooks hash":     func(m *Manifest) { m.Hooks = &Hooks{Name: "hooks.c", Hash: "abc"} },
		"hooks dir":      func(m *Manifest) { m.Hooks = &Hooks{Name: "a/hooks.c", Hash: strings.Repeat("ab", 32)} },
		"hooks no name":  func(m *Manifest) { m.Hooks = &Hooks{Hash: strings.Repeat("ab", 32)} },
		"bad callback":   func(m *Manifest) { m.Objects[0].Callbacks = []string{"pre_load"} },
		"twice callback": func(m *Manifest) { m.Objects[0].Callbacks = []string{"pre_patch", "pre_patch"} },
		"no fingerprint": func(m *Manifest) {
			m.Objects[0].Functions[0].Fingerprint = fingerprint.Fingerprint{}
		},
	} {
		m := validManifest()
		mutate(m)
		b, _ := json.Marshal(m)
		if _, err := ParseManifest(b); !errors.Is(err, ErrBadManifest) {
			t.Errorf("%s: %v, want ErrBadManifest", name, err)
		}
	}
	for name, b := range map[string]string{"truncated JSON": "{", "unknown field": `{"version":1,"typo":1}`} {
		if _, err := ParseManifest([]byte(b)); !errors.Is(err, ErrBadManifest) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func FuzzParseManifest(f *testing.F) {
	b, _ := json.Marshal(validManifest())
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest(data) // must not panic
		if err == nil && m.Validate() != nil {
			t.Fatal("ParseManifest returned a manifest Validate refuses")
		}
	})
}

func TestLevelManifest(t *testing.T) {
	level := func() *Manifest {
		m := validManifest()
		m.Name, m.Module, m.Replace = "fleet_l3", "fleet_l3.ko", true
		m.Level = &Level{Stream: "fleet", Number: 3, Supersedes: 2, Withdrawn: []string{"a.patch"}}
		return m
	}
	b, err := json.Marshal(level())
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseManifest(b)
	if err != nil {
		t.Fatalf("valid level: %v", err)
	}
	if !got.Replace || got.Level.Number != 3 || got.Level.Withdrawn[0] != "a.patch" {
		t.Errorf("round trip lost the level: %+v", got.Level)
	}
	for name, mutate := range map[string]func(*Manifest){
		"without replace":   func(m *Manifest) { m.Replace = false },
		"number 0":          func(m *Manifest) { m.Level.Number, m.Name, m.Module = 0, "fleet_l0", "fleet_l0.ko" },
		"supersedes itself": func(m *Manifest) { m.Level.Supersedes = 3 },
		"named otherwise":   func(m *Manifest) { m.Name = "fleet_l2" },
		"stream with dash":  func(m *Manifest) { m.Level.Stream, m.Name = "a-b", "a-b_l3" },
		"stream too long":   func(m *Manifest) { m.Level.Stream = strings.Repeat("s", 50); m.Name = LevelName(m.Level.Stream, 3) },
		"withdrawn empty":   func(m *Manifest) { m.Level.Withdrawn = []string{""} },
	} {
		m := level()
		mutate(m)
		b, _ := json.Marshal(m)
		if _, err := ParseManifest(b); !errors.Is(err, ErrBadManifest) {
			t.Errorf("%s: %v, want ErrBadManifest", name, err)
		}
	}
}
