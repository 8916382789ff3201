package kbuild

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// PairJob is one object of CompilePairs: Object (like fs/proc/base.o)
// compiled from the pristine tree and with Src replaced by Patched.
type PairJob struct {
	Object  string
	Src     string
	Patched []byte
	// Pre and Post are the objects kept, once CompilePairs has run.
	Pre, Post string
}

// CompilePairs is CompilePair for many objects at once: one make for all
// the pristine objects, then one with every source swapped in. Each make
// of a single object pays kbuild's whole start-up (config checks, tools,
// the descent to the object's directory), which on a loaded machine costs
// more than compiling it; a level of a hundred fixes pays it twice. The
// sources must be distinct. Objects go to outDir/N/{pre,post}; a failure
// of any one fails the whole batch (compile them one by one to learn
// which). The tree is restored afterwards, also when the build fails.
func (t *Tree) CompilePairs(ctx context.Context, jobs []PairJob, kcflags, outDir string) (err error) {
	seen := map[string]bool{}
	var objs []string
	for _, j := range jobs {
		if seen[j.Src] || filepath.IsAbs(j.Src) || strings.Contains(j.Src, "..") {
			return fmt.Errorf("compile pairs: source %q is repeated or not a path inside the tree", j.Src)
		}
		if !strings.HasSuffix(j.Object, ".o") || filepath.IsAbs(j.Object) || strings.Contains(j.Object, "..") {
			return fmt.Errorf("compile pairs: want relative paths to objects, like fs/proc/cmdline.o, not %q", j.Object)
		}
		seen[j.Src] = true
		objs = append(objs, j.Object)
	}
	if kcflags == "" {
		kcflags = DiffCFlags
	}
	unlock, err := t.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if err := t.restoreSwapped(); err != nil {
		return err
	}
	build := func(which string) error {
		for _, o := range objs {
			if err := os.Remove(filepath.Join(t.Dir, o)); err != nil && !os.IsNotExist(err) {
				return err
			}
		}
		if _, err := t.make(ctx, append([]string{"KCFLAGS=" + kcflags}, objs...)...); err != nil {
			return err
		}
		for i := range jobs {
			dst := filepath.Join(outDir, fmt.Sprint(i), which, filepath.Base(jobs[i].Object))
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if err := copyFile(filepath.Join(t.Dir, jobs[i].Object), dst); err != nil {
				return fmt.Errorf("%w: make %s made no object: %w", ErrBuild, jobs[i].Object, err)
			}
			if which == "pre" {
				jobs[i].Pre = dst
			} else {
				jobs[i].Post = dst
			}
		}
		return nil
	}
	if err := build("pre"); err != nil {
		return err
	}
	// Journal every source before swapping any, so that a crash
	// mid-way leaves the tree restorable.
	var srcs []string
	for _, j := range jobs {
		srcs = append(srcs, j.Src)
		path := filepath.Join(t.Dir, j.Src)
		if err := copyFile(path, path+".stitch-orig"); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(t.Dir, swapJournal), []byte(strings.Join(srcs, "\n")), 0o644); err != nil {
		return err
	}
	defer func() {
		if rerr := t.restoreSwapped(); rerr != nil && err == nil {
			err = rerr
		}
		for _, o := range objs {
			os.Remove(filepath.Join(t.Dir, o)) // patched: rebuild from the restored source
		}
	}()
	for _, j := range jobs {
		if err := os.WriteFile(filepath.Join(t.Dir, j.Src), j.Patched, 0o644); err != nil {
			return err
		}
	}
	if err := build("post"); err != nil {
		return fmt.Errorf("patched: %w", err)
	}
	return nil
}
