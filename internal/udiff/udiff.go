// Package udiff reads a unified diff the way `patch -p1` does: the one
// parser behind every part of Stitch that needs a fix's files or hunks
// (build's fix records, kbuild's port of a fix to a kernel's source).
//
// It takes git diffs (a/ and b/ prefixes, /dev/null for created and
// deleted files, mode, rename, copy and binary headers), `diff -Nupr`
// output (a "diff ..." line before each file, any first path component,
// a tab and a timestamp after the name), C-quoted names, CRLF line ends
// and "\ No newline at end of file" markers. A hunk's line counts decide
// where it ends, so a removed line that reads "--- x" is a removed line,
// not a file header. Paths lose their first component, as with -p1, and
// the names patch itself refuses or misreads (absolute, with a ".."
// component, nothing left after the strip) are refused with ErrBadDiff.
package udiff

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"
)

// ErrBadDiff means the text is not a unified diff patch -p1 would apply
// to a source tree; the error says which line or name and why.
var ErrBadDiff = errors.New("not a usable unified diff")

// Diff is a parsed unified diff.
type Diff struct {
	// Preamble is the text before the first file: a mail's headers and
	// message, a commit's description.
	Preamble []string
	Files    []File
}

// File is one file's part of a diff. Old and New are paths relative to
// the source tree, one leading component stripped (patch -p1); "" stands
// for /dev/null: New is "" for a deleted file, Old for a created one.
type File struct {
	Old, New string
	// Rename and Copy: git's "rename from/to", "copy from/to".
	Rename, Copy bool
	// OldMode and NewMode are git's mode lines ("100644"), when present.
	OldMode, NewMode string
	// Binary: git says the file is binary ("Binary files ... differ" or
	// "GIT binary patch"); it has no text hunks.
	Binary bool
	Hunks  []Hunk
}

// Path is the file's name in the tree after the diff: New, or Old for a
// deleted file.
func (f File) Path() string {
	if f.New != "" {
		return f.New
	}
	return f.Old
}

// Hunk is one "@@" hunk.
type Hunk struct {
	Header             string // the @@ line
	OldStart, OldLines int
	NewStart, NewLines int
	// Lines are the hunk's lines after the header, with their ' ', '-',
	// '+' or '\' marker and without line ends.
	Lines []string
}

// Text is the hunk as the diff has it, header first, one line each.
func (h Hunk) Text() string {
	return h.Header + "\n" + strings.Join(h.Lines, "\n") + "\n"
}

// maxLine bounds a hunk header's figures; more is not a kernel source.
const maxLine = 1 << 28

// binaryLine is diff's note on binary files: "Binary files A and B differ".
var binaryLine = regexp.MustCompile(`^Binary files (\S+) and (\S+) differ$`)

func binaryName(s string) (string, error) {
	if s == "/dev/null" {
		return "", nil
	}
	return StripPath(s)
}

// maxChopped is how many context lines missing at the end of the diff
// patch takes for blank lines that were cut off.
const maxChopped = 3

var hunkHeader = regexp.MustCompile(`^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@`)

