package corpus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Combining fixes into one cumulative level: fixes that each apply on
// their own may still not go together (two fixes of one file whose hunks
// conflict, a combined object that no longer passes run-pre or objdiff's
// rules, a link error). Combine finds those automatically: it builds the
// whole set, and when that fails it drops the fixes the error names, or,
// when the error names none, bisects for the first fix whose addition
// makes the build fail. Every fix dropped is reported with its reason.

// Candidate is a fix offered to a level, with what an error may name it
// by: the files it changes and the objects it compiles to (tree-relative
// paths, like net/sctp/socket.c and net/sctp/socket.o).
type Candidate struct {
	Name  string   `json:"name"`
	Files []string `json:"files"`
}

// Dropped is a fix left out of a level, and why.
type Dropped struct {
	Name string `json:"name"`
	// How it was found: "named" (the error of the combined build names
	// it), "bisect" (the first fix whose addition to those before it
	// makes the build fail) or "alone" (it fails built on its own).
	How    string `json:"how"`
	Reason string `json:"reason"`
}

// Attempt builds a level of the named fixes; nil means it built.
type Attempt func(ctx context.Context, names []string) error

// CombineResult is what Combine found.
type CombineResult struct {
	Kept     []string  `json:"kept"`
	Dropped  []Dropped `json:"dropped,omitempty"`
	Attempts int       `json:"attempts"`
}

// Combine returns the largest set it finds of cands (in their order)
// that builds together, and each fix it left out with its reason. try is
// called with the set to build; the last call that returned nil is the
// kept set's build. An error is returned only when ctx ends.
func Combine(ctx context.Context, cands []Candidate, try Attempt) (*CombineResult, error) {
	res := &CombineResult{}
	set := slices.Clone(cands)
	attempt := func(s []Candidate) error {
		res.Attempts++
		return try(ctx, names(s))
	}
	for len(set) > 0 {
		err := attempt(set)
		if err == nil {
			res.Kept = names(set)
			return res, nil
		}
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		if blamed := Blame(err, set); len(blamed) > 0 && len(blamed) < len(set) || len(set) == 1 {
			if len(set) == 1 {
				blamed = names(set)
			}
			how := "named"
			if len(set) == 1 {
				how = "alone"
			}
			set = drop(set, blamed, how, err, res)
			continue
		}
		// The error names no fix (or every fix): find the first prefix of
		// the set that fails. set[:lo] builds (the empty set trivially),
		// set[:hi] fails.
		lo, hi, last := 0, len(set), err
		for hi-lo > 1 {
			mid := (lo + hi) / 2
			err := attempt(set[:mid])
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			if err == nil {
				lo = mid
				continue
			}
			hi, last = mid, err
			if blamed := Blame(err, set[:mid]); len(blamed) > 0 && len(blamed) < mid {
				break // a smaller set's error names the fix: drop it directly
			}
		}
		if blamed := Blame(last, set[:hi]); len(blamed) > 0 && len(blamed) < hi {
			set = drop(set, blamed, "named", last, res)
			continue
		}
		culprit := set[hi-1]
		how, reason := "bisect", fmt.Sprintf("the level builds with the %d fixes before it and fails with it added: %s", hi-1, oneLine(last))
		if hi == 1 {
			how, reason = "alone", oneLine(last)
		}
		res.Dropped = append(res.Dropped, Dropped{Name: culprit.Name, How: how, Reason: reason})
		set = slices.Delete(set, hi-1, hi)
	}
	return res, nil
}

func drop(set []Candidate, blamed []string, how string, err error, res *CombineResult) []Candidate {
	for _, c := range set {
		if slices.Contains(blamed, c.Name) {
			res.Dropped = append(res.Dropped, Dropped{Name: c.Name, How: how, Reason: reasonFor(err, c)})
		}
	}
	return slices.DeleteFunc(set, func(c Candidate) bool { return slices.Contains(blamed, c.Name) })
}

func names(cs []Candidate) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.Name
	}
	return out
}

// Blame returns the fixes of set that err names: by one of their files
// or objects as a whole path (net/sctp/socket.c names the fix of that
// file; it does not name one of ipv4/socket.c), or by their name.
func Blame(err error, set []Candidate) []string {
	if err == nil {
		return nil
	}
	var fe *FixError
	if errors.As(err, &fe) {
		for _, c := range set {
			if c.Name == fe.Fix {
				return []string{c.Name}
			}
		}
	}
	msg := err.Error()
	var out []string
	for _, c := range set {
		if mentions(msg, c.Name) {
			out = append(out, c.Name)
			continue
		}
		for _, f := range c.Files {
			if mentions(msg, f) {
				out = append(out, c.Name)
				break
			}
		}
	}
	return out
}

// mentions reports whether s holds word with no path or identifier
// character right before or after it.
func mentions(s, word string) bool {
	if word == "" {
		return false
	}
	for i := 0; ; {
		j := strings.Index(s[i:], word)
		if j < 0 {
			return false
		}
		start, end := i+j, i+j+len(word)
		if (start == 0 || !pathChar(s[start-1])) && (end == len(s) || !pathChar(s[end]) || s[end] == '.' && (end+1 == len(s) || !pathChar(s[end+1]))) {
			return true
		}
		i = start + 1
	}
}

func pathChar(b byte) bool {
	return b == '/' || b == '_' || b == '-' || b == '.' || b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z'
}

// reasonFor is the part of err that concerns c: an error naming several
// fixes (objdiff's refusals come one a line, under a heading line) gives
// each its own lines.
func reasonFor(err error, c Candidate) string {
	var fe *FixError
	if errors.As(err, &fe) {
		return oneLine(err)
	}
	lines := strings.Split(err.Error(), "\n")
	var mine []string
	for _, l := range lines[1:] {
		if mentions(l, c.Name) || slices.ContainsFunc(c.Files, func(f string) bool { return mentions(l, f) }) {
			mine = append(mine, l)
		}
	}
	if len(mine) == 0 {
		return oneLine(err)
	}
	return strings.Join(strings.Fields(lines[0]+" "+strings.Join(mine, " ")), " ")
}
