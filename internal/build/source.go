package build

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/kbuild"
)

// TreeSource compiles fixes in a kernel tree prepared like the target's.
type TreeSource struct {
	Tree       *kbuild.Tree
	HeadersDir string // the target's linux-headers tree, for linking
	Work       string // where the pre and post objects go
	// KCFLAGS are the extra compiler flags; kbuild.DiffCFlags if empty.
	// Anything that changes code generation makes run-pre matching fail.
	KCFLAGS string
}

// Headers is the linux-headers tree modules are linked against.
func (s *TreeSource) Headers() string { return s.HeadersDir }

// CompilePair applies the fixes, in order, to copies of the files they
// touch, and compiles each touched C file's object before and after.
func (s *TreeSource) CompilePair(ctx context.Context, fixes []*Fix) ([]Pair, error) {
	var all bytes.Buffer
	for _, f := range fixes {
		all.Write(f.Diff)
		all.WriteByte('\n')
	}
	patched, err := s.Tree.PatchedFiles(ctx, all.Bytes())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadFix, err)
	}
	var sources, headers []string
	for f := range patched {
		switch {
		case strings.HasSuffix(f, ".c"):
			sources = append(sources, f)
		default:
			headers = append(headers, f)
		}
	}
	if len(headers) > 0 {
		sort.Strings(headers)
		return nil, fmt.Errorf("%w: the fix changes %s; fixes to headers are not supported yet: split out the .c changes, or rebuild the kernel", ErrUnpatchable, strings.Join(headers, ", "))
	}
	sort.Strings(sources)
	var pairs []Pair
	for _, src := range sources {
		obj := strings.TrimSuffix(src, ".c") + ".o"
		out := filepath.Join(s.Work, strings.ReplaceAll(strings.TrimSuffix(src, ".c"), "/", "_"))
		flags := s.KCFLAGS
		if flags == "" {
			flags = kbuild.DiffCFlags
		}
		pre, post, err := s.Tree.CompilePair(ctx, obj, src, patched[src], flags, out)
		if err != nil {
			return nil, err
		}
		p := Pair{Source: src}
		if p.Pre, err = os.ReadFile(pre); err != nil {
			return nil, err
		}
		if p.Post, err = os.ReadFile(post); err != nil {
			return nil, err
		}
		pairs = append(pairs, p)
	}
	return pairs, nil
}