// Parse reads a unified diff. Text before, between and after the files
// (mail headers, diffstat, a signature) is skipped; Preamble keeps what
// comes before the first file.
func Parse(diff []byte) (*Diff, error) {
	p := parser{lines: splitLines(string(diff))}
	d := &Diff{}
	first := -1
	for p.i < len(p.lines) {
		start := p.i
		l := p.lines[p.i]
		var f *File
		var err error
		switch {
		case strings.HasPrefix(l, "diff --git "):
			f, err = p.gitFile()
		case strings.HasPrefix(l, "--- ") && p.at(p.i+1, "+++ "):
			if start > p.end && strings.HasPrefix(p.lines[start-1], "diff ") {
				start-- // `diff -Nupr OLD NEW` before the file
			}
			f, err = p.plainFile()
		case strings.HasPrefix(l, "*** ") && p.at(p.i+1, "--- ") && p.at(p.i+2, "***************"):
			return nil, fmt.Errorf("%w: line %d: a context diff (diff -c); give a unified one (diff -u, git diff)", ErrBadDiff, p.i+1)
		case binaryLine.MatchString(l):
			// diff -r's note for a binary file, outside git's headers:
			// patch skips it, but the fix does change that file.
			m := binaryLine.FindStringSubmatch(l)
			f = &File{Binary: true}
			if f.Old, err = binaryName(m[1]); err == nil {
				f.New, err = binaryName(m[2])
			}
			if err != nil {
				return nil, fmt.Errorf("%w: line %d: %w", ErrBadDiff, p.i+1, err)
			}
			p.i++
		case hunkHeader.MatchString(l):
			// patch would look for the file elsewhere; a damaged diff
			// (a hunk cut off its header) must not lose a hunk silently.
			return nil, fmt.Errorf("%w: line %d: hunk %q outside any file (no '---' and '+++' lines before it, or the hunk before it is longer than its header says)", ErrBadDiff, p.i+1, l)
		default:
			p.i++
			continue
		}
		if err != nil {
			return nil, err
		}
		if first < 0 {
			first = start
		}
		p.end = p.i
		d.Files = append(d.Files, *f)
	}
	if len(d.Files) == 0 {
		return nil, fmt.Errorf("%w: no file in it: want '--- a/FILE', '+++ b/FILE' and '@@' hunk lines (git diff, diff -u)", ErrBadDiff)
	}
	d.Preamble = p.lines[:first]
	return d, nil
}

// splitLines splits text into lines without their ends. Like patch, a
// CRLF diff (its first line ends in CR LF) loses the CR of every line.
func splitLines(s string) []string {
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return nil
	}
	lines := strings.Split(s, "\n")
	if strings.HasSuffix(lines[0], "\r") {
		for i, l := range lines {
			lines[i] = strings.TrimSuffix(l, "\r")
		}
	}
	return lines
}

type parser struct {
	lines []string
	i     int
	end   int // the line after the last file parsed
}

func (p *parser) at(i int, prefix string) bool {
	return i < len(p.lines) && strings.HasPrefix(p.lines[i], prefix)
}

// plainFile reads "--- OLD", "+++ NEW" and the hunks after them.
func (p *parser) plainFile() (*File, error) {
	f := &File{}
	if err := p.names(f); err != nil {
		return nil, err
	}
	if f.Old != "" && f.New != "" && f.Old != f.New {
		return nil, fmt.Errorf("%w: line %d: '---' names %s and '+++' names %s: after stripping one component (patch -p1) both must name the same file", ErrBadDiff, p.i-1, f.Old, f.New)
	}
	if err := p.hunks(f); err != nil {
		return nil, err
	}
	if len(f.Hunks) == 0 {
		return nil, fmt.Errorf("%w: %s: no '@@' hunk after its '---' and '+++' lines", ErrBadDiff, f.Path())
	}
	return f, nil
}

// names reads the "--- " and "+++ " lines at p.i into f.Old and f.New.
func (p *parser) names(f *File) error {
	var err error
	if f.Old, err = HeaderPath(p.lines[p.i][4:]); err != nil {
		return fmt.Errorf("%w: line %d: %w", ErrBadDiff, p.i+1, err)
	}
	if f.New, err = HeaderPath(p.lines[p.i+1][4:]); err != nil {
		return fmt.Errorf("%w: line %d: %w", ErrBadDiff, p.i+2, err)
	}
	if f.Old == "" && f.New == "" {
		return fmt.Errorf("%w: line %d: both '---' and '+++' are /dev/null", ErrBadDiff, p.i+1)
	}
	p.i += 2
	return nil
}

