package kbuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/udiff"
)

// Porting a fix to a kernel's source: GNU patch decides, twice. A dry run
// forward says whether the fix applies (cleanly, at other lines, or only
// ignoring context lines); a dry run in reverse says whether the kernel
// already has it. patch runs with --force, which turns off its own guess
// that a patch "looks reversed": both directions are asked explicitly.

var (
	// ErrNoPatchTool means GNU patch is not installed.
	ErrNoPatchTool = errors.New("GNU patch not installed (apt-get install patch)")
	// ErrDoesNotApply means a fix does not apply to the kernel's source;
	// the *PortError it comes in names the failing hunks.
	ErrDoesNotApply = errors.New("the fix does not apply to this kernel's source")
	// ErrContained means the kernel's source already contains the fix
	// (it reverse-applies): there is nothing to patch.
	ErrContained = errors.New("this kernel already contains the fix")
	// ErrBadDiff means the fix is not a diff patch -p1 can apply: the
	// parser (udiff) or patch itself could not read it.
	ErrBadDiff = udiff.ErrBadDiff
)

// PortStatus says how a fix fits one kernel's source.
type PortStatus string

const (
	PortClean     PortStatus = "clean"     // every hunk applies at its own lines
	PortOffset    PortStatus = "offset"    // it applies, some hunks at other lines
	PortFuzz      PortStatus = "fuzz"      // it applies, some hunks only ignoring context lines
	PortContained PortStatus = "contained" // the kernel already has it: it reverse-applies without fuzz
	PortFails     PortStatus = "fails"     // it does not apply (the reason names the hunks)
)

// Applies says whether the fix can be built for the kernel.
func (s PortStatus) Applies() bool { return s == PortClean || s == PortOffset || s == PortFuzz }

// HunkResult is what became of one hunk.
type HunkResult string

const (
	HunkApplies   HunkResult = "applies"   // forward, at Line
	HunkContained HunkResult = "contained" // already in the kernel: reverse-applies at Line
	HunkFails     HunkResult = "fails"     // neither; Line is where patch tried it
)

// Hunk is one hunk of a fix and what patch made of it. Offset and Fuzz
// are patch's own figures for the direction the result names.
type Hunk struct {
	File   string     `json:"file"`
	Number int        `json:"hunk"`   // 1-based within its file, as patch counts
	Header string     `json:"header"` // the @@ line
	Result HunkResult `json:"result"`
	Line   int        `json:"line,omitempty"`
	Offset int        `json:"offset,omitempty"` // lines away from the hunk's own place
	Fuzz   int        `json:"fuzz,omitempty"`   // context lines ignored to make it fit
	// MissingFile: the kernel's source has no such file.
	MissingFile bool `json:"missing_file,omitempty"`
	// Text is a failing hunk's lines as the fix has them (capped).
	Text string `json:"text,omitempty"`
}

// Name is "FILE #N", as messages name a hunk.
func (h Hunk) Name() string { return fmt.Sprintf("%s #%d", h.File, h.Number) }

// Port is how one fix fits one kernel's source.
//
// The rule, when both directions say something:
//   - the fix applies forward and not in reverse: clean, offset or fuzz,
//     by its worst hunk;
//   - it reverse-applies without fuzz (offsets allowed: later changes
//     move lines) and does not apply forward: contained;
//   - it applies both ways: the direction that fits better wins (exact
//     before offset before fuzz); contained needs the reverse run to be
//     free of fuzz; a tie fails, as ambiguous;
//   - neither applies as a whole: fails. When some hunks apply forward
//     and the rest reverse-apply, the kernel has part of the fix (partly
//     contained): that fails too, naming both sets of hunks, since
//     building the rest would patch half a fix.
type Port struct {
	Status PortStatus `json:"status"`
	Hunks  []Hunk     `json:"hunks"`
	Reason string     `json:"reason,omitempty"` // why it fails, naming hunks
}

