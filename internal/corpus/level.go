package corpus

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
)

// A cumulative level of a corpus: every fix that applies on its own,
// combined into one module with klp_patch.replace (see Combine), then a
// second level without every tenth of them, which replaces the first.

// LevelStream is the patch stream the corpus levels belong to: level N
// is the module stitch_corpus_lN.
const LevelStream = "stitch_corpus"

// Attempted is one build Combine asked for.
type Attempted struct {
	Fixes   int           `json:"fixes"`
	Elapsed time.Duration `json:"elapsed_ns"`
	Error   string        `json:"error,omitempty"`
}

// LevelBuild is one level as built.
type LevelBuild struct {
	Number  int           `json:"number"`
	Name    string        `json:"name"`
	Module  string        `json:"module"`
	Bytes   int64         `json:"ko_bytes"`
	Objects int           `json:"objects"` // klp objects: vmlinux and modules
	Modules []string      `json:"modules"` // the klp objects that are modules
	Funcs   int           `json:"functions"`
	Fixes   []string      `json:"fixes"`
	Dropped []Dropped     `json:"dropped,omitempty"`
	Elapsed time.Duration `json:"elapsed_ns"` // all attempts, compiling included
	// Compile is the part of Elapsed spent compiling objects (the first
	// level compiles every fix; a later one finds them in the cache).
	Compile  time.Duration `json:"compile_ns"`
	Attempts []Attempted   `json:"attempts"`
	// Withdrawn: fixes of the previous level this one leaves out.
	Withdrawn []string `json:"withdrawn,omitempty"`
	// Files are the source files of its fixes: they pick the workloads.
	Files []string `json:"-"`
}

// LevelBuilder builds levels of corpus fixes for one kernel.
type LevelBuilder struct {
	Env   *build.Env
	Cache *PairCache
	Out   string // levels go to Out/lN
	// Progress hears of each attempt.
	Progress func(level int, a Attempted)
	compile  time.Duration
}

// NewLevelBuilder compiles in env's tree, caching objects under out/objects.
func NewLevelBuilder(env *build.Env, out string, progress func(key string, cached bool, elapsed time.Duration, err error)) *LevelBuilder {
	b := &LevelBuilder{Env: env, Out: out}
	b.Cache = &PairCache{Dir: filepath.Join(out, "objects")}
	b.Cache.Compile = func(ctx context.Context, fixes []*build.Fix) ([]build.Pair, error) {
		scratch := filepath.Join(out, "scratch")
		defer os.RemoveAll(scratch)
		src := &build.TreeSource{Tree: env.Tree, HeadersDir: env.Headers, Work: scratch}
		start := time.Now()
		pairs, err := src.CompilePair(ctx, fixes)
		b.compile += time.Since(start)
		if progress != nil {
			var names []string
			for _, f := range fixes {
				names = append(names, entryName(f))
			}
			progress(fmt.Sprint(names), false, time.Since(start), err)
		}
		return pairs, err
	}
	return b
}

// Build builds level n of the fixes that combine, out of fixes (in
// order); prev is the level it supersedes (nil for the first).
func (b *LevelBuilder) Build(ctx context.Context, n int, fixes []*build.Fix, prev *LevelBuild) (*LevelBuild, error) {
	byName := map[string]*build.Fix{}
	for _, f := range fixes {
		byName[entryName(f)] = f
	}
	lv := &LevelBuild{Number: n, Name: contract.LevelName(LevelStream, n)}
	level := &contract.Level{Stream: LevelStream, Number: n}
	if prev != nil {
		level.Supersedes = prev.Number
		for _, name := range prev.Fixes {
			if byName[name] == nil {
				lv.Withdrawn = append(lv.Withdrawn, name)
				level.Withdrawn = append(level.Withdrawn, name+".patch")
			}
		}
	}
	out := filepath.Join(b.Out, fmt.Sprintf("l%d", n))
	var last *build.Result
	start, compile0 := time.Now(), b.compile
	src := &LevelSource{Cache: b.Cache, HeadersDir: b.Env.Headers}
	try := func(ctx context.Context, names []string) error {
		var set []*build.Fix
		for _, name := range names {
			set = append(set, byName[name])
		}
		t := time.Now()
		res, err := build.Build(ctx, src, b.Env.Kernel, set, build.Options{
			Out: out, Work: filepath.Join(b.Out, "work"), Level: level,
			Description: fmt.Sprintf("Stitch corpus level %d: %d fixes", n, len(set)),
		})
		a := Attempted{Fixes: len(set), Elapsed: time.Since(t)}
		if err != nil {
			a.Error = oneLine(err)
		} else {
			last = res
		}
		lv.Attempts = append(lv.Attempts, a)
		if b.Progress != nil {
			b.Progress(n, a)
		}
		return err
	}
	cr, err := Combine(ctx, CandidatesOf(fixes), try)
	lv.Elapsed, lv.Compile = time.Since(start), b.compile-compile0
	if err != nil {
		return lv, err
	}
	lv.Fixes, lv.Dropped = cr.Kept, cr.Dropped
	if len(cr.Kept) == 0 || last == nil {
		return lv, fmt.Errorf("level %d: no fix combines", n)
	}
	lv.Module = last.Module
	st, err := os.Stat(last.Module)
	if err != nil {
		return lv, err
	}
	lv.Bytes = st.Size()
	for _, o := range last.Manifest.Objects {
		lv.Objects++
		lv.Funcs += len(o.Functions)
		if o.Name != kbuild.Vmlinux {
			lv.Modules = append(lv.Modules, o.Name)
		}
	}
	for _, name := range cr.Kept {
		lv.Files = append(lv.Files, byName[name].Files...)
	}
	return lv, nil
}

