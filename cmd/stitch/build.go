package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
)

func runBuild(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "build", "FIX.patch...", "Builds a livepatch module for one kernel from source fixes (unified diffs against its source).")
	release := fs.String("kernel", kernel.Default, "kernel release to build for (`stitch kernel list` shows those ready)")
	out := fs.String("o", ".", "output directory for the module and its manifest")
	cache := fs.String("cache", kbuild.CacheDir(), "cache directory (kernel source, prepared tree, extracted images)")
	var opts build.Options
	fs.StringVar(&opts.Name, "name", "", "module name (default: stitch_<first fix's name>)")
	fs.StringVar(&opts.Description, "description", "", "description (default: the first fix's subject)")
	var cves stringList
	fs.Var(&cves, "cve", "CVE id the fixes address (repeatable; also read from the fixes' headers)")
	fs.BoolVar(&opts.KeepWork, "keep-tmp", false, "keep the scratch directory and print its path")
	jsonOut := fs.Bool("json", false, "print a JSON report")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return usageError{fmt.Errorf("no fix given")}
	}
	opts.Out, opts.CVEs = *out, cves
	var fixes []*build.Fix
	for _, p := range fs.Args() {
		b, err := os.ReadFile(p)
		if err != nil {
			return usageError{err}
		}
		f, err := build.ParseFix(filepath.Base(p), b)
		if err != nil {
			return err
		}
		fixes = append(fixes, f)
	}

	progress := io.Writer(st.err)
	if *jsonOut {
		progress = io.Discard
	}
	start := time.Now()
	opts.Progress = func(s build.Step) {
		if s.Done {
			fmt.Fprintf(progress, "  done %-8s %s (%.1fs)\n", s.Name, s.Detail, s.Elapsed.Seconds())
		} else {
			fmt.Fprintf(progress, "%6.1fs %-8s %s\n", time.Since(start).Seconds(), s.Name, s.Detail)
		}
	}
	opts.Progress(build.Step{Name: "prepare", Detail: "the " + *release + " source tree (once per release) and the kernel's symbols"})
	p, err := kernel.Open(ctx, *cache, *release)
	if err != nil {
		return err
	}
	env, err := build.OpenEnv(ctx, p, *cache, st.log)
	if err != nil {
		return err
	}
	res, err := env.Build(ctx, fixes, opts)
	if err != nil {
		return err
	}
	if *jsonOut {
		return printJSON(st.out, struct {
			*build.Result
			Manifest *contract.Manifest `json:"manifest_contents"`
		}{res, res.Manifest})
	}
	m := res.Manifest
	var fns []string
	for _, o := range m.Objects {
		for _, f := range o.Functions {
			fns = append(fns, o.Name+":"+f.Name)
		}
	}
	fmt.Fprintf(st.out, "built %s in %.1fs\n  patches  %s\n  kernel   %s (build-id %s)\n  manifest %s\n",
		res.Module, time.Since(start).Seconds(), strings.Join(fns, " "), m.Kernel.Release, m.Kernel.BuildID, res.ManifestPath)
	if res.Work != "" {
		fmt.Fprintf(st.out, "  scratch  %s\n", res.Work)
	}
	return nil
}
