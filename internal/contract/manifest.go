// Package contract is what the stages of the pipeline agree on: the
// manifest stitch build writes and bundle, server and agent read, the
// identity of a kernel, a patch's name in a repository, and the words of
// the machine protocol (the states a machine reports a patch in, the
// health checks and their schedule, the reasons a patch failed). Every
// stage validates with the rules here, so that a manifest build accepts is
// one the server and the agent accept. It imports nothing of the pipeline
// but the fingerprint type, so the agent reads a manifest without linking
// the compiler pipeline.
package contract

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"unicode"

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
	// Replace marks a cumulative patch (klp_patch.replace): once its
	// transition ends it is the only livepatch the kernel runs, and every
	// function it does not carry is back to the original code.
	Replace bool `json:"replace,omitempty"`
	// Level places a cumulative patch in a patch stream: level Level of
	// stream Stream, carrying every fix of the stream up to it but those
	// withdrawn. Supersedes is the level it follows (0 for the first);
	// Withdrawn names the fixes that level carried and this one does not.
	Level *Level `json:"level,omitempty"`
	// Hooks is the fix author's hooks file compiled into the module
	// (stitch build --hooks), if any.
	Hooks *Hooks `json:"hooks,omitempty"`
}

// Hooks records the fix author's hooks file: its name and SHA-256, so
// that a manifest names exactly what went into the module besides the
// fixes.
type Hooks struct {
	Name string `json:"name"`
	Hash string `json:"sha256"`
}

// CallbackKinds are the klp callbacks an object may have, in the order
// the kernel runs them (struct klp_callbacks).
var CallbackKinds = []string{"pre_patch", "post_patch", "pre_unpatch", "post_unpatch"}

// Level is where a cumulative patch stands in its stream.
type Level struct {
	Stream     string   `json:"stream"`
	Number     int      `json:"number"`
	Supersedes int      `json:"supersedes"`
	Withdrawn  []string `json:"withdrawn,omitempty"`
}

// LevelName is the module (and patch) name of level n of a stream:
// every level has its own, as the kernel loads the next level while the
// one it replaces is still there.
func LevelName(stream string, n int) string { return fmt.Sprintf("%s_l%d", stream, n) }

// ValidStream says whether s can name a patch stream: every level's
// name (LevelName) must be a module name, and a C identifier.
func ValidStream(s string) bool {
	return ValidName(LevelName(s, MaxLevel)) && !strings.Contains(s, "-")
}

// MaxLevel bounds a stream's levels, so that a level's name fits the
// kernel's module names.
const MaxLevel = 9999

// KernelID names the one kernel a patch is for.
type KernelID struct {
	Release string `json:"release"`  // uname -r
	BuildID string `json:"build_id"` // GNU build-id of vmlinux
}

// Fix is the record of one source fix in a manifest: which diff (by
// name and SHA-256) went into the module, and what it says of itself.
type Fix struct {
	Name        string   `json:"name"`
	Hash        string   `json:"sha256"`
	Description string   `json:"description,omitempty"`
	CVEs        []string `json:"cves,omitempty"`
	Files       []string `json:"files"` // source files changed, relative to the tree's root
	// Upstream is the upstream commit the fix is (or backports), when
	// known: it names one fix across the kernels it is ported to, whose
	// diffs (and so sha256) may differ.
	Upstream string `json:"upstream,omitempty"`
	// Variant is the kernel series whose backport this diff is ("6.1"),
	// "default", or "" for a fix without variants.
	Variant string `json:"variant,omitempty"`
}

// Object is one patched object: "vmlinux" or a module.
type Object struct {
	Name      string     `json:"name"`
	Functions []Function `json:"functions"`
	// Callbacks are the klp callbacks the module gives the object
	// (CallbackKinds), from the hooks file or the fix's own code.
	Callbacks []string `json:"callbacks,omitempty"`
	// Notrace are the changed functions ftrace cannot redirect (no
	// __fentry__ call) that the module carries as new copies, with the
	// way the running kernel reaches each copy instead of the old code.
	Notrace []Notrace `json:"notrace,omitempty"`
}

