// Package buildout writes the output tree of a many-kernel build as
// stitch build writes it, OUT/RELEASE/NAME.ko with NAME.json for each
// kernel that gets a patch and OUT/RELEASE/NAME.contained.json for each
// kernel whose source already contains the fix, from stand-in modules
// (testutils.StandInModule: real ELF objects with the modinfo of a
// livepatch for that kernel), for the tests of publish and of the fleet's
// coverage. It is apart from testutils, which must not import contract.
package buildout

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// Fix is the fix a tree is built from.
type Fix struct {
	Name     string // the patch (module) name
	CVEs     []string
	Upstream string // upstream commit, "" for none
}

// Kernel is one kernel of the build.
type Kernel struct {
	Release, BuildID string
	// Contains: the kernel's source already has the fix, so the build
	// wrote a contained record instead of a module.
	Contains bool
}

func (f Fix) fix(release string) contract.Fix {
	// The backport's diff differs per kernel series, and so its hash.
	sum := sha256.Sum256([]byte(f.Name + "@" + release))
	return contract.Fix{Name: strings.TrimPrefix(f.Name, "stitch_") + ".patch", Hash: hex.EncodeToString(sum[:]), CVEs: f.CVEs,
		Files: []string{"fs/proc/cmdline.c"}, Upstream: f.Upstream}
}

// Manifest is the manifest of f's patch for k, for module ko.
func Manifest(f Fix, k Kernel, ko []byte) contract.Manifest {
	sum := sha256.Sum256(ko)
	return contract.Manifest{
		Version: contract.ManifestVersion, Name: f.Name, Module: f.Name + ".ko", ModuleHash: hex.EncodeToString(sum[:]),
		Kernel: contract.KernelID{Release: k.Release, BuildID: k.BuildID}, CVEs: f.CVEs, Description: "stand-in fix",
		Fixes: []contract.Fix{f.fix(k.Release)},
		Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{
			Name: "cmdline_proc_show", Fingerprint: fingerprint.Fingerprint{Size: 64, SHA256: strings.Repeat("ab", 32)},
		}}}},
		Built: "2026-12-01T00:00:00Z",
	}
}

// Contained is the record that k's source contains f.
func Contained(f Fix, k Kernel) contract.Contained {
	return contract.Contained{Version: contract.ManifestVersion, Name: f.Name, Kernel: contract.KernelID{Release: k.Release, BuildID: k.BuildID},
		CVEs: f.CVEs, Fixes: []contract.Fix{f.fix(k.Release)}, Checked: "2026-12-01T00:00:00Z"}
}

// Write writes f's build for kernels into out (created if missing) and
// returns out.
func Write(t testing.TB, out string, f Fix, kernels ...Kernel) string {
	t.Helper()
	for _, k := range kernels {
		dir := filepath.Join(out, k.Release)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if k.Contains {
			writeJSON(t, filepath.Join(dir, f.Name+contract.ContainedSuffix), Contained(f, k))
			continue
		}
		ko := testutils.StandInModule(t, f.Name, k.Release, k.BuildID)
		if err := os.WriteFile(filepath.Join(dir, f.Name+".ko"), ko, 0o644); err != nil {
			t.Fatal(err)
		}
		writeJSON(t, filepath.Join(dir, f.Name+".json"), Manifest(f, k, ko))
	}
	return out
}

func writeJSON(t testing.TB, path string, v any) {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}