// Summary is one line for tables and progress: the status, with the hunks
// that moved or fuzzed, or the reason it fails.
func (p *Port) Summary() string {
	switch p.Status {
	case PortOffset, PortFuzz:
		var moved []string
		for _, h := range p.Hunks {
			if h.Offset == 0 && h.Fuzz == 0 {
				continue
			}
			s := h.Name()
			if h.Offset != 0 {
				s += fmt.Sprintf(" %+d", h.Offset)
			}
			if h.Fuzz != 0 {
				s += fmt.Sprintf(" fuzz %d", h.Fuzz)
			}
			moved = append(moved, s)
		}
		return fmt.Sprintf("%s (%s)", p.Status, strings.Join(moved, ", "))
	case PortContained:
		return "already contained"
	case PortFails:
		return "fails: " + p.Reason
	}
	return string(p.Status)
}

// PortError is a fix that cannot be built for a kernel because of its
// port: it does not apply (ErrDoesNotApply) or is already contained
// (ErrContained).
type PortError struct {
	Release string
	Port    *Port
}

func (e *PortError) Error() string {
	if e.Port.Status == PortContained {
		return fmt.Sprintf("%s: %v (the fix reverse-applies)", e.Release, ErrContained)
	}
	return fmt.Sprintf("%s: %v: %s", e.Release, ErrDoesNotApply, e.Port.Reason)
}

func (e *PortError) Unwrap() error {
	if e.Port.Status == PortContained {
		return ErrContained
	}
	return ErrDoesNotApply
}

// Port says how the fix (a unified diff, paths a/... b/...) fits the
// tree's source, without changing the tree.
func (t *Tree) Port(ctx context.Context, diff []byte) (*Port, error) {
	p, _, err := t.port(ctx, diff, false)
	return p, err
}

// PortOnto says how the fix fits the tree's source once base (the fixes
// before it in a series, a unified diff too) is applied: a fix written
// on top of another one, whose context holds the other's new lines. base
// must apply; the tree is not changed.
func (t *Tree) PortOnto(ctx context.Context, base, diff []byte) (*Port, error) {
	tmp, _, err := t.copySources(ctx, append(append(slices.Clip(base), '\n'), diff...))
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	secs, err := parseDiff(base)
	if err != nil {
		return nil, err
	}
	if _, _, err := portCopies(ctx, tmp, t.Release, secs, base, true); err != nil {
		return nil, fmt.Errorf("the fixes before it: %w", err)
	}
	if secs, err = parseDiff(diff); err != nil {
		return nil, err
	}
	p, _, err := portCopies(ctx, tmp, t.Release, secs, diff, false)
	return p, err
}

// PatchedFiles ports a unified diff (paths a/... b/..., as in git and the
// fix corpus) to the tree and, when it applies, returns the new contents
// of the files it touches by path relative to the tree, and the port it
// made (offsets and fuzz included). The tree itself is not modified. A
// fix that does not apply, or that the tree already contains, returns
// its port and a *PortError.
func (t *Tree) PatchedFiles(ctx context.Context, diff []byte) (map[string][]byte, *Port, error) {
	p, files, err := t.port(ctx, diff, true)
	return files, p, err
}

// PortDir is Port on a directory of kernel source that need not be a
// prepared tree: only the files the fix touches are read.
func PortDir(ctx context.Context, dir string, diff []byte) (*Port, error) {
	p, _, err := portFiles(ctx, dir, "", diff, false)
	return p, err
}

func (t *Tree) port(ctx context.Context, diff []byte, apply bool) (*Port, map[string][]byte, error) {
	tmp, secs, err := t.copySources(ctx, diff)
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(tmp)
	return portCopies(ctx, tmp, t.Release, secs, diff, apply)
}

// copySources copies the files diff touches from the tree into a new
// temporary directory, which the caller removes. The files are copied
// under the tree's lock, so that a build in another process, which swaps
// a patched file in, is never seen.
func (t *Tree) copySources(ctx context.Context, diff []byte) (string, []udiff.File, error) {
	unlock, err := t.lock(ctx)
	if err != nil {
		return "", nil, err
	}
	defer unlock()
	tmp, err := os.MkdirTemp("", "stitch-port-")
	if err != nil {
		return "", nil, err
	}
	if err := t.restoreSwapped(); err != nil {
		os.RemoveAll(tmp)
		return "", nil, err
	}
	secs, err := copyTouched(t.Dir, tmp, diff)
	if err != nil {
		os.RemoveAll(tmp)
		return "", nil, err
	}
	return tmp, secs, nil
}

