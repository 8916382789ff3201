package build

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
)

// A Stream is a patch stream: the ordered series of fixes from which
// Stitch builds cumulative levels for a kernel. Level N carries every fix
// added at a level up to N and not withdrawn since, in the order they
// were added, as one module with klp_patch.replace set. On disk it is a
// text file, one change a line:
//
//	# comments and blank lines are ignored
//	stream fleet61
//	1 add fixes/meminfo_a.patch CVE-2099-0101
//	2 add fixes/meminfo_b.patch
//	3 withdraw fixes/meminfo_a.patch
//	3 add fixes/binfmt_misc
//
// The first line names the stream (its levels' modules are NAME_lN);
// every other line is a level, "add" or "withdraw", a fix (a .patch file
// or a directory of variants, relative to the stream file) and, for an
// add, CVE ids to add to those the fix names itself. Levels start at 1,
// never go down and skip none. The file is the one record of which fix
// entered or left at which level: a level is rebuilt from it alone.
type Stream struct {
	Name    string
	Dir     string // the stream file's directory, which fix paths are relative to
	Changes []StreamChange
}

// StreamChange is one line of a stream: a fix added or withdrawn at a
// level.
type StreamChange struct {
	Level    int
	Withdraw bool
	Fix      string // path relative to the stream's directory
	CVEs     []string
	Line     int
}

// Levels is the newest level of the stream.
func (s *Stream) Levels() int {
	if len(s.Changes) == 0 {
		return 0
	}
	return s.Changes[len(s.Changes)-1].Level
}

// ReadStream reads and checks a stream file.
func ReadStream(path string) (*Stream, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: stream: %v", ErrBadFix, err)
	}
	s, err := ParseStream(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s.Dir = filepath.Dir(path)
	return s, nil
}

// ParseStream parses a stream's text (see Stream) and checks it: a fix
// added while it is in, withdrawn while it is out, a level out of order.
func ParseStream(b []byte) (*Stream, error) {
	s := &Stream{}
	bad := func(line int, format string, a ...any) error {
		return fmt.Errorf("%w: stream line %d: %s", ErrBadFix, line, fmt.Sprintf(format, a...))
	}
	in := map[string]bool{}     // fixes carried at the level read so far
	changed := map[string]int{} // the level each fix last changed at
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if s.Name == "" {
			if len(f) != 2 || f[0] != "stream" {
				return nil, bad(n, "want \"stream NAME\" first")
			}
			s.Name = f[1]
			if !contract.ValidStream(s.Name) {
				return nil, bad(n, "stream name %q: want letters, digits and underscores, at most %d", s.Name, 55-len(contract.LevelName("", contract.MaxLevel)))
			}
			continue
		}
		if len(f) < 3 {
			return nil, bad(n, "want LEVEL add|withdraw FIX [CVE...]")
		}
		level, err := strconv.Atoi(f[0])
		prev := s.Levels()
		switch {
		case err != nil || level < 1 || level > contract.MaxLevel:
			return nil, bad(n, "level %q: want 1 to %d", f[0], contract.MaxLevel)
		case level < prev:
			return nil, bad(n, "level %d after level %d: levels never go down", level, prev)
		case level > prev+1:
			return nil, bad(n, "level %d after level %d: level %d has no change", level, prev, prev+1)
		}
		c := StreamChange{Level: level, Fix: filepath.Clean(f[2]), Line: n}
		if changed[c.Fix] == level {
			return nil, bad(n, "%s changes twice at level %d", c.Fix, level)
		}
		changed[c.Fix] = level
		switch f[1] {
		case "add":
			if in[c.Fix] {
				return nil, bad(n, "%s is already in the stream", c.Fix)
			}
			for _, id := range f[3:] {
				if !contract.ValidCVE(id) {
					return nil, bad(n, "%q: want CVE-YYYY-NNNN", id)
				}
			}
			c.CVEs = f[3:]
			in[c.Fix] = true
		case "withdraw":
			if !in[c.Fix] {
				return nil, bad(n, "withdraw %s: not in the stream at level %d", c.Fix, level)
			}
			if len(f) > 3 {
				return nil, bad(n, "withdraw takes a fix and nothing more")
			}
			c.Withdraw = true
			in[c.Fix] = false
		default:
			return nil, bad(n, "%q: want add or withdraw", f[1])
		}
		s.Changes = append(s.Changes, c)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: stream: %v", ErrBadFix, err)
	}
	if s.Name == "" || len(s.Changes) == 0 {
		return nil, fmt.Errorf("%w: stream: no level: want \"stream NAME\" and then \"1 add FIX\"", ErrBadFix)
	}
	return s, nil
}

// LevelFixes are the fixes level n carries, in the order they were
// added, and those level n-1 carried that n withdraws.
func (s *Stream) LevelFixes(n int) (carried []StreamChange, withdrawn []string, err error) {
	if n < 1 || n > s.Levels() {
		return nil, nil, fmt.Errorf("%w: stream %s has levels 1 to %d, not %d", ErrBadFix, s.Name, s.Levels(), n)
	}
	for _, c := range s.Changes {
		if c.Level > n {
			break
		}
		i := slices.IndexFunc(carried, func(k StreamChange) bool { return k.Fix == c.Fix })
		switch {
		case !c.Withdraw:
			carried = append(carried, c)
		case i >= 0:
			carried = slices.Delete(carried, i, i+1)
			if c.Level == n {
				withdrawn = append(withdrawn, c.Fix)
			}
		}
	}
	return carried, withdrawn, nil
}

// Level loads the fixes of level n (see LevelFixes) and says, for the
// manifest, where the level stands: its stream, the level it supersedes,
// the names of the fixes it withdraws. A fix the level carries but that
// is no longer on disk is an error; a withdrawn one need not be there.
func (s *Stream) Level(n int) ([]*FixVariants, *contract.Level, error) {
	carried, withdrawn, err := s.LevelFixes(n)
	if err != nil {
		return nil, nil, err
	}
	l := &contract.Level{Stream: s.Name, Number: n, Supersedes: n - 1}
	for _, w := range withdrawn {
		l.Withdrawn = append(l.Withdrawn, fixName(w))
	}
	var fixes []*FixVariants
	for _, c := range carried {
		v, err := LoadFix(filepath.Join(s.Dir, c.Fix))
		if err != nil {
			return nil, nil, fmt.Errorf("stream %s line %d: %w", s.Name, c.Line, err)
		}
		v.addCVEs(c.CVEs)
		fixes = append(fixes, v)
	}
	return fixes, l, nil
}

// fixName is the name LoadFix gives the fix at path: the file's or the
// directory's.
func fixName(path string) string { return filepath.Base(filepath.Clean(path)) }

// addCVEs adds CVE ids to the fix and each of its variants.
func (v *FixVariants) addCVEs(ids []string) {
	v.CVEs = appendMissing(v.CVEs, ids...)
	if v.Single != nil {
		v.Single.CVEs = appendMissing(v.Single.CVEs, ids...)
	}
	for _, f := range v.Series {
		f.CVEs = appendMissing(f.CVEs, ids...)
	}
}
