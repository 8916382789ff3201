package kbuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
)

var (
	// ErrNoSource means the kernel's source package is not in the cache
	// (`stitch kernel add` fetches it) or none was named.
	ErrNoSource = errors.New("kernel source not available")
	// ErrCompiler means the installed compiler is not the one the kernel
	// was built with; objects would not match the running code.
	ErrCompiler = errors.New("compiler does not match the kernel's")
	// ErrBuild means kbuild failed; the error quotes its last lines.
	ErrBuild = errors.New("kernel build failed")
)

// TreeOptions say which tree to prepare and where; a kernel profile
// (internal/kernel) gives the release, source, deb and config.
type TreeOptions struct {
	Release string         // e.g. 6.1.0-54-amd64
	Source  kernel.Package // the kernel's exact source package (linux-source-6.1)
	Deb     string         // its .deb; default Cache/debs/ and its file name
	Cache   string         // default kernel.CacheDir()
	Config  string         // the kernel's configuration (config-<release>)
	Jobs    int            // make -j; default 2
	Log     *slog.Logger   // default: discard
	// Progress receives kbuild's output as it runs; default: discarded.
	Progress io.Writer
}

// OptionsFor is TreeOptions for a kernel profile: its release, exact
// source and that source's .deb, and its config. Cache, Jobs and the
// output are the caller's.
func OptionsFor(p *kernel.Profile) TreeOptions {
	return TreeOptions{
		Release: p.Release,
		Source:  p.Source,
		Deb:     p.SourceDeb,
		Config:  p.Config,
	}
}

// Tree is a kernel source tree configured and prepared exactly like a
// distro kernel, in which single objects can be compiled.
type Tree struct {
	Release string
	Dir     string // the source tree
	CC      string // the compiler kbuild is told to use (CC=)
	opts    TreeOptions
}

// stamp records a finished preparation and what it was made with.
const stamp = ".stitch-prepared"

// swapJournal names a source file replaced by its patched version; it
// lets the next user restore the tree after a crash.
const swapJournal = ".stitch-swapped"

// PrepareTree returns the prepared tree for the release, unpacking and
// preparing it the first time (about a minute) and reusing it afterwards.
// Concurrent callers, in this process or others, wait for one another.
func PrepareTree(ctx context.Context, o TreeOptions) (*Tree, error) {
	src := o.Source
	if src.Name == "" || src.Version == "" || o.Release == "" {
		return nil, fmt.Errorf("%w: prepare tree: no release or source package given (%q, %+v)", ErrNoSource, o.Release, src)
	}
	if o.Config == "" {
		return nil, fmt.Errorf("%w: prepare tree for %s: no kernel config given", ErrNoSource, o.Release)
	}
	if o.Cache == "" {
		o.Cache = kernel.CacheDir()
	}
	if o.Deb == "" {
		o.Deb = filepath.Join(o.Cache, "debs", kernel.DebName(src.Name, src.Version, "all"))
	}
	if o.Jobs <= 0 {
		o.Jobs = 2
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	config, err := os.ReadFile(o.Config)
	if err != nil {
		return nil, fmt.Errorf("%w: kernel config: %w", ErrNoSource, err)
	}
	cc, err := matchCompiler(ctx, config)
	if err != nil {
		return nil, err
	}
	t := &Tree{Release: o.Release, Dir: kernel.TreeDir(o.Cache, o.Release), CC: cc, opts: o}

	unlock, err := t.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	want := fmt.Sprintf("%s %s\n%s", src.Name, src.Version, kernel.CompilerText(config))
	if got, err := os.ReadFile(filepath.Join(t.Dir, stamp)); err == nil && string(got) == want {
		return t, t.restoreSwapped()
	}
	if _, err := os.Stat(filepath.Join(t.Dir, "Makefile")); err != nil {
		if err := t.unpack(ctx, o.Deb, src); err != nil {
			return nil, err
		}
	}
	if err := t.restoreSwapped(); err != nil {
		return nil, err
	}
	o.Log.Info("preparing kernel tree", "dir", t.Dir, "cc", cc)
	if err := os.WriteFile(filepath.Join(t.Dir, ".config"), config, 0o644); err != nil {
		return nil, err
	}
	if _, err := t.make(ctx, "olddefconfig"); err != nil {
		return nil, err
	}
	if _, err := t.make(ctx, "prepare", "modules_prepare"); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(t.Dir, stamp), []byte(want), 0o644); err != nil {
		return nil, err
	}
	return t, nil
}

