package build

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/stitchpatch/stitch/internal/fingerprint"
)

// ManifestVersion is bumped when the manifest's meaning changes.
const ManifestVersion = 1

// Manifest describes a built livepatch module: what it patches, for which
// exact kernel, and how to recognise the code it replaces. It travels
// with the module (in a bundle) to the machines that apply it.
type Manifest struct {
	Version     int      `json:"version"`
	Name        string   `json:"name"`   // module and patch name
	Module      string   `json:"module"` // file name of the .ko
	ModuleHash  string   `json:"module_sha256"`
	Kernel      KernelID `json:"kernel"`
	Description string   `json:"description,omitempty"`
	CVEs        []string `json:"cves,omitempty"`
	Fixes       []Fix    `json:"fixes"`
	Objects     []Object `json:"objects"`
	Built       string   `json:"built"` // RFC 3339
}

// KernelID names the one kernel a patch is for.
type KernelID struct {
	Release string `json:"release"`  // uname -r
	BuildID string `json:"build_id"` // GNU build-id of vmlinux
}

// Object is one patched object: "vmlinux" or a module.
type Object struct {
	Name      string     `json:"name"`
	Functions []Function `json:"functions"`
}

// Function is one replaced function, with the fingerprint of the code it
// replaces: the apply side repeats run-pre matching with it against the
// running kernel.
type Function struct {
	Name        string                  `json:"name"`
	Sympos      int                     `json:"sympos"`
	Fingerprint fingerprint.Fingerprint `json:"pre_fingerprint"`
}

// ErrBadManifest means a manifest is unreadable or not for this version.
var ErrBadManifest = errors.New("bad manifest")

// ReadManifest reads and checks a manifest file.
func ReadManifest(path string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseManifest(b)
}

// ParseManifest decodes a manifest and checks it is complete.
func ParseManifest(b []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	switch {
	case m.Version != ManifestVersion:
		return nil, fmt.Errorf("%w: version %d, this stitch reads version %d", ErrBadManifest, m.Version, ManifestVersion)
	case m.Name == "" || m.Module == "" || len(m.ModuleHash) != 64:
		return nil, fmt.Errorf("%w: missing name, module or module hash", ErrBadManifest)
	case m.Kernel.Release == "" || m.Kernel.BuildID == "":
		return nil, fmt.Errorf("%w: missing kernel release or build-id", ErrBadManifest)
	case len(m.Objects) == 0:
		return nil, fmt.Errorf("%w: patches nothing", ErrBadManifest)
	}
	for _, o := range m.Objects {
		for _, f := range o.Functions {
			if f.Fingerprint.Size <= 0 || len(f.Fingerprint.SHA256) != 64 {
				return nil, fmt.Errorf("%w: function %s of %s has no pre-fix fingerprint", ErrBadManifest, f.Name, o.Name)
			}
		}
	}
	return &m, nil
}
