package kbuild

import (
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"
)

// diffFile is one file's part of a unified diff. Old and New are paths
// relative to the tree (one component stripped, as patch -p1 does); ""
// for /dev/null.
type diffFile struct {
	Old, New string
	Hunks    []diffHunk
	lines    []string // the hunks' lines, for failing hunks' text
}

// diffHunk is one @@ hunk.
type diffHunk struct {
	Header             string
	OldStart, NewStart int
	first, end         int // its lines in diffFile.lines: [first, end)
}

func (f diffFile) hunkText(k int) string {
	if k < 0 || k >= len(f.Hunks) {
		return ""
	}
	h := f.Hunks[k]
	s := strings.Join(f.lines[h.first:h.end], "\n") + "\n"
	if len(s) > maxHunkText {
		s = s[:maxHunkText] + "\n[...]\n"
	}
	return s
}

var hunkHeader = regexp.MustCompile(`^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@`)

// parseDiff splits a unified diff into files and hunks, following each
// hunk's line counts (a removed line may itself start with "--").
// Text between files (mail headers, git's extended headers) is skipped.
func parseDiff(diff []byte) ([]diffFile, error) {
	lines := strings.Split(string(diff), "\n")
	var files []diffFile
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "--- ") || i+1 >= len(lines) || !strings.HasPrefix(lines[i+1], "+++ ") {
			continue
		}
		old, err := DiffPath(lines[i][4:])
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadDiff, err)
		}
		new, err := DiffPath(lines[i+1][4:])
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadDiff, err)
		}
		f := diffFile{Old: old, New: new}
		i += 2
		for i < len(lines) {
			m := hunkHeader.FindStringSubmatch(lines[i])
			if m == nil {
				break
			}
			oldStart, _ := strconv.Atoi(m[1])
			newStart, _ := strconv.Atoi(m[3])
			oldN, newN := count(m[2]), count(m[4])
			h := diffHunk{Header: lines[i], OldStart: oldStart, NewStart: newStart, first: len(f.lines)}
			f.lines = append(f.lines, lines[i])
			i++
			for i < len(lines) && (oldN > 0 || newN > 0 || strings.HasPrefix(lines[i], `\`)) {
				l := lines[i]
				switch {
				case strings.HasPrefix(l, `\`): // "\ No newline at end of file"
				case strings.HasPrefix(l, "-"):
					oldN--
				case strings.HasPrefix(l, "+"):
					newN--
				case l == "" || strings.HasPrefix(l, " "): // context; some tools drop a blank line's space
					oldN--
					newN--
				default:
					return nil, fmt.Errorf("%w: %s: hunk %q ends early, at %q", ErrBadDiff, f.New, h.Header, l)
				}
				f.lines = append(f.lines, l)
				i++
			}
			if oldN > 0 || newN > 0 {
				return nil, fmt.Errorf("%w: %s: hunk %q is truncated", ErrBadDiff, f.New, h.Header)
			}
			h.end = len(f.lines)
			f.Hunks = append(f.Hunks, h)
		}
		i-- // the loop's i++ moves to the line after the last hunk
		if len(f.Hunks) > 0 {
			files = append(files, f)
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%w: no '--- a/FILE', '+++ b/FILE' and '@@' hunk lines", ErrBadDiff)
	}
	return files, nil
}

// count is a hunk header's line count: 1 when it is left out.
func count(s string) int {
	if s == "" {
		return 1
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// DiffPath turns a diff's file name, "b/fs/proc/cmdline.c\t2024-...",
// into the path in the tree, "fs/proc/cmdline.c" (one leading component
// stripped, as patch -p1 does); /dev/null (a created or deleted file)
// gives "". A path that would leave the tree is an error.
func DiffPath(s string) (string, error) {
	s, _, _ = strings.Cut(s, "\t")
	s = strings.TrimSpace(s)
	if s == "/dev/null" {
		return "", nil
	}
	_, rest, ok := strings.Cut(s, "/")
	if !ok || rest == "" {
		return "", fmt.Errorf("path %q has no leading component to strip (want a/FILE and b/FILE)", s)
	}
	clean := path.Clean(rest)
	if clean == ".." || strings.HasPrefix(clean, "../") || path.IsAbs(clean) {
		return "", fmt.Errorf("path %q leaves the source tree", s)
	}
	return clean, nil
}

// patchedFile is what GNU patch said about one file of a diff.
type patchedFile struct {
	Name    string // as patch printed it; "" when it could not tell
	Missing bool   // "can't find file to patch": every hunk ignored
	Hunks   map[int]hunkOutcome
}

// hunkOutcome is what patch said about one hunk (it says nothing of one
// that applied at its own line).
type hunkOutcome struct {
	Line         int
	Offset, Fuzz int
	Failed       bool
}

var (
	hunkOK     = regexp.MustCompile(`^Hunk #(\d+) succeeded at (\d+)(?: with fuzz (\d+))?(?: \(offset (-?\d+) lines?\))?\.`)
	hunkFailed = regexp.MustCompile(`^Hunk #(\d+) (?:FAILED|ignored) at (\d+)`)
)

// parsePatchOutput reads GNU patch's messages (LC_ALL=C): "checking
// file F" (or "patching file F") opens a file; "Hunk #2 succeeded at 1220
// with fuzz 1 (offset 4 lines)." and "Hunk #1 FAILED at 2953." describe
// its hunks; "can't find file to patch" is a file the tree lacks, named
// by the "|+++ " line patch quotes after it. Other lines are ignored.
func parsePatchOutput(out string) []patchedFile {
	var files []patchedFile
	cur := func() *patchedFile {
		if len(files) == 0 {
			return nil
		}
		return &files[len(files)-1]
	}
	quoting := false // inside the text patch quotes after "can't find file"
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimRight(line, "\r")
		if name, ok := cutAny(line, "checking file ", "patching file "); ok {
			files = append(files, patchedFile{Name: unquote(name), Hunks: map[int]hunkOutcome{}})
			quoting = false
			continue
		}
		if strings.HasPrefix(line, "can't find file to patch") {
			files = append(files, patchedFile{Missing: true, Hunks: map[int]hunkOutcome{}})
			quoting = true
			continue
		}
		f := cur()
		if f == nil {
			continue
		}
		if quoting {
			if q, ok := strings.CutPrefix(line, "|"); ok {
				for _, pre := range []string{"+++ ", "--- "} {
					if rest, ok := strings.CutPrefix(q, pre); ok && f.Name == "" {
						if p, err := DiffPath(rest); err == nil && p != "" {
							f.Name = p
						}
					}
				}
				continue
			}
			if strings.HasPrefix(line, "No file to patch") {
				quoting = false
			}
			continue
		}
		if m := hunkOK.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			o := hunkOutcome{}
			o.Line, _ = strconv.Atoi(m[2])
			o.Fuzz, _ = strconv.Atoi(m[3])
			o.Offset, _ = strconv.Atoi(m[4])
			f.Hunks[n] = o
			continue
		}
		if m := hunkFailed.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			l, _ := strconv.Atoi(m[2])
			f.Hunks[n] = hunkOutcome{Line: l, Failed: true}
		}
	}
	return files
}

func cutAny(s string, prefixes ...string) (string, bool) {
	for _, p := range prefixes {
		if rest, ok := strings.CutPrefix(s, p); ok {
			return rest, true
		}
	}
	return "", false
}

// unquote undoes the shell-style quotes patch puts around an unusual
// file name ('a b.c').
func unquote(s string) string {
	if len(s) >= 2 && s[0] == '\'' && s[len(s)-1] == '\'' {
		return strings.ReplaceAll(s[1:len(s)-1], `'\''`, `'`)
	}
	return s
}
