// Package bundle is the unit Stitch distributes: a livepatch module and its
// manifest, content-addressed by SHA-256, published into a repository whose
// metadata is signed with The Update Framework (TUF), and fetched by agents
// through a client that refuses tampered, rolled-back, mixed or stale
// metadata.
//
// The data flow is one way: bundle knows nothing of the server or the agent.
package bundle

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
)

// Sentinel errors. ErrBadManifest and ErrBadBundle mean bad input (the file
// is not what it should be); ErrVerify means signed metadata or content was
// refused; ErrNoRepo and ErrNotFound mean a missing repository or target.
var (
	ErrBadManifest = errors.New("bad manifest")
	ErrBadBundle   = errors.New("bad bundle")
	ErrVerify      = errors.New("verification refused")
	ErrNoRepo      = errors.New("no repository")
	ErrNotFound    = errors.New("not found")
	ErrExists      = errors.New("already exists")
)

// Manifest describes one livepatch module. `stitch build` fills it; the
// server matches it to machines by KernelRelease and KernelBuildID.
type Manifest struct {
	Name          string   `json:"name"`            // module name, e.g. "stitch_cve_2024_1234"
	KernelRelease string   `json:"kernel_release"`  // uname -r of the target kernel
	KernelBuildID string   `json:"kernel_build_id"` // GNU build-id of the target vmlinux, hex
	Objects       []Object `json:"objects"`         // what the module patches
	CVEs          []string `json:"cves,omitempty"`  // CVE ids the fix closes
	Description   string   `json:"description,omitempty"`
	FixHash       string   `json:"fix_hash,omitempty"` // sha256 of the source fix (patch file), hex
	ModuleSHA256  string   `json:"module_sha256"`      // sha256 of the .ko, hex
}

// Object is one patched object (vmlinux or a module) and its functions.
type Object struct {
	Name      string   `json:"name"`
	Functions []string `json:"functions"`
}

var (
	nameRe  = regexp.MustCompile(`^[a-z0-9_]{1,55}$`) // the kernel's module name limit is 55 usable bytes
	relRe   = regexp.MustCompile(`^[A-Za-z0-9._+~-]{1,64}$`)
	hexRe   = regexp.MustCompile(`^[0-9a-f]{8,128}$`)
	shaRe   = regexp.MustCompile(`^[0-9a-f]{64}$`)
	cveRe   = regexp.MustCompile(`^CVE-[0-9]{4}-[0-9]{4,7}$`)
	identRe = regexp.MustCompile(`^[A-Za-z0-9_.$-]{1,128}$`)
)

// Validate checks every field, naming the first bad one and what it should be.
func (m *Manifest) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadManifest, fmt.Sprintf(format, a...))
	}
	switch {
	case !nameRe.MatchString(m.Name):
		return bad("name %q: want 1-55 characters of a-z, 0-9, _", m.Name)
	case !relRe.MatchString(m.KernelRelease):
		return bad("kernel_release %q: want a uname -r string", m.KernelRelease)
	case !hexRe.MatchString(m.KernelBuildID):
		return bad("kernel_build_id %q: want lower-case hex", m.KernelBuildID)
	case !shaRe.MatchString(m.ModuleSHA256):
		return bad("module_sha256 %q: want 64 lower-case hex digits", m.ModuleSHA256)
	case m.FixHash != "" && !shaRe.MatchString(m.FixHash):
		return bad("fix_hash %q: want 64 lower-case hex digits or nothing", m.FixHash)
	case len(m.Objects) == 0:
		return bad("objects: at least one patched object is needed")
	case len(m.Description) > 4096:
		return bad("description: %d bytes, at most 4096", len(m.Description))
	}
	for _, o := range m.Objects {
		if !identRe.MatchString(o.Name) {
			return bad("object name %q: want a module name or vmlinux", o.Name)
		}
		if len(o.Functions) == 0 {
			return bad("object %s: no functions", o.Name)
		}
		for _, f := range o.Functions {
			if !identRe.MatchString(f) {
				return bad("object %s: function %q is not a symbol name", o.Name, f)
			}
		}
	}
	for _, c := range m.CVEs {
		if !cveRe.MatchString(c) {
			return bad("cve %q: want CVE-YYYY-NNNN", c)
		}
	}
	return nil
}

// ParseManifest decodes and validates a manifest. Unknown fields are refused
// so that a typo does not silently drop information.
func ParseManifest(data []byte) (*Manifest, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after the JSON object", ErrBadManifest)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// SHA256Hex is the lower-case hex SHA-256 of data.
func SHA256Hex(data []byte) string {
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}
