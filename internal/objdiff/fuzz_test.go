package objdiff

import (
	"os"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
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
	f.Fuzz(func(t *testing.T, raw []byte) {
		post, err := elfobj.Parse(raw)
		if err != nil {
			return
		}
		Diff(pre, post)
		Diff(post, post)
	})
}

// compileFuzzSeeds builds a small fixture pair rich in what the differ
// looks at (line numbers, a bug table, dynamic debug records), small
// enough for the fuzzer to minimise what it finds quickly.
func compileFuzzSeeds(f *testing.F) (pre, post string) {
	return compileCaseTB(f, "line")
}
