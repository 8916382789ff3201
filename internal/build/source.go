package build

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/klpmod"
)

// TreeSource compiles fixes in a kernel tree prepared like the target's.
type TreeSource struct {
	Tree       *kbuild.Tree
	HeadersDir string // the target's linux-headers tree, for linking
	Work       string // where the pre and post objects go
	// KCFLAGS are the extra compiler flags; kbuild.DiffCFlags if empty.
	// Anything that changes code generation makes run-pre matching fail.
	KCFLAGS string
	// Port is how the fixes fitted the tree (offsets, fuzz), once
	// CompilePair has run.
	Port *kbuild.Port
}

// Headers is the linux-headers tree modules are linked against.
func (s *TreeSource) Headers() string { return s.HeadersDir }

// CompilePair applies the fixes, in order, to copies of the files they
// touch, and compiles each touched C file's object before and after.
func (s *TreeSource) CompilePair(ctx context.Context, fixes []*Fix) ([]Pair, error) {
	patched, port, err := s.Tree.PatchedFiles(ctx, joinDiffs(fixes))
	s.Port = port
	if errors.Is(err, kbuild.ErrDoesNotApply) || errors.Is(err, kbuild.ErrBadDiff) {
		return nil, fmt.Errorf("%w: %w", ErrBadFix, err)
	}
	if err != nil {
		return nil, err
	}
	var sources, headers []string
	for f := range patched {
		switch {
		case strings.HasSuffix(f, ".c"):
			sources = append(sources, f)
		case strings.HasSuffix(f, ".h"):
			headers = append(headers, f)
		default:
			return nil, fmt.Errorf("%w: the fix changes %s, which is neither C nor a header", ErrUnpatchable, f)
		}
	}
	sort.Strings(sources)
	// Each object is compiled with one changed file swapped in: the C
	// file itself, or the header for the files that include it.
	type job struct{ object, swapped string }
	var jobs []job
	for _, src := range sources {
		jobs = append(jobs, job{src, src})
	}
	for _, h := range headers {
		users, err := s.includers(ctx, h)
		if err != nil {
			return nil, err
		}
		for _, u := range users {
			if _, ok := patched[u]; ok {
				return nil, fmt.Errorf("%w: the fix changes both %s and %s, which includes it; split the fix", ErrUnpatchable, h, u)
			}
			jobs = append(jobs, job{u, h})
		}
	}
	// The fix author's kit (stitch/hooks.h, and the adapters for
	// kpatch's macros) is on the include path: a fix may use it. An
	// include directory changes no code generation.
	kit, err := filepath.Abs(filepath.Join(s.Work, "kit-include"))
	if err != nil {
		return nil, err
	}
	if err := klpmod.WriteIncludes(kit); err != nil {
		return nil, err
	}
	flags := s.KCFLAGS
	if flags == "" {
		flags = kbuild.DiffCFlags
	}
	flags += " -I" + kit
	var pairs []Pair
	for _, j := range jobs {
		obj := strings.TrimSuffix(j.object, ".c") + ".o"
		out := filepath.Join(s.Work, strings.ReplaceAll(strings.TrimSuffix(j.object, ".c"), "/", "_"))
		pre, post, err := s.Tree.CompilePair(ctx, obj, j.swapped, patched[j.swapped], flags, out)
		if err != nil {
			if j.object != j.swapped && errors.Is(err, kbuild.ErrBuild) {
				continue // an includer this configuration does not build
			}
			return nil, err
		}
		facts, err := s.Tree.ObjectFacts(ctx, obj)
		if err != nil {
			return nil, err
		}
		p := Pair{Source: j.object, ViaHeader: j.object != j.swapped, Facts: &facts}
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

// maxIncluders bounds the objects a header fix may reach: past it the
// fix is refused as too broad for a livepatch.
const maxIncluders = 25

// includers finds the C files of this architecture that include header h
// directly. A header that other headers include reaches further than
// Stitch can follow without a full build, so such a fix is refused.
func (s *TreeSource) includers(ctx context.Context, h string) ([]string, error) {
	pattern := includePattern(h)
	cmd := exec.CommandContext(ctx, "grep", "-rlE", "--include=*.c", "--include=*.h", pattern, ".")
	cmd.Dir = s.Tree.Dir
	out, err := cmd.Output()
	if err != nil && len(out) == 0 {
		return nil, fmt.Errorf("%w: no C file of %s includes %s", ErrUnpatchable, s.Tree.Release, h)
	}
	var cs, hs []string
	for _, f := range strings.Fields(string(out)) {
		f = strings.TrimPrefix(f, "./")
		if strings.HasPrefix(f, "arch/") && !strings.HasPrefix(f, "arch/x86/") || strings.HasPrefix(f, "tools/") || strings.HasPrefix(f, "scripts/") {
			continue
		}
		if strings.HasSuffix(f, ".h") {
			hs = append(hs, f)
		} else {
			cs = append(cs, f)
		}
	}
	sort.Strings(cs)
	sort.Strings(hs)
	switch {
	case len(hs) > 0:
		return nil, fmt.Errorf("%w: the fix changes %s, which other headers include (%s): too broad to find every object it reaches; patch the .c files instead", ErrUnpatchable, h, strings.Join(head(hs, 10), ", "))
	case len(cs) > maxIncluders:
		return nil, fmt.Errorf("%w: the fix changes %s, which %d C files include (%s, ...): too broad for a livepatch", ErrUnpatchable, h, len(cs), strings.Join(head(cs, 10), ", "))
	}
	return cs, nil
}

// includePattern matches the #include lines that can name h: by its path
// under include/ or arch/x86/include/, or by its base name for a header
// next to the C file.
func includePattern(h string) string {
	name := h
	for _, dir := range []string{"arch/x86/include/", "include/"} {
		if rest, ok := strings.CutPrefix(h, dir); ok {
			name = rest
			break
		}
	}
	if name == h {
		name = filepath.Base(h)
	}
	return `#[[:space:]]*include[[:space:]]*[<"]` + regexp.QuoteMeta(name) + `[>"]`
}

func head(s []string, n int) []string { return s[:min(n, len(s))] }