// gitFile reads a git file: "diff --git", its extended headers, and the
// "---"/"+++" lines and hunks when the change is to the text.
func (p *parser) gitFile() (*File, error) {
	hdr := p.i + 1
	f := &File{}
	names, err := gitNames(p.lines[p.i][len("diff --git "):])
	if err != nil {
		return nil, fmt.Errorf("%w: line %d: %w", ErrBadDiff, hdr, err)
	}
	var created, deleted bool
	var from, to string
	p.i++
headers:
	for p.i < len(p.lines) {
		l := p.lines[p.i]
		if strings.HasPrefix(l, "--- ") || strings.HasPrefix(l, "diff ") || strings.HasPrefix(l, "@@ ") {
			break
		}
		key, val, _ := strings.Cut(l, " ")
		switch {
		case l == "GIT binary patch":
			f.Binary = true
			// base85 lines and "literal"/"delta" lines, up to the next file
			for p.i++; p.i < len(p.lines) && !strings.HasPrefix(p.lines[p.i], "diff --git "); p.i++ {
			}
			p.i--
		case strings.HasPrefix(l, "Binary files ") && strings.HasSuffix(l, " differ"):
			f.Binary = true
		case key == "old" && strings.HasPrefix(val, "mode "):
			f.OldMode = val[len("mode "):]
		case key == "new" && strings.HasPrefix(val, "mode "):
			f.NewMode = val[len("mode "):]
		case strings.HasPrefix(l, "new file mode "):
			created, f.NewMode = true, l[len("new file mode "):]
		case strings.HasPrefix(l, "deleted file mode "):
			deleted, f.OldMode = true, l[len("deleted file mode "):]
		case strings.HasPrefix(l, "rename from "), strings.HasPrefix(l, "copy from "):
			from = l[strings.Index(l, "from ")+5:]
			f.Rename, f.Copy = key == "rename", key == "copy"
		case strings.HasPrefix(l, "rename to "), strings.HasPrefix(l, "copy to "):
			to = l[strings.Index(l, "to ")+3:]
		case key == "index", strings.HasPrefix(l, "similarity index "), strings.HasPrefix(l, "dissimilarity index "):
		default:
			break headers // the next file's text, or text after the diff
		}
		p.i++
	}
	if p.at(p.i, "--- ") && p.at(p.i+1, "+++ ") {
		if err := p.names(f); err != nil {
			return nil, err
		}
		if f.Old != "" && f.New != "" && f.Old != f.New && !f.Rename && !f.Copy {
			return nil, fmt.Errorf("%w: line %d: '---' names %s and '+++' names %s, without git's rename or copy lines", ErrBadDiff, p.i-1, f.Old, f.New)
		}
		if err := p.hunks(f); err != nil {
			return nil, err
		}
		if len(f.Hunks) == 0 {
			return nil, fmt.Errorf("%w: %s: no '@@' hunk after its '---' and '+++' lines", ErrBadDiff, f.Path())
		}
		return f, nil
	}
	if p.at(p.i, "@@ ") {
		return nil, fmt.Errorf("%w: line %d: hunk without '---' and '+++' lines before it", ErrBadDiff, p.i+1)
	}
	// No text change: the names come from the rename or copy lines, or
	// else from "diff --git" itself.
	if from != "" || to != "" {
		if f.Old, err = treePath(unquoteIf(from)); err == nil {
			f.New, err = treePath(unquoteIf(to))
		}
		if err != nil {
			return nil, fmt.Errorf("%w: line %d: %w", ErrBadDiff, hdr, err)
		}
	} else {
		if names == nil {
			return nil, fmt.Errorf("%w: line %d: cannot tell the file's name from %q (unquoted names with spaces that differ)", ErrBadDiff, hdr, p.lines[hdr-1])
		}
		f.Old, f.New = names[0], names[1]
	}
	if created {
		f.Old = ""
	}
	if deleted {
		f.New = ""
	}
	return f, nil
}