// Notrace is a changed function without a __fentry__ call carried as a
// copy: Via are the functions the module replaces so that they call it
// (every direct caller in its file), Data the pointers to it that the
// hooks re-point.
type Notrace struct {
	Function string   `json:"function"`
	Via      []string `json:"via"`
	Data     []string `json:"data,omitempty"`
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

// ParseManifest decodes a manifest and checks it (see Validate). Unknown
// fields and trailing data are refused, so that a typo or a manifest from
// a newer schema does not silently lose information on its way to a fleet.
func ParseManifest(b []byte) (*Manifest, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
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

// CheckLabels checks what a person gives a patch, its name and CVE ids,
// as Validate does; stitch build calls it before it compiles anything.
func CheckLabels(name string, cves []string) error {
	if !ValidName(name) {
		return fmt.Errorf("%w: name %q: want 1-55 characters of A-Z, a-z, 0-9, _, -", ErrBadManifest, name)
	}
	for _, c := range cves {
		if !ValidCVE(c) {
			return fmt.Errorf("%w: cve %q: want CVE-YYYY-NNNN", ErrBadManifest, c)
		}
	}
	return nil
}

// Validate checks every field a machine relies on, naming the first bad one
// and what it should be. Manifests travel to fleets, so they are checked
// as untrusted input even when stitch build wrote them.
func (m *Manifest) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadManifest, fmt.Sprintf(format, a...))
	}
	if m.Version != ManifestVersion {
		return bad("version %d, this stitch reads version %d", m.Version, ManifestVersion)
	}
	if err := CheckLabels(m.Name, m.CVEs); err != nil {
		return err
	}
	switch {
	case m.Module == "" || len(m.Module) > 255 || strings.ContainsAny(m.Module, "/\\\x00"):
		return bad("module %q: want the .ko's file name, without a directory", m.Module)
	case !validSHA256(m.ModuleHash):
		return bad("module_sha256 %q: want 64 lower-case hex digits", m.ModuleHash)
	case !ValidRelease(m.Kernel.Release):
		return bad("kernel.release %q: want a uname -r string", m.Kernel.Release)
	case !ValidBuildID(m.Kernel.BuildID):
		return bad("kernel.build_id %q: want the vmlinux GNU build-id in lower-case hex", m.Kernel.BuildID)
	case len(m.Objects) == 0:
		return bad("objects: patches nothing")
	case len(m.Description) > 4096:
		return bad("description: %d bytes, at most 4096", len(m.Description))
	}
	if l := m.Level; l != nil {
		switch {
		case !m.Replace:
			return bad("level %d of %s without replace: a level is a cumulative patch", l.Number, l.Stream)
		case l.Number < 1 || l.Number > MaxLevel:
			return bad("level %d: want 1 to %d", l.Number, MaxLevel)
		case l.Supersedes < 0 || l.Supersedes >= l.Number:
			return bad("level %d supersedes %d: want an earlier level, or 0", l.Number, l.Supersedes)
		case !ValidStream(l.Stream):
			return bad("stream %q: want letters, digits and underscores, short enough for %q", l.Stream, LevelName(l.Stream, MaxLevel))
		case m.Name != LevelName(l.Stream, l.Number):
			return bad("name %q: level %d of %s is named %s", m.Name, l.Number, l.Stream, LevelName(l.Stream, l.Number))
		}
		for _, w := range l.Withdrawn {
			if w == "" || len(w) > 255 || strings.ContainsFunc(w, unicode.IsControl) {
				return bad("level %d withdraws %q: not a fix name", l.Number, w)
			}
		}
	}
	for _, f := range m.Fixes {
		if !validSHA256(f.Hash) {
			return bad("fix %q: sha256 %q: want 64 lower-case hex digits", f.Name, f.Hash)
		}
		if f.Upstream != "" && !ValidCommit(f.Upstream) {
			return bad("fix %q: upstream %q: want a git commit id, 7 to 64 lower-case hex digits", f.Name, f.Upstream)
		}
	}
	if h := m.Hooks; h != nil {
		switch {
		case h.Name == "" || len(h.Name) > 255 || strings.ContainsAny(h.Name, "/\\") || strings.ContainsFunc(h.Name, unicode.IsControl):
			return bad("hooks name %q: want the hooks file's name, without a directory", h.Name)
		case !validSHA256(h.Hash):
			return bad("hooks %q: sha256 %q: want 64 lower-case hex digits", h.Name, h.Hash)
		}
	}
	for _, o := range m.Objects {
		if !validSymbol(o.Name) {
			return bad("object name %q: want a module name or vmlinux", o.Name)
		}
		for i, c := range o.Callbacks {
			if !slices.Contains(CallbackKinds, c) || slices.Contains(o.Callbacks[:i], c) {
				return bad("object %s: callback %q: want each of %s at most once", o.Name, c, strings.Join(CallbackKinds, ", "))
			}
		}
		for _, f := range o.Functions {
			switch {
			case !validSymbol(f.Name):
				return bad("object %s: function %q is not a symbol name", o.Name, f.Name)
			case f.Sympos < 0:
				return bad("function %s of %s: sympos %d is negative", f.Name, o.Name, f.Sympos)
			case f.Fingerprint.Size <= 0 || !validSHA256(f.Fingerprint.SHA256):
				return bad("function %s of %s has no pre-fix fingerprint", f.Name, o.Name)
			}
		}
	}
	return nil
}