func portFiles(ctx context.Context, dir, release string, diff []byte, apply bool) (*Port, map[string][]byte, error) {
	tmp, err := os.MkdirTemp("", "stitch-port-")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(tmp)
	secs, err := copyTouched(dir, tmp, diff)
	if err != nil {
		return nil, nil, err
	}
	return portCopies(ctx, tmp, release, secs, diff, apply)
}

// copyTouched parses diff and copies the files it touches (those that
// exist) from dir into tmp.
func copyTouched(dir, tmp string, diff []byte) ([]udiff.File, error) {
	secs, err := parseDiff(diff)
	if err != nil {
		return nil, err
	}
	for _, s := range secs {
		for _, f := range []string{s.Old, s.New} {
			if f == "" {
				continue
			}
			dst := filepath.Join(tmp, f)
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return nil, err
			}
			if err := copyFile(filepath.Join(dir, f), dst); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
		}
	}
	return secs, nil
}

// portCopies runs patch in tmp: in reverse (dry) on the pristine copies,
// then forward (for real when apply, to read the result).
func portCopies(ctx context.Context, tmp, release string, secs []udiff.File, diff []byte, apply bool) (*Port, map[string][]byte, error) {
	rev, err := runPatch(ctx, tmp, diff, true, true)
	if err != nil {
		return nil, nil, err
	}
	fwd, err := runPatch(ctx, tmp, diff, false, !apply)
	if err != nil {
		return nil, nil, err
	}
	p := decide(secs, fwd, rev)
	if !p.Status.Applies() {
		return p, nil, &PortError{Release: release, Port: p}
	}
	if !apply {
		return p, nil, nil
	}
	out := map[string][]byte{}
	for _, s := range secs {
		if s.New == "" || len(s.Hunks) == 0 {
			continue // deleted, or no text change (mode, rename, binary)
		}
		b, err := os.ReadFile(filepath.Join(tmp, s.New))
		if err != nil {
			return nil, nil, fmt.Errorf("read patched %s: %w", s.New, err)
		}
		out[s.New] = b
	}
	return p, out, nil
}

// runPatch runs GNU patch on dir and parses what it says of each file.
func runPatch(ctx context.Context, dir string, diff []byte, reverse, dry bool) ([]patchedFile, error) {
	if _, err := exec.LookPath("patch"); err != nil {
		return nil, ErrNoPatchTool
	}
	args := []string{"-p1", "--force", "--no-backup-if-mismatch", "--reject-file=-", "-d", dir}
	if reverse {
		args = append(args, "--reverse")
	}
	if dry {
		args = append(args, "--dry-run")
	}
	cmd := exec.CommandContext(ctx, "patch", args...)
	// patch's messages are parsed: they must be the untranslated ones.
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.Stdin = bytes.NewReader(diff)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil, errors.As(err, &exit) && exit.ExitCode() == 1: // 1: some hunks failed
	case errors.As(err, &exit) && exit.ExitCode() == 2:
		return nil, fmt.Errorf("%w: patch says: %s", ErrBadDiff, lastLines(string(out), 5))
	default:
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("run patch: %w\n%s", err, lastLines(string(out), 5))
	}
	return parsePatchOutput(string(out)), nil
}

// direction is one patch run's outcome for one hunk.
type direction struct {
	ok           bool
	line         int
	offset, fuzz int
	missing      bool
}

// quality orders outcomes: 0 exact, 1 offset, 2 fuzz, 3 fails.
func (d direction) quality() int {
	switch {
	case !d.ok:
		return 3
	case d.fuzz > 0:
		return 2
	case d.offset != 0:
		return 1
	}
	return 0
}

// outcomes matches patch's report to the diff's hunks. Patch reports the
// files in the diff's order and says nothing of a hunk that applied at
// its own line.
func outcomes(secs []udiff.File, files []patchedFile, reverse bool) [][]direction {
	res := make([][]direction, len(secs))
	next := 0
	reports := make([]*patchedFile, len(secs))
	for i := range files {
		f := &files[i]
		j := next
		if f.Name != "" {
			for k := next; k < len(secs); k++ {
				if secs[k].Old == f.Name || secs[k].New == f.Name {
					j = k
					break
				}
			}
		}
		if j >= len(secs) {
			break
		}
		reports[j] = f
		next = j + 1
	}
	for i, s := range secs {
		res[i] = make([]direction, len(s.Hunks))
		r := reports[i]
		for k, h := range s.Hunks {
			own := h.OldStart
			if reverse {
				own = h.NewStart
			}
			switch {
			case r == nil:
				res[i][k] = direction{} // patch never reached it
			case r.Missing:
				res[i][k] = direction{missing: true}
			default:
				o, said := r.Hunks[k+1]
				switch {
				case !said:
					res[i][k] = direction{ok: true, line: own}
				case o.Failed:
					res[i][k] = direction{line: o.Line}
				default:
					res[i][k] = direction{ok: true, line: o.Line, offset: o.Offset, fuzz: o.Fuzz}
				}
			}
		}
	}
	return res
}

