package corpus

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
)

// FixError is an error a fix caused: the combined build blames exactly
// that fix (Blame), whatever files the message names.
type FixError struct {
	Fix string // the corpus entry's name
	Err error
}

func (e *FixError) Error() string { return e.Fix + ": " + e.Err.Error() }
func (e *FixError) Unwrap() error { return e.Err }

// AppliedIn reads a per-fix result CSV of `stitch corpus --csv` and
// returns the names of the fixes it says were applied end to end: those
// that apply on their own.
func AppliedIn(r io.Reader) ([]string, error) {
	rows, err := csv.NewReader(r).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("corpus results: %w", err)
	}
	if len(rows) == 0 {
		return nil, errors.New("corpus results: empty file (want the CSV `stitch corpus --csv` writes)")
	}
	col := func(name string) int { return slices.Index(rows[0], name) }
	fix, outcome := col("fix"), col("outcome")
	if fix < 0 || outcome < 0 {
		return nil, fmt.Errorf("corpus results: header %q has no fix and outcome columns (want the CSV `stitch corpus --csv` writes)", strings.Join(rows[0], ","))
	}
	var out []string
	for _, row := range rows[1:] {
		if row[outcome] == Applied {
			out = append(out, row[fix])
		}
	}
	return out, nil
}

// Compiler compiles fixes into object pairs: build.TreeSource.CompilePair
// in production.
type Compiler func(ctx context.Context, fixes []*build.Fix) ([]build.Pair, error)

// PairCache compiles each fix's objects (before and after) once and keeps
// them under Dir, so that a level of any subset of the fixes is diffed,
// checked and linked without compiling again: the build of a level of a
// hundred fixes is dominated by compiling, and Combine builds several.
type PairCache struct {
	Dir     string
	Compile Compiler
	// Progress, if set, hears of each compilation.
	Progress func(key string, cached bool, err error)
}

// pairFile is a cached pair on disk.
type pairFile struct {
	Source    string              `json:"source"`
	ViaHeader bool                `json:"via_header,omitempty"`
	Facts     *kbuild.ObjectFacts `json:"facts"`
}

func (c *PairCache) dir(fixes []*build.Fix) string {
	var key []string
	for _, f := range fixes {
		key = append(key, entryName(f))
	}
	return filepath.Join(c.Dir, strings.Join(key, "+"))
}

// Has reports whether the pairs of fixes (compiled together) are cached.
func (c *PairCache) Has(fixes []*build.Fix) bool {
	_, err := os.Stat(filepath.Join(c.dir(fixes), "pairs.json"))
	return err == nil
}

// Put caches the pairs of fixes compiled together.
func (c *PairCache) Put(fixes []*build.Fix, pairs []build.Pair) error {
	return writePairs(c.dir(fixes), pairs)
}

// Pairs compiles fixes together (one fix, or the fixes that change one
// file, in order) or reads them from the cache.
func (c *PairCache) Pairs(ctx context.Context, fixes []*build.Fix) ([]build.Pair, error) {
	dir := c.dir(fixes)
	if pairs, err := readPairs(dir); err == nil {
		c.report(dir, true, nil)
		return pairs, nil
	}
	pairs, err := c.Compile(ctx, fixes)
	c.report(dir, false, err)
	if err != nil {
		return nil, err
	}
	if err := writePairs(dir, pairs); err != nil {
		return nil, err
	}
	return pairs, nil
}

func (c *PairCache) report(dir string, cached bool, err error) {
	if c.Progress != nil {
		c.Progress(filepath.Base(dir), cached, err)
	}
}

func writePairs(dir string, pairs []build.Pair) error {
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	var index []json.RawMessage
	for i, p := range pairs {
		if err := os.WriteFile(filepath.Join(tmp, fmt.Sprintf("%d.pre.o", i)), p.Pre, 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(tmp, fmt.Sprintf("%d.post.o", i)), p.Post, 0o644); err != nil {
			return err
		}
		j, err := json.Marshal(pairFile{Source: p.Source, ViaHeader: p.ViaHeader, Facts: p.Facts})
		if err != nil {
			return err
		}
		index = append(index, j)
	}
	j, err := json.Marshal(index)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "pairs.json"), j, 0o644); err != nil {
		return err
	}
	os.RemoveAll(dir)
	return os.Rename(tmp, dir)
}