// matchCompiler finds the compiler whose `--version` first line is the
// configuration's CONFIG_CC_VERSION_TEXT: the name it starts with
// (gcc-12 on Debian), then plain gcc.
func matchCompiler(ctx context.Context, config []byte) (string, error) {
	text := kernel.CompilerText(config)
	if text == "" {
		return "", fmt.Errorf("%w: the kernel config has no CONFIG_CC_VERSION_TEXT", ErrCompiler)
	}
	first, _, _ := strings.Cut(text, " ")
	var seen []string
	for _, cc := range []string{first, "gcc"} {
		if _, err := exec.LookPath(cc); err != nil {
			continue
		}
		out, err := exec.CommandContext(ctx, cc, "--version").Output()
		if err != nil {
			continue
		}
		line, _, _ := strings.Cut(string(out), "\n")
		if line == text {
			return cc, nil
		}
		seen = append(seen, fmt.Sprintf("%s is %q", cc, line))
	}
	if len(seen) == 0 {
		return "", fmt.Errorf("%w: the kernel was built with %q, which is not installed", ErrCompiler, text)
	}
	return "", fmt.Errorf("%w: the kernel was built with %q but %s; install that exact compiler", ErrCompiler, text, strings.Join(seen, ", "))
}

// lock takes the tree's lock file, waiting while another process holds it.
func (t *Tree) lock(ctx context.Context) (unlock func(), err error) {
	return kernel.Lock(ctx, t.Dir+".lock", t.opts.Log)
}

// unpack extracts the source tarball from the .deb into t.Dir, through a
// temporary directory so that a half-unpacked tree is never used.
func (t *Tree) unpack(ctx context.Context, deb string, src kernel.Package) error {
	if _, err := os.Stat(deb); err != nil {
		return fmt.Errorf("%w: %v (`stitch kernel add %s` fetches it)", ErrNoSource, err, t.Release)
	}
	tmp := t.Dir + ".unpack"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	t.opts.Log.Info("unpacking kernel source", "deb", deb)
	tarball := "./usr/src/" + src.Name + ".tar.xz"
	script := `set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -xOf - "$2" | tar -xJf - -C "$3"`
	cmd := exec.CommandContext(ctx, "bash", "-c", script, "unpack", deb, tarball, tmp)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("unpack %s: %w\n%s", deb, err, lastLines(string(out), 10))
	}
	top := filepath.Join(tmp, src.Name)
	if _, err := os.Stat(filepath.Join(top, "Makefile")); err != nil {
		return fmt.Errorf("%w: %s holds no %s/Makefile", ErrNoSource, deb, src.Name)
	}
	if err := os.RemoveAll(t.Dir); err != nil {
		return err
	}
	return os.Rename(top, t.Dir)
}

// make runs kbuild in the tree and returns its output.
func (t *Tree) make(ctx context.Context, args ...string) (string, error) {
	out, err := t.makeJobs(ctx, t.opts.Jobs, args)
	if err != nil && t.opts.Jobs > 1 && strings.Contains(out, descentRace) {
		// Some directories are listed by two Makefiles (drivers/Makefile
		// names char/ipmi/ and block/aoe/ for link order, as
		// drivers/char and drivers/block do), so a parallel make
		// descends into them twice and two compilers race on one
		// object's dependency file. One job cannot race.
		t.opts.Log.Warn("kbuild raced with itself on an object; building again with one job", "targets", args)
		out, err = t.makeJobs(ctx, 1, args)
	}
	return out, err
}

// descentRace is what kbuild prints when two of its sub-makes build one
// object at once.
const descentRace = "fixdep: error opening file"

func (t *Tree) makeJobs(ctx context.Context, jobs int, args []string) (string, error) {
	all := append([]string{"-C", t.Dir, "CC=" + t.CC, fmt.Sprintf("-j%d", jobs)}, args...)
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "make", all...)
	cmd.Stdout = io.MultiWriter(&out, t.opts.Progress)
	cmd.Stderr = cmd.Stdout
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%w: make %s: %w\n%s", ErrBuild, strings.Join(args, " "), err, lastLines(out.String(), 20))
	}
	return out.String(), nil
}

// DiffCFlags are the flags that give every function and data object its
// own section, which the differ needs.
const DiffCFlags = "-ffunction-sections -fdata-sections"

// CompileObject builds one object of the tree (relpath like
// fs/proc/cmdline.o) with KCFLAGS=kcflags (DiffCFlags if empty) and
// returns its path. The file is overwritten by the next compilation of
// the same object.
func (t *Tree) CompileObject(ctx context.Context, relpath, kcflags string) (string, error) {
	unlock, err := t.lock(ctx)
	if err != nil {
		return "", err
	}
	defer unlock()
	if err := t.restoreSwapped(); err != nil {
		return "", err
	}
	return t.compile(ctx, relpath, kcflags)
}

