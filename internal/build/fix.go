// Package build turns a source fix into a livepatch module for one distro
// kernel: it compiles the touched objects before and after the fix, diffs
// them, locates each object in the running kernel, proves the pre-fix
// code is the kernel's own (run-pre matching), writes the module with
// klpmod, and records all of it in a manifest.
package build

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
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

// ParseFix reads a unified diff. The description is taken from a
// "Subject:" line (git format-patch) or else the first line of the text
// before the diff; CVE ids from anywhere in that text; the upstream
// commit from that text too (see upstreamCommit).
func ParseFix(name string, diff []byte) (*Fix, error) {
	sum := sha256.Sum256(diff)
	f := &Fix{Fix: contract.Fix{Name: name, Hash: hex.EncodeToString(sum[:])}, Diff: diff}
	seen := map[string]bool{}
	var header []string
	inHeader := true
	sc := bufio.NewScanner(bytes.NewReader(diff))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "--- "):
			inHeader = false
		case strings.HasPrefix(line, "+++ "):
			p, err := kbuild.DiffPath(strings.TrimPrefix(line, "+++ "))
			if err != nil {
				return nil, fmt.Errorf("%w: %s: %v", ErrBadFix, name, err)
			}
			if p != "" && !seen[p] {
				seen[p] = true
				f.Files = append(f.Files, p)
			}
		case inHeader && strings.HasPrefix(line, "diff --git "):
			inHeader = false
		case inHeader:
			header = append(header, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadFix, name, err)
	}
	if len(f.Files) == 0 {
		return nil, fmt.Errorf("%w: %s has no '+++ b/<file>' lines: not a unified diff", ErrBadFix, name)
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
func appendMissing(ss []string, add ...string) []string {
	for _, s := range add {
		if !slices.Contains(ss, s) {
			ss = append(ss, s)
		}
	}
	return ss
}
