package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kernel"
)

func runBuild(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "build", "FIX... | --stream FILE [--level N]", "Builds a livepatch module per kernel from source fixes (unified diffs against its source, or\n"+
		"directories of variants per kernel series: NAME/6.1.patch, NAME/default.patch). Each kernel's\n"+
		"module and manifest go to OUT/RELEASE/; a kernel that already contains the fixes gets\n"+
		"OUT/RELEASE/NAME.contained.json instead. --cumulative makes the module replace every\n"+
		"livepatch loaded before it (atomic replace); --stream builds a level of a patch stream,\n"+
		"which is such a module carrying every fix of the stream up to that level.")
	var releases stringList
	fs.Var(&releases, "kernel", "kernel release to build for (repeatable; default "+kernel.Default+")")
	all := fs.String("kernels", "", `"all": every kernel ready in the cache or on the system (stitch kernel list)`)
	out := fs.String("o", ".", "output directory: OUT/RELEASE/ per kernel")
	cache := fs.String("cache", kernel.CacheDir(), "cache directory (kernel source, prepared trees, extracted images)")
	var opts build.Options
	fs.StringVar(&opts.Name, "name", "", "module name (default: stitch_<first fix's name>)")
	fs.StringVar(&opts.Description, "description", "", "description (default: the first fix's subject)")
	var cves stringList
	fs.Var(&cves, "cve", "CVE id the fixes address (repeatable; also read from the fixes' headers)")
	fs.StringVar(&opts.Hooks, "hooks", "", "C file of hooks compiled into the module: klp callbacks, shadow variables, data updated in place (docs/fix-author.md)")
	fs.BoolVar(&opts.KeepWork, "keep-tmp", false, "keep the scratch directories and print their paths")
	fs.BoolVar(&opts.Replace, "cumulative", false, "build a cumulative patch: it replaces every livepatch loaded before it (klp atomic replace)")
	streamPath := fs.String("stream", "", "build a level of the patch stream in this file (docs/build.md); no FIX arguments")
	level := fs.Int("level", 0, "with --stream: the level to build (default: the newest)")
	jsonOut := fs.Bool("json", false, "print a JSON report")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case *streamPath != "" && fs.NArg() > 0:
		return usageError{fmt.Errorf("--stream and fixes %s: a stream names its fixes", fs.Arg(0))}
	case *streamPath != "" && opts.Name != "":
		return usageError{fmt.Errorf("--stream and --name: a level's name is the stream's and its number")}
	case *streamPath == "" && *level != 0:
		return usageError{fmt.Errorf("--level without --stream")}
	case *streamPath == "" && fs.NArg() == 0:
		fs.Usage()
		return usageError{fmt.Errorf("no fix given")}
	}
	switch {
	case *all != "" && *all != "all":
		return usageError{fmt.Errorf("--kernels %q: the only value is \"all\"; name single kernels with --kernel", *all)}
	case *all != "" && len(releases) > 0:
		return usageError{fmt.Errorf("--kernels all and --kernel %s: give one or the other", releases[0])}
	}
	opts.Out, opts.CVEs = *out, cves
	var fixes []*build.FixVariants
	if *streamPath != "" {
		s, err := build.ReadStream(*streamPath)
		if err != nil {
			return err
		}
		if *level == 0 {
			*level = s.Levels()
		}
		if fixes, opts.Level, err = s.Level(*level); err != nil {
			return err
		}
		fmt.Fprintf(st.err, "stream %s level %d: %d fix(es)%s\n", s.Name, *level, len(fixes), withdrawnNote(opts.Level.Withdrawn))
	}
	for _, p := range fs.Args() {
		v, err := build.LoadFix(p)
		if err != nil {
			return err
		}
		fixes = append(fixes, v)
	}

	// Every kernel is resolved before anything is built: a typo fails
	// at once, naming the kernels there are.
	var kernels []*kernel.Profile
	if *all != "" {
		ps, err := kernel.List(ctx, *cache)
		if err != nil {
			return err
		}
		if len(ps) == 0 {
			return fmt.Errorf("%w: --kernels all: no kernel is ready in %s or on this system; fetch one with `stitch kernel add RELEASE`", kernel.ErrUnknown, *cache)
		}
		kernels = ps
	} else {
		if len(releases) == 0 {
			releases = stringList{kernel.Default}
		}
		seen := map[string]bool{}
		for _, r := range releases {
			if seen[r] {
				continue
			}
			seen[r] = true
			p, err := kernel.Open(ctx, *cache, r)
			if err != nil {
				return err
			}
			kernels = append(kernels, p)
		}
	}

	progress := io.Writer(st.err)
	if *jsonOut {
		progress = io.Discard
	}
	start := time.Now()
	results, err := build.BuildMany(ctx, kernels, fixes, build.ManyOptions{
		Options: opts, Cache: *cache, Log: st.log,
		Progress: func(s build.KernelStep) { printKernelStep(progress, s, start) },
	})
	if err != nil && len(results) == 0 {
		return err
	}
	codes := make([]int, len(results))
	for i, r := range results {
		if r.Err != nil {
			codes[i] = exitCode(r.Err)
		}
	}
	code := manyExitCode(codes)
	if err != nil { // interrupted after some kernels
		code = exitFailed
	}
	if *jsonOut {
		type kernelJSON struct {
			*build.KernelResult
			Port     string `json:"port"`
			ExitCode int    `json:"exit_code"`
			Error    string `json:"error,omitempty"`
		}
		rep := struct {
			Kernels  []kernelJSON   `json:"kernels"`
			Summary  map[string]int `json:"summary"`
			ExitCode int            `json:"exit_code"`
		}{Summary: map[string]int{}, ExitCode: code}
		for i, r := range results {
			k := kernelJSON{KernelResult: r, Port: r.PortSummary(), ExitCode: codes[i]}
			if r.Err != nil {
				k.Error = r.Err.Error()
			}
			rep.Kernels = append(rep.Kernels, k)
			rep.Summary[string(r.Outcome)]++
		}
		if perr := printJSON(st.out, rep); perr != nil {
			return perr
		}
	} else {
		printBuildTable(st.out, results)
		for _, r := range results {
			if r.Err != nil && (strings.Contains(r.Err.Error(), "\n") || len([]rune(r.Reason)) > maxReason) {
				fmt.Fprintf(st.err, "\n%s: %v\n", r.Release, r.Err)
			}
		}
	}
	if err != nil {
		return err
	}
	if code != exitOK {
		return silentExit{code}
	}
	return nil
}

