package objdiff

import (
	"os"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
)

// FuzzDiff compares a real object with mutations of its post version:
// whatever the reader accepts, the differ must handle without panicking.
func FuzzDiff(f *testing.F) {
	preFile, postFile := compileFuzzSeeds(f)
	pre, err := elfobj.Open(preFile)
	if err != nil {
		f.Fatal(err)
	}
	raw, err := os.ReadFile(postFile)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(raw)
	// 6.1's layout of the tables the fixtures have, built here: the
	// fuzzer checks the differ, and runs without a kernel image.
	lay := &layout.Layout{Source: "test 6.1", Sections: map[string]layout.Section{
		"__bug_table":  {Name: "__bug_table", Struct: "bug_entry", Entry: 12, Line: layout.Field{Offset: 8, Size: 2}},
		"__mcount_loc": {Name: "__mcount_loc", Entry: 8, Rewrite: 5, Derived: true},
	}}
	f.Fuzz(func(t *testing.T, raw []byte) {
		post, err := elfobj.Parse(raw)
		if err != nil {
			return
		}
		Diff(pre, post, lay)
		Diff(post, post, lay)
	})
}

// compileFuzzSeeds builds a small fixture pair rich in what the differ
// looks at (line numbers, a bug table, dynamic debug records), small
// enough for the fuzzer to minimise what it finds quickly.
func compileFuzzSeeds(f *testing.F) (pre, post string) {
	return compileCaseTB(f, "line")
}
