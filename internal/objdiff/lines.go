package objdiff

import (
	"debug/dwarf"
	"regexp"
	"strconv"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// lineShifts is the evidence that a source line only moved: for a line of
// a file in the pre-fix build, the line the same code has in the post-fix
// build. It comes from the DWARF line tables of both objects: a line
// table sequence (one per function section) whose rows have the same
// addresses and files as one on the other side is the same code (several
// such pair in the order they come), and its rows pair
// each old line with its new one. An edit above a function (a blank line
// at the top of the file) moves every row below by the same amount; a
// line no code sits on, or that maps to two different lines, gives no
// evidence. Without debugging information nothing counts as only moved.
type lineShifts struct {
	pre, post *elfobj.Object
	loaded    bool
	// moved[old line][file] is the new line, or -1 when rows disagree.
	moved map[int]map[string]int
}

func newLineShifts(pre, post *elfobj.Object) *lineShifts {
	return &lineShifts{pre: pre, post: post}
}

// movedTo says whether the code at line from of file (any file when "")
// is at line to after the fix, to != from.
func (l *lineShifts) movedTo(file string, from, to int) bool {
	if l == nil || from == to || from <= 0 || to <= 0 {
		return false
	}
	if !l.loaded {
		l.load()
	}
	for f, t := range l.moved[from] {
		if t == to && (file == "" || sameSource(f, file)) {
			return true
		}
	}
	return false
}

// sameSource says whether a line table's file name (relative to the
// compilation directory when it was under it) and a name from a string
// (__FILE__, as kbuild passes it) are one file.
func sameSource(table, name string) bool {
	return table == name || strings.HasSuffix(table, "/"+name) || strings.HasSuffix(name, "/"+table)
}

type lineRow struct {
	addr uint64
	file string
	line int
}

func (l *lineShifts) load() {
	l.loaded = true
	l.moved = map[int]map[string]int{}
	a, b := lineSequences(l.pre), lineSequences(l.post)
	// Sequences pair by their addresses and files. Both objects list
	// them in the order the compiler emitted the functions, so several
	// with the same key pair in order, when each side has as many.
	index := func(seqs [][]lineRow) map[string][]int {
		m := map[string][]int{}
		for i, s := range seqs {
			k := seqKey(s)
			m[k] = append(m[k], i)
		}
		return m
	}
	ia, ib := index(a), index(b)
	for k, is := range ia {
		js := ib[k]
		if len(js) != len(is) {
			continue
		}
		for n, i := range is {
			l.pair(a[i], b[js[n]])
		}
	}
}

// pair records what two sequences of the same code say of each line.
func (l *lineShifts) pair(a, b []lineRow) {
	for r := range a {
		from, to, file := a[r].line, b[r].line, a[r].file
		if from <= 0 || to <= 0 {
			continue
		}
		m := l.moved[from]
		if m == nil {
			m = map[string]int{}
			l.moved[from] = m
		}
		if old, seen := m[file]; seen && old != to {
			m[file] = -1
		} else {
			m[file] = to
		}
	}
}

func seqKey(s []lineRow) string {
	var b strings.Builder
	for _, r := range s {
		b.WriteString(strconv.FormatUint(r.addr, 16))
		b.WriteByte(' ')
		b.WriteString(r.file)
		b.WriteByte('\n')
	}
	return b.String()
}

// lineSequences reads an object's line table sequences; none when it has
// no DWARF or the DWARF is corrupt.
func lineSequences(o *elfobj.Object) (seqs [][]lineRow) {
	defer func() {
		// debug/dwarf decodes line programs trusting them; corrupt ones
		// cost the evidence, not the process.
		if recover() != nil {
			seqs = nil
		}
	}()
	d, err := o.DWARF()
	if err != nil {
		return nil
	}
	r := d.Reader()
	for {
		e, err := r.Next()
		if err != nil || e == nil {
			return seqs
		}
		if e.Tag != dwarf.TagCompileUnit {
			r.SkipChildren()
			continue
		}
		dir, _ := e.Val(dwarf.AttrCompDir).(string)
		lr, err := d.LineReader(e)
		r.SkipChildren()
		if err != nil || lr == nil {
			continue
		}
		var seq []lineRow
		for {
			var le dwarf.LineEntry
			if lr.Next(&le) != nil {
				break
			}
			if le.EndSequence {
				seqs = append(seqs, seq)
				seq = nil
				continue
			}
			name := ""
			if le.File != nil {
				name = le.File.Name
				// Both builds compile the same path, but tests build the
				// two versions in two directories.
				if dir != "" {
					name = strings.TrimPrefix(name, strings.TrimSuffix(dir, "/")+"/")
				}
			}
			seq = append(seq, lineRow{addr: le.Address, file: name, line: le.Line})
		}
	}
}

// fileLine finds "FILE.c:LINE" (or .h) in a string literal: what
// __FILE__ ":" __stringify(__LINE__) makes, as the fortified string
// functions' messages do.
var fileLine = regexp.MustCompile(`([A-Za-z0-9_./+-]+\.[ch]):([0-9]{1,7})`)

// literalLinesOnly says whether two string literals differ only in the
// line numbers of "FILE:LINE" places, each moved as the code at that line
// did.
func (l *lineShifts) literalLinesOnly(a, b string) bool {
	ma, mb := fileLine.FindAllStringSubmatchIndex(a, -1), fileLine.FindAllStringSubmatchIndex(b, -1)
	if len(ma) == 0 || len(ma) != len(mb) {
		return false
	}
	moved := false
	pa, pb := 0, 0
	for i := range ma {
		x, y := ma[i], mb[i]
		// Text before the line number (file name included) must agree.
		if a[pa:x[4]] != b[pb:y[4]] {
			return false
		}
		la, _ := strconv.Atoi(a[x[4]:x[5]])
		lb, _ := strconv.Atoi(b[y[4]:y[5]])
		if la != lb {
			if !l.movedTo(a[x[2]:x[3]], la, lb) {
				return false
			}
			moved = true
		}
		pa, pb = x[5], y[5]
	}
	return moved && a[pa:] == b[pb:]
}