// maxHunkText caps the text of a failing hunk in a port report.
const maxHunkText = 4096

// decide applies Port's rule to patch's reports of both runs.
func decide(secs []udiff.File, fwdFiles, revFiles []patchedFile) *Port {
	fwd := outcomes(secs, fwdFiles, false)
	rev := outcomes(secs, revFiles, true)
	fq, rq := 0, 0
	p := &Port{}
	type pair struct {
		h        Hunk
		fwd, rev direction
		file     int // in secs
	}
	var all []pair
	for i, s := range secs {
		for k, h := range s.Hunks {
			f, r := fwd[i][k], rev[i][k]
			fq, rq = max(fq, f.quality()), max(rq, r.quality())
			name := s.New
			if name == "" {
				name = s.Old
			}
			all = append(all, pair{Hunk{File: name, Number: k + 1, Header: h.Header, MissingFile: f.missing && r.missing}, f, r, i})
		}
	}
	with := func(h Hunk, res HunkResult, d direction) Hunk {
		h.Result, h.Line, h.Offset, h.Fuzz = res, d.line, d.offset, d.fuzz
		return h
	}
	switch {
	case len(all) == 0:
		p.Status, p.Reason = PortFails, "the fix has no hunks"
		return p
	case fq < 3 && (rq == 3 || fq < rq):
		p.Status = []PortStatus{PortClean, PortOffset, PortFuzz}[fq]
		for _, a := range all {
			p.Hunks = append(p.Hunks, with(a.h, HunkApplies, a.fwd))
		}
		return p
	case rq <= 1 && (fq == 3 || rq < fq):
		p.Status = PortContained
		for _, a := range all {
			p.Hunks = append(p.Hunks, with(a.h, HunkContained, a.rev))
		}
		return p
	}
	p.Status = PortFails
	var applies, contained, fails []string
	for _, a := range all {
		var h Hunk
		switch {
		case a.fwd.ok:
			h = with(a.h, HunkApplies, a.fwd)
			applies = append(applies, h.Name())
		case a.rev.ok:
			h = with(a.h, HunkContained, a.rev)
			contained = append(contained, h.Name())
		default:
			h = with(a.h, HunkFails, a.fwd)
			h.Text = hunkText(secs[a.file], a.h.Number-1)
			s := fmt.Sprintf("%s (%s) FAILED", h.Name(), h.Header)
			if h.MissingFile {
				s = fmt.Sprintf("%s: no such file in this kernel's source", h.Name())
			} else if h.Line > 0 {
				s += fmt.Sprintf(" at %d", h.Line)
			}
			fails = append(fails, s)
		}
		p.Hunks = append(p.Hunks, h)
	}
	switch {
	case fq < 3 && rq < 3:
		p.Reason = fmt.Sprintf("it applies both forward and in reverse, equally well (%s): cannot tell whether this kernel already has it; port it by hand", []string{"exactly", "with offsets", "with fuzz"}[fq])
	case rq == 2:
		p.Reason = "it does not apply, and reverse-applies only with fuzz: this kernel may contain the fix in another form; check by hand"
	case len(fails) == 0:
		p.Reason = fmt.Sprintf("partly contained: %s already in this kernel, %s not: give a variant of the fix for this kernel's series", strings.Join(contained, ", "), strings.Join(applies, ", "))
	case len(contained) > 0:
		p.Reason = fmt.Sprintf("%s; and %s already in this kernel (partly contained)", strings.Join(fails, "; "), strings.Join(contained, ", "))
	default:
		p.Reason = strings.Join(fails, "; ")
	}
	return p
}
