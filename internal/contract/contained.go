package contract

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"
)

// Contained records that a kernel's own source already contains fixes (they
// reverse-apply to it), so the kernel needs no patch for them. stitch build
// writes it as OUT/RELEASE/NAME.contained.json in place of a module and
// manifest; publish carries it to the server, and the fleet counts that
// kernel's machines as fixed for its CVEs.
type Contained struct {
	Version int      `json:"version"` // ManifestVersion
	Name    string   `json:"name"`    // the patch name a build would have given
	Kernel  KernelID `json:"kernel"`
	CVEs    []string `json:"cves,omitempty"`
	Fixes   []Fix    `json:"fixes"`
	Checked string   `json:"checked"` // RFC 3339
}

// ErrBadContained means a contained record is unreadable or fails a
// check. Like a manifest it travels to fleets (it makes machines count as
// fixed), so it is checked as untrusted input.
var ErrBadContained = errors.New("bad contained record")

// ContainedSuffix ends the file name of a contained record in a build's
// output, OUT/RELEASE/NAME.contained.json.
const ContainedSuffix = ".contained.json"

// maxContainedSize bounds what ReadContained reads: a record names a few
// fixes, far less.
const maxContainedSize = 1 << 20

// ReadContained reads and checks a contained record file.
func ReadContained(path string) (*Contained, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxContainedSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > maxContainedSize {
		return nil, fmt.Errorf("%w: %s is over %d bytes", ErrBadContained, path, maxContainedSize)
	}
	return ParseContained(b)
}

// ParseContained decodes a contained record and checks it (see Validate).
// Unknown fields and trailing data are refused, as for a manifest.
func ParseContained(b []byte) (*Contained, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Contained
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadContained, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after the JSON object", ErrBadContained)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Validate checks every field a server relies on, naming the first bad
// one and what it should be.
func (c *Contained) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadContained, fmt.Sprintf(format, a...))
	}
	switch {
	case c.Version != ManifestVersion:
		return bad("version %d, this stitch reads version %d", c.Version, ManifestVersion)
	case !ValidName(c.Name):
		return bad("name %q: want 1-55 characters of A-Z, a-z, 0-9, _, -", c.Name)
	case !ValidRelease(c.Kernel.Release):
		return bad("kernel.release %q: want a uname -r string", c.Kernel.Release)
	case !ValidBuildID(c.Kernel.BuildID):
		return bad("kernel.build_id %q: want the vmlinux GNU build-id in lower-case hex", c.Kernel.BuildID)
	case len(c.Fixes) == 0:
		return bad("fixes: none: a contained record names the fixes the kernel contains")
	}
	for _, id := range c.CVEs {
		if !ValidCVE(id) {
			return bad("cve %q: want CVE-YYYY-NNNN", id)
		}
	}
	if _, err := time.Parse(time.RFC3339, c.Checked); err != nil {
		return bad("checked %q: want an RFC 3339 time (when the kernel's source was checked)", c.Checked)
	}
	for _, f := range c.Fixes {
		switch {
		case f.Name == "" || len(f.Name) > 255 || strings.ContainsFunc(f.Name, func(r rune) bool { return r < ' ' || r == '/' || r == '\\' || r == 0x7f }):
			return bad("fix name %q: want the fix's file name, without a directory", f.Name)
		case !validSHA256(f.Hash):
			return bad("fix %q: sha256 %q: want 64 lower-case hex digits", f.Name, f.Hash)
		case f.Upstream != "" && !ValidCommit(f.Upstream):
			return bad("fix %q: upstream %q: want a git commit id, 7 to 64 lower-case hex digits", f.Name, f.Upstream)
		case len(f.Description) > 4096:
			return bad("fix %q: description: %d bytes, at most 4096", f.Name, len(f.Description))
		}
		for _, id := range f.CVEs {
			if !ValidCVE(id) {
				return bad("fix %q: cve %q: want CVE-YYYY-NNNN", f.Name, id)
			}
		}
		for _, p := range f.Files {
			if !validSourcePath(p) {
				return bad("fix %q: file %q: want a path relative to the kernel tree's root", f.Name, p)
			}
		}
	}
	return nil
}

// validSourcePath says whether p is a clean relative path inside a tree.
func validSourcePath(p string) bool {
	if p == "" || len(p) > 4096 || strings.HasPrefix(p, "/") || strings.ContainsFunc(p, func(r rune) bool { return r < ' ' || r == 0x7f }) {
		return false
	}
	for _, part := range strings.Split(p, "/") {
		if part == "" || part == "." || part == ".." {
			return false
		}
	}
	return true
}

// AllCVEs are the record's CVE ids and its fixes', sorted, each once.
func (c *Contained) AllCVEs() []string {
	ids := slices.Clone(c.CVEs)
	for _, f := range c.Fixes {
		ids = append(ids, f.CVEs...)
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// Upstreams are the upstream commits of the record's fixes, sorted, each
// once (none when no fix names one).
func (c *Contained) Upstreams() []string { return upstreams(c.Fixes) }

// Upstreams are the upstream commits of the manifest's fixes, sorted,
// each once.
func (m *Manifest) Upstreams() []string { return upstreams(m.Fixes) }

func upstreams(fixes []Fix) []string {
	var out []string
	for _, f := range fixes {
		if f.Upstream != "" {
			out = append(out, f.Upstream)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// ContainedDir is the top directory of contained records in a repository.
// It is not a kernel release's directory, so nothing that takes the
// bundles under RELEASE/ (an agent on a mirror) takes a record for one.
const ContainedDir = "contained"

// ContainedTargetName is the name in a repository of the contained record
// whose bytes' SHA-256 (lower-case hex) is hash: contained/RELEASE/
// NAME-HASH16.json, content-addressed as bundles are.
func ContainedTargetName(c *Contained, hash string) string {
	return fmt.Sprintf("%s/%s/%s-%s.json", ContainedDir, c.Kernel.Release, c.Name, hash[:min(16, len(hash))])
}

// ValidContainedTarget says whether s is a well-formed contained record's
// target name.
func ValidContainedTarget(s string) bool { return containedTargetRe.MatchString(s) }