// gitNames reads "a/X b/Y" of a "diff --git" line, each stripped; nil
// when unquoted names with spaces make the split ambiguous.
func gitNames(s string) ([]string, error) {
	var raw []string
	if strings.HasPrefix(s, `"`) || strings.HasSuffix(s, `"`) {
		rest := s
		for len(raw) < 2 {
			rest = strings.TrimLeft(rest, " ")
			if strings.HasPrefix(rest, `"`) {
				name, n, err := unquoteC(rest)
				if err != nil {
					return nil, err
				}
				raw, rest = append(raw, name), rest[n:]
				continue
			}
			name, after, _ := strings.Cut(rest, " ")
			raw, rest = append(raw, name), after
		}
	} else {
		// Both names are the same file but for the prefix, unless the
		// file was renamed (then "rename from/to" name it).
		mid := len(s) / 2
		if len(s)%2 == 0 || s[mid] != ' ' {
			return nil, nil
		}
		raw = []string{s[:mid], s[mid+1:]}
		_, a, _ := strings.Cut(raw[0], "/")
		_, b, _ := strings.Cut(raw[1], "/")
		if a != b {
			return nil, nil
		}
	}
	out := make([]string, 2)
	for k, r := range raw {
		p, err := StripPath(r)
		if err != nil {
			return nil, err
		}
		out[k] = p
	}
	return out, nil
}