// WithoutEvery leaves out every k-th fix (the k-th, 2k-th, ...) of names.
func WithoutEvery(names []string, k int) (kept, left []string) {
	for i, n := range names {
		if k > 0 && (i+1)%k == 0 {
			left = append(left, n)
		} else {
			kept = append(kept, n)
		}
	}
	return kept, left
}

// Pick returns the fixes named, in the order of fixes.
func Pick(fixes []*build.Fix, names []string) []*build.Fix {
	var out []*build.Fix
	for _, f := range fixes {
		if slices.Contains(names, entryName(f)) {
			out = append(out, f)
		}
	}
	return out
}

// Precompile fills the cache for the fixes that change one C file each
// and nothing else, chunk of them at a time, with one make for all
// pristine objects of a chunk and one for all patched ones
// (kbuild.Tree.CompilePairs): on a loaded machine kbuild's start-up costs
// more than compiling an object. A chunk that fails is left to Build,
// which compiles its fixes one by one and so learns which failed.
func (b *LevelBuilder) Precompile(ctx context.Context, fixes []*build.Fix, chunk int, progress func(n int, elapsed time.Duration, err error)) {
	if chunk <= 0 {
		chunk = 20
	}
	// A file two fixes change is compiled once with both: LevelSource
	// does that, not the batches.
	count := map[string]int{}
	for _, f := range fixes {
		for _, file := range f.Files {
			count[file]++
		}
	}
	var todo []*build.Fix
	for _, f := range fixes {
		if len(f.Files) == 1 && strings.HasSuffix(f.Files[0], ".c") && count[f.Files[0]] == 1 && !b.Cache.Has([]*build.Fix{f}) {
			todo = append(todo, f)
		}
	}
	for len(todo) > 0 && ctx.Err() == nil {
		n := min(chunk, len(todo))
		start := time.Now()
		err := b.compileChunk(ctx, todo[:n])
		b.compile += time.Since(start)
		if progress != nil {
			progress(n, time.Since(start), err)
		}
		todo = todo[n:]
	}
}

func (b *LevelBuilder) compileChunk(ctx context.Context, fixes []*build.Fix) error {
	tree := b.Env.Tree
	var jobs []kbuild.PairJob
	var batch []*build.Fix
	for _, f := range fixes {
		patched, _, err := tree.PatchedFiles(ctx, f.Diff)
		if err != nil {
			continue // not ported: Build compiles it alone and reports why
		}
		src := f.Files[0]
		jobs = append(jobs, kbuild.PairJob{Object: strings.TrimSuffix(src, ".c") + ".o", Src: src, Patched: patched[src]})
		batch = append(batch, f)
	}
	fixes = batch
	if len(jobs) == 0 {
		return nil
	}
	scratch := filepath.Join(b.Out, "scratch")
	defer os.RemoveAll(scratch)
	if err := tree.CompilePairs(ctx, jobs, "", scratch); err != nil {
		return err
	}
	for i, j := range jobs {
		facts, err := tree.ObjectFacts(ctx, j.Object)
		if err != nil {
			return err
		}
		p := build.Pair{Source: j.Src, Facts: &facts}
		if p.Pre, err = os.ReadFile(j.Pre); err != nil {
			return err
		}
		if p.Post, err = os.ReadFile(j.Post); err != nil {
			return err
		}
		if err := b.Cache.Put([]*build.Fix{fixes[i]}, []build.Pair{p}); err != nil {
			return err
		}
	}
	return nil
}
