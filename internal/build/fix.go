// Package build turns a source fix into a livepatch module for one distro
// kernel: it compiles the touched objects before and after the fix, diffs
// them, locates each object in the running kernel, proves the pre-fix
// code is the kernel's own (run-pre matching), writes the module with
// klpmod, and records all of it in a manifest.
package build

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/udiff"
)

// ErrBadFix means the fix is not a usable unified diff.
var ErrBadFix = errors.New("bad fix")

// Fix is a source fix: a unified diff against the kernel source tree,
// as `patch -p1` takes it.
// Its record in the manifest is the embedded contract.Fix.
type Fix struct {
	contract.Fix
	Diff []byte
}

// ParseFix reads a unified diff (any diff patch -p1 takes: internal/udiff
// says which). The description is taken from a "Subject:" line (git
// format-patch) or else the first line of the text before the diff; CVE
// ids from anywhere in that text; the upstream commit from that text too
// (see upstreamCommit).
func ParseFix(name string, diff []byte) (*Fix, error) {
	sum := sha256.Sum256(diff)
	f := &Fix{Fix: contract.Fix{Name: name, Hash: hex.EncodeToString(sum[:])}, Diff: diff}
	d, err := udiff.Parse(diff)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadFix, name, err)
	}
	header := d.Preamble
	for _, file := range d.Files {
		if p := file.Path(); !slices.Contains(f.Files, p) {
			f.Files = append(f.Files, p)
		}
	}
	sort.Strings(f.Files)
	text := strings.Join(header, "\n")
	for _, l := range header {
		if s, ok := strings.CutPrefix(l, "Subject: "); ok {
			f.Description = strings.TrimSpace(strings.TrimPrefix(s, "[PATCH] "))
			break
		}
	}
	if f.Description == "" {
		for _, l := range header {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "From ") {
				f.Description = l
				break
			}
		}
	}
	f.CVEs = contract.FindCVEs(text)
	f.Upstream = upstreamCommit(header)
	return f, nil
}

var (
	// "commit <sha> upstream." opens a stable backport's message;
	// "[ Upstream commit <sha> ]" is the other form stable trees use.
	stableUpstream = regexp.MustCompile(`^\s*(?:commit ([0-9a-fA-F]{12,40}) upstream\.?|\[ ?Upstream commit ([0-9a-fA-F]{12,40}) ?\])\s*$`)
	// git format-patch's first line: "From <sha> Mon Sep 17 00:00:00 2001".
	mboxFrom = regexp.MustCompile(`^From ([0-9a-f]{40}) `)
)

// changesCode refuses a fix whose diff changes a file in a way no
// livepatch carries: it deletes, renames or copies a file, changes only
// its mode, or changes a binary file. Only text changes to existing
// files become new code.
func (f *Fix) changesCode() error {
	d, err := udiff.Parse(f.Diff)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrBadFix, f.Name, err)
	}
	for _, file := range d.Files {
		var what string
		switch {
		case file.Binary:
			what = "changes binary file " + file.Path()
		case file.Rename:
			what = fmt.Sprintf("renames %s to %s", file.Old, file.New)
		case file.Copy:
			what = fmt.Sprintf("copies %s to %s", file.Old, file.New)
		case file.New == "":
			what = "deletes " + file.Old
		case len(file.Hunks) == 0 && file.Old == "":
			what = "creates the empty file " + file.New
		case len(file.Hunks) == 0:
			what = fmt.Sprintf("changes only the mode of %s (%s to %s)", file.Path(), file.OldMode, file.NewMode)
		default:
			continue
		}
		return fmt.Errorf("%w: %s %s: a livepatch replaces functions of the running kernel's code; drop that part of the fix", ErrUnpatchable, f.Name, what)
	}
	return nil
}

// upstreamCommit finds the upstream commit a fix names in its header:
// a stable backport's "commit <sha> upstream" or "[ Upstream commit
// <sha> ]", or else the commit of a format-patch mail ("From <sha>"),
// which is the upstream one when the fix was taken from mainline.
func upstreamCommit(header []string) string {
	from := ""
	for _, l := range header {
		if m := stableUpstream.FindStringSubmatch(l); m != nil {
			return strings.ToLower(m[1] + m[2])
		}
		if m := mboxFrom.FindStringSubmatch(l); m != nil && from == "" {
			from = m[1]
		}
	}
	return from
}

// appendMissing appends to ss those of add that it lacks, in their order:
// CVE ids gathered from several fixes and options, each once.
func appendMissing[T comparable](ss []T, add ...T) []T {
	for _, s := range add {
		if !slices.Contains(ss, s) {
			ss = append(ss, s)
		}
	}
	return ss
}