func readPairs(dir string) ([]build.Pair, error) {
	b, err := os.ReadFile(filepath.Join(dir, "pairs.json"))
	if err != nil {
		return nil, err
	}
	var index []json.RawMessage
	if err := json.Unmarshal(b, &index); err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	var out []build.Pair
	for i, raw := range index {
		var pf pairFile
		if err := json.Unmarshal(raw, &pf); err != nil {
			return nil, fmt.Errorf("%s: %w", dir, err)
		}
		p := build.Pair{Source: pf.Source, ViaHeader: pf.ViaHeader, Facts: pf.Facts}
		if p.Pre, err = os.ReadFile(filepath.Join(dir, fmt.Sprintf("%d.pre.o", i))); err != nil {
			return nil, err
		}
		if p.Post, err = os.ReadFile(filepath.Join(dir, fmt.Sprintf("%d.post.o", i))); err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// LevelSource is the build.Source of a cumulative level: the union of
// each fix's cached pairs. Fixes that reach one object (two fixes of one
// file, or a header and a file including it) are compiled together, in
// order; when that fails, the later fix is blamed.
type LevelSource struct {
	Cache      *PairCache
	HeadersDir string
}

// Headers is the linux-headers tree modules are linked against.
func (s *LevelSource) Headers() string { return s.HeadersDir }

// CompilePair gives the pairs of the fixes, compiled alone or in groups.
func (s *LevelSource) CompilePair(ctx context.Context, fixes []*build.Fix) ([]build.Pair, error) {
	alone := make([][]build.Pair, len(fixes))
	for i, f := range fixes {
		p, err := s.Cache.Pairs(ctx, []*build.Fix{f})
		if err != nil {
			return nil, &FixError{Fix: entryName(f), Err: err}
		}
		alone[i] = p
	}
	var out []build.Pair
	for _, g := range groups(fixes, alone) {
		if len(g) == 1 {
			out = append(out, alone[g[0]]...)
			continue
		}
		var members []*build.Fix
		var names []string
		for _, i := range g {
			members = append(members, fixes[i])
			names = append(names, entryName(fixes[i]))
		}
		p, err := s.Cache.Pairs(ctx, members)
		if err != nil {
			last := names[len(names)-1]
			return nil, &FixError{Fix: last, Err: fmt.Errorf("does not combine with %s, which reach the same objects: %w", strings.Join(names[:len(names)-1], ", "), err)}
		}
		out = append(out, p...)
	}
	return out, nil
}

// groups joins the fixes (by index) whose pairs share an object, keeping
// each group in the fixes' order; a fix sharing none is a group alone.
func groups(fixes []*build.Fix, pairs [][]build.Pair) [][]int {
	parent := make([]int, len(fixes))
	for i := range parent {
		parent[i] = i
	}
	var find func(int) int
	find = func(i int) int {
		if parent[i] != i {
			parent[i] = find(parent[i])
		}
		return parent[i]
	}
	owner := map[string]int{}
	for i, ps := range pairs {
		for _, p := range ps {
			if j, ok := owner[p.Source]; ok {
				parent[find(i)] = find(j)
			} else {
				owner[p.Source] = i
			}
		}
	}
	byRoot := map[int][]int{}
	var order []int
	for i := range fixes {
		r := find(i)
		if _, ok := byRoot[r]; !ok {
			order = append(order, r)
		}
		byRoot[r] = append(byRoot[r], i)
	}
	out := make([][]int, 0, len(order))
	for _, r := range order {
		out = append(out, byRoot[r])
	}
	return out
}

// entryName is the corpus entry of a fix parsed from NAME.patch.
func entryName(f *build.Fix) string { return strings.TrimSuffix(f.Name, ".patch") }

// CandidatesOf gives the fixes with the files an error may name them by:
// those they change, and the objects of their C files.
func CandidatesOf(fixes []*build.Fix) []Candidate {
	out := make([]Candidate, len(fixes))
	for i, f := range fixes {
		c := Candidate{Name: entryName(f)}
		for _, file := range f.Files {
			c.Files = append(c.Files, file)
			if o, ok := strings.CutSuffix(file, ".c"); ok {
				c.Files = append(c.Files, o+".o")
			}
		}
		out[i] = c
	}
	return out
}

// ReadFixes parses the corpus entries' patches.
func ReadFixes(entries []Entry) ([]*build.Fix, error) {
	var out []*build.Fix
	for _, e := range entries {
		raw, err := os.ReadFile(e.Patch)
		if err != nil {
			return nil, err
		}
		f, err := build.ParseFix(e.Name+".patch", raw)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}