// hunks reads the "@@" hunks at p.i into f, each as long as its header
// says.
func (p *parser) hunks(f *File) error {
	for p.at(p.i, "@@ ") {
		hl := p.i + 1
		m := hunkHeader.FindStringSubmatch(p.lines[p.i])
		if m == nil {
			return fmt.Errorf("%w: %s: line %d: bad hunk header %q", ErrBadDiff, f.Path(), hl, p.lines[p.i])
		}
		h := Hunk{Header: p.lines[p.i]}
		var err error
		for k, v := range []*int{&h.OldStart, &h.OldLines, &h.NewStart, &h.NewLines} {
			s := m[k+1]
			if s == "" {
				*v = 1 // an omitted count is one line
				continue
			}
			if *v, err = strconv.Atoi(s); err != nil || *v > maxLine {
				return fmt.Errorf("%w: %s: line %d: hunk header %q: figure too large", ErrBadDiff, f.Path(), hl, h.Header)
			}
		}
		oldN, newN := h.OldLines, h.NewLines
		p.i++
		for p.i < len(p.lines) && (oldN > 0 || newN > 0) {
			l := p.lines[p.i]
			switch {
			case strings.HasPrefix(l, `\`): // "\ No newline at end of file"
			case strings.HasPrefix(l, "-"):
				oldN--
			case strings.HasPrefix(l, "+"):
				newN--
			case l == "" || strings.HasPrefix(l, " "): // context; mail may drop a blank line's space
				oldN--
				newN--
			default:
				return fmt.Errorf("%w: %s: line %d: hunk %q ends early, at %q (its header counts %d old and %d new lines)", ErrBadDiff, f.Path(), p.i+1, h.Header, l, h.OldLines, h.NewLines)
			}
			if oldN < 0 || newN < 0 {
				return fmt.Errorf("%w: %s: line %d: hunk %q has more lines than its header counts", ErrBadDiff, f.Path(), p.i+1, h.Header)
			}
			h.Lines = append(h.Lines, l)
			p.i++
		}
		if p.i == len(p.lines) && oldN == newN && oldN > 0 && oldN <= maxChopped {
			// Like patch: blank context lines an editor or mailer cut
			// off the end of the diff.
			for ; oldN > 0; oldN, newN = oldN-1, newN-1 {
				h.Lines = append(h.Lines, "")
			}
		}
		if oldN > 0 || newN > 0 {
			return fmt.Errorf("%w: %s: hunk %q is truncated: %d old and %d new lines missing", ErrBadDiff, f.Path(), h.Header, oldN, newN)
		}
		if p.at(p.i, `\`) {
			h.Lines = append(h.Lines, p.lines[p.i])
			p.i++
		}
		f.Hunks = append(f.Hunks, h)
	}
	return nil
}

// HeaderPath is the tree path of the name on a "--- " or "+++ " line
// (the text after that marker): the name ends at a tab (a timestamp
// follows) or else at the first space, unless it is C-quoted;
// "/dev/null" gives "". The name is stripped as StripPath does.
func HeaderPath(s string) (string, error) {
	var name string
	if strings.HasPrefix(s, `"`) {
		n, _, err := unquoteC(s)
		if err != nil {
			return "", err
		}
		name = n
	} else {
		name, _, _ = strings.Cut(s, "\t")
		name = strings.TrimRight(name, " ")
		if !strings.Contains(s, "\t") {
			name, _, _ = strings.Cut(name, " ")
		}
	}
	if name == "/dev/null" {
		return "", nil
	}
	return StripPath(name)
}

// StripPath turns a name as a diff gives it ("b/fs/x.c", "src/fs/x.c")
// into the path in the tree ("fs/x.c") by removing its first component,
// as patch -p1 does. Names patch would misread or refuse are errors:
// an absolute one (patch -p1 would look for it relative to the tree), one
// with no directory to strip, or one with a ".." component.
func StripPath(name string) (string, error) {
	switch {
	case name == "":
		return "", errors.New("empty file name")
	case strings.ContainsAny(name, "\x00\n"):
		return "", fmt.Errorf("file name %q holds a NUL or newline", name)
	case strings.HasPrefix(name, "/"):
		return "", fmt.Errorf("absolute path %q: patch -p1 would take it as relative to the tree; write it as a/FILE (git diff) or DIR/FILE", name)
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", fmt.Errorf("path %q has a '..' component, which would leave the source tree (patch refuses it too)", name)
		}
	}
	_, rest, ok := strings.Cut(name, "/")
	rest = strings.TrimLeft(rest, "/")
	if !ok || rest == "" {
		return "", fmt.Errorf("path %q has no leading directory to strip (patch -p1 wants a/FILE and b/FILE)", name)
	}
	clean := path.Clean(rest)
	if clean == "." {
		return "", fmt.Errorf("path %q names the tree itself, not a file", name)
	}
	return clean, nil
}

// treePath checks a path git gives without a prefix (rename from/to).
func treePath(p string) (string, error) {
	if p == "" {
		return "", errors.New("empty rename or copy path")
	}
	return StripPath("x/" + p)
}

func unquoteIf(s string) string {
	if strings.HasPrefix(s, `"`) {
		if u, _, err := unquoteC(s); err == nil {
			return u
		}
	}
	return s
}

// unquoteC reads a C-quoted name at the start of s, as git writes names
// with unusual bytes ("a/tab\there.c"), and returns it and how many bytes
// of s it took.
func unquoteC(s string) (string, int, error) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			return b.String(), i + 1, nil
		case c != '\\':
			b.WriteByte(c)
			continue
		}
		i++
		if i >= len(s) {
			break
		}
		switch e := s[i]; e {
		case 'a':
			b.WriteByte('\a')
		case 'b':
			b.WriteByte('\b')
		case 'f':
			b.WriteByte('\f')
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		case 't':
			b.WriteByte('\t')
		case 'v':
			b.WriteByte('\v')
		case '\\', '"':
			b.WriteByte(e)
		case '0', '1', '2', '3':
			if i+2 >= len(s) || !isOctal(s[i+1]) || !isOctal(s[i+2]) {
				return "", 0, fmt.Errorf("quoted name %q: bad octal escape", s)
			}
			b.WriteByte((e-'0')<<6 | (s[i+1]-'0')<<3 | (s[i+2] - '0'))
			i += 2
		default:
			return "", 0, fmt.Errorf("quoted name %q: unknown escape \\%c", s, e)
		}
	}
	return "", 0, fmt.Errorf("quoted name %q has no closing quote", s)
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