// printKernelStep prints a many-kernel build's progress: a heading per
// kernel, then its steps.
func printKernelStep(w io.Writer, s build.KernelStep, start time.Time) {
	switch {
	case s.Name == "prepare" && !s.Done:
		fmt.Fprintf(w, "[%d/%d] %s\n", s.Index, s.Total, s.Release)
		fmt.Fprintf(w, "%6.1fs %-8s %s\n", time.Since(start).Seconds(), s.Name, s.Detail)
	case s.Name == "kernel":
		fmt.Fprintf(w, "[%d/%d] %s: %s (%.1fs)\n", s.Index, s.Total, s.Release, s.Detail, s.Elapsed.Seconds())
	case s.Done:
		fmt.Fprintf(w, "  done %-8s %s (%.1fs)\n", s.Name, s.Detail, s.Elapsed.Seconds())
	default:
		fmt.Fprintf(w, "%6.1fs %-8s %s\n", time.Since(start).Seconds(), s.Name, s.Detail)
	}
}

// maxReason bounds the reason column; longer ones are printed whole
// after the table.
const maxReason = 160

// printBuildTable prints the summary: kernel, port, result, module or
// reason, time; then the totals.
func printBuildTable(w io.Writer, results []*build.KernelResult) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KERNEL\tPORT\tRESULT\tMODULE OR REASON\tTIME")
	count := map[build.Outcome]int{}
	for _, r := range results {
		what := r.Reason
		switch r.Outcome {
		case build.OutcomeBuilt:
			what = r.Module
			if r.Reason != "" {
				what += " (" + r.Reason + ")"
			}
		case build.OutcomeContained:
			what = r.Contained
		}
		if rs := []rune(what); len(rs) > maxReason {
			what = string(rs[:maxReason]) + "..." // the whole error follows the table
		}
		count[r.Outcome]++
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1fs\n", r.Release, r.PortSummary(), r.Outcome, what, r.Elapsed.Seconds())
	}
	tw.Flush()
	var parts []string
	for _, o := range []build.Outcome{build.OutcomeBuilt, build.OutcomeContained, build.OutcomeNotPorted, build.OutcomeRefused, build.OutcomeFailed} {
		if count[o] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", count[o], o))
		}
	}
	fmt.Fprintf(w, "%d kernel(s): %s\n", len(results), strings.Join(parts, ", "))
	for _, r := range results {
		if len(r.Functions) > 0 {
			fmt.Fprintf(w, "  %s patches %s\n", r.Release, strings.Join(r.Functions, " "))
		}
		if len(r.Callbacks) > 0 {
			fmt.Fprintf(w, "  %s callbacks %s\n", r.Release, strings.Join(r.Callbacks, " "))
		}
		for _, sb := range r.StaticBranches {
			fmt.Fprintf(w, "  %s static branch %s\n", r.Release, sb)
		}
	}
}

// manyExitCode is a many-kernel build's exit code from each kernel's:
// all built or contained (0) is 0; some is exitSomeBuilt; none is the
// kernels' code when they all failed alike, else exitFailed.
func manyExitCode(codes []int) int {
	ok := 0
	for _, c := range codes {
		if c == exitOK {
			ok++
		}
	}
	switch {
	case ok == len(codes):
		return exitOK
	case ok > 0:
		return exitSomeBuilt
	}
	for _, c := range codes[1:] {
		if c != codes[0] {
			return exitFailed
		}
	}
	return codes[0]
}

func withdrawnNote(names []string) string {
	if len(names) == 0 {
		return ""
	}
	return ", withdrawing " + strings.Join(names, ", ")
}