func (t *Tree) compile(ctx context.Context, relpath, kcflags string) (string, error) {
	if !strings.HasSuffix(relpath, ".o") || filepath.IsAbs(relpath) || strings.Contains(relpath, "..") {
		return "", fmt.Errorf("compile %q: want a relative path to an object, like fs/proc/cmdline.o", relpath)
	}
	if kcflags == "" {
		kcflags = DiffCFlags
	}
	obj := filepath.Join(t.Dir, relpath)
	// Always rebuild: kbuild would not notice a changed KCFLAGS.
	if err := os.Remove(obj); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if _, err := t.make(ctx, "KCFLAGS="+kcflags, relpath); err != nil {
		return "", err
	}
	if _, err := os.Stat(obj); err != nil {
		return "", fmt.Errorf("%w: make %s made no object: %w", ErrBuild, relpath, err)
	}
	return obj, nil
}

// CompilePair builds object relpath twice, from the pristine tree and with
// source file src (relative to the tree) replaced by patched, and copies
// both objects into outDir/pre and outDir/post. The tree is restored
// afterwards, also when the build fails.
func (t *Tree) CompilePair(ctx context.Context, relpath, src string, patched []byte, kcflags, outDir string) (pre, post string, err error) {
	unlock, err := t.lock(ctx)
	if err != nil {
		return "", "", err
	}
	defer unlock()
	if err := t.restoreSwapped(); err != nil {
		return "", "", err
	}
	keep := func(obj, which string) (string, error) {
		dst := filepath.Join(outDir, which, filepath.Base(relpath))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return "", err
		}
		return dst, copyFile(obj, dst)
	}
	obj, err := t.compile(ctx, relpath, kcflags)
	if err != nil {
		return "", "", err
	}
	if pre, err = keep(obj, "pre"); err != nil {
		return "", "", err
	}
	if err := t.swap(src, patched); err != nil {
		return "", "", err
	}
	defer func() {
		if rerr := t.restoreSwapped(); rerr != nil && err == nil {
			err = rerr
		}
		// The object in the tree is the patched one: make the next
		// build redo it from the restored source.
		os.Remove(filepath.Join(t.Dir, relpath))
	}()
	if obj, err = t.compile(ctx, relpath, kcflags); err != nil {
		return "", "", fmt.Errorf("patched %s: %w", src, err)
	}
	if post, err = keep(obj, "post"); err != nil {
		return "", "", err
	}
	return pre, post, nil
}

// swap saves the original of src next to the tree, records it in the
// journal, and writes the patched contents.
func (t *Tree) swap(src string, patched []byte) error {
	path := filepath.Join(t.Dir, src)
	if filepath.IsAbs(src) || strings.Contains(src, "..") {
		return fmt.Errorf("source %q is not a path inside the tree", src)
	}
	if err := copyFile(path, path+".stitch-orig"); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(t.Dir, swapJournal), []byte(src), 0o644); err != nil {
		return err
	}
	return os.WriteFile(path, patched, 0o644)
}

// restoreSwapped puts back a source file a swap replaced, if any.
func (t *Tree) restoreSwapped() error {
	journal := filepath.Join(t.Dir, swapJournal)
	b, err := os.ReadFile(journal)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	// One file a line: CompilePairs swaps several.
	for _, src := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if src == "" {
			continue
		}
		path := filepath.Join(t.Dir, src)
		if err := os.Rename(path+".stitch-orig", path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("restore %s: %w", path, err)
		}
		// Newer than any object built from the patched version, so that
		// make rebuilds those.
		now := time.Now()
		if err := os.Chtimes(path, now, now); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return os.Remove(journal)
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

// CompileDir builds every object of a directory of the tree (reldir like
// net/ipv4) with KCFLAGS=kcflags (DiffCFlags if empty) and returns the
// paths of the objects compiled from C files there, sorted.
func (t *Tree) CompileDir(ctx context.Context, reldir, kcflags string) ([]string, error) {
	if filepath.IsAbs(reldir) || strings.Contains(reldir, "..") {
		return nil, fmt.Errorf("compile %q: want a directory inside the tree", reldir)
	}
	if kcflags == "" {
		kcflags = DiffCFlags
	}
	unlock, err := t.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := t.restoreSwapped(); err != nil {
		return nil, err
	}
	if _, err := t.make(ctx, "KCFLAGS="+kcflags, strings.TrimSuffix(reldir, "/")+"/"); err != nil {
		return nil, err
	}
	srcs, err := filepath.Glob(filepath.Join(t.Dir, reldir, "*.c"))
	if err != nil {
		return nil, err
	}
	var objs []string
	for _, src := range srcs {
		obj := strings.TrimSuffix(src, ".c") + ".o"
		if _, err := os.Stat(obj); err == nil && !strings.HasSuffix(src, ".mod.c") {
			objs = append(objs, obj)
		}
	}
	return objs, nil
}
