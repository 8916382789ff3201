package kbuild

import (
	"regexp"
	"strconv"
	"strings"

	"github.com/stitchpatch/stitch/internal/udiff"
)

// parseDiff splits a unified diff into its files (udiff, the parser every
// part of Stitch shares), with the paths patch -p1 uses.
func parseDiff(diff []byte) ([]udiff.File, error) {
	d, err := udiff.Parse(diff)
	if err != nil {
		return nil, err
	}
	return d.Files, nil
}

// hunkText is the text of file f's hunk k as the fix has it, capped.
func hunkText(f udiff.File, k int) string {
	if k < 0 || k >= len(f.Hunks) {
		return ""
	}
	s := f.Hunks[k].Text()
	if len(s) > maxHunkText {
		s = s[:maxHunkText] + "\n[...]\n"
	}
	return s
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
			// a git rename or copy: "checking file NEW (renamed from OLD)"
			if k := strings.LastIndex(name, " (renamed from "); k > 0 && strings.HasSuffix(name, ")") {
				name = name[:k]
			} else if k := strings.LastIndex(name, " (copied from "); k > 0 && strings.HasSuffix(name, ")") {
				name = name[:k]
			}
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
						if p, err := udiff.HeaderPath(rest); err == nil && p != "" {
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
