package main

import (
	"context"
	"encoding/csv"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/corpus"
	"github.com/stitchpatch/stitch/internal/kernel"
)

func runCorpus(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "corpus", "DIR", "Builds every fix of a corpus (DIR/index.tsv, DIR/fixes/*.patch) for the kernel, applies each built one in a VM, and reports the share live-patched end to end.")
	release := fs.String("kernel", kernel.Default, "kernel release the fixes are for (`stitch kernel list` shows those ready)")
	filter := fs.String("filter", "", "only fixes whose name matches this regular expression")
	limit := fs.Int("limit", 0, "at most this many fixes (0: all)")
	noVM := fs.Bool("no-vm", false, "build only; do not apply in a VM")
	batch := fs.Int("batch", 8, "fixes applied per VM boot")
	csvPath := fs.String("csv", "", "also write the results as CSV to this file")
	cache := fs.String("cache", kernel.CacheDir(), "cache directory")
	jsonOut := fs.Bool("json", false, "print JSON")
	var lo levelOptions
	fs.BoolVar(&lo.cumulative, "cumulative", false, "build ONE cumulative level of every fix that combines (see --from), apply it in a VM with the patched modules loaded, replace it by a level without every --drop-every'th fix, revert; report what did not combine and why")
	fs.StringVar(&lo.from, "from", "", "with --cumulative: take only the fixes this per-fix result CSV (of --csv) says were applied end to end")
	fs.IntVar(&lo.dropEvery, "drop-every", 10, "with --cumulative: the second level leaves out every N'th fix of the first (0: no second level)")
	fs.StringVar(&lo.out, "out", "", "with --cumulative: directory for the levels and the compiled objects, reused by a later run (a temporary one if empty)")
	fs.IntVar(&lo.chunk, "compile-batch", 20, "with --cumulative: fixes of one C file each compiled per make (kbuild.Tree.CompilePairs)")
	fs.StringVar(&lo.report, "report", "", "with --cumulative: also write the JSON report to this file")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	all, err := corpus.ReadIndex(fs.Arg(0))
	if err != nil {
		return usageError{err}
	}
	entries, err := corpus.Select(all, *filter, *limit)
	if err != nil {
		return usageError{err}
	}
	lo.release, lo.cache, lo.noVM, lo.json = *release, *cache, *noVM, *jsonOut
	if lo.cumulative {
		return runCorpusLevels(ctx, st, entries, lo)
	}
	if lo.from != "" {
		return usageError{fmt.Errorf("--from goes with --cumulative")}
	}
	p, err := kernel.Open(ctx, *cache, *release)
	if err != nil {
		return err
	}
	env, err := build.OpenEnv(ctx, p, *cache, st.log)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "stitch-corpus-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	builder := func(ctx context.Context, fix *build.Fix, hooks, out string) (*build.Result, error) {
		return env.Build(ctx, []*build.Fix{fix}, build.Options{Out: out, Work: filepath.Join(out, "work"), Hooks: hooks})
	}
	// A batch is built, then applied in one VM boot, so results come in
	// as the run goes (the whole corpus takes hours on two cores).
	var results []corpus.Result
	var csvOut *csv.Writer
	if *csvPath != "" {
		f, err := os.Create(*csvPath)
		if err != nil {
			return err
		}
		defer f.Close()
		csvOut = csv.NewWriter(f)
		csvOut.Write(csvHeader)
	}
	n := 0
	for start := 0; start < len(entries) && ctx.Err() == nil; start += *batch {
		chunk := entries[start:min(start+*batch, len(entries))]
		rs := corpus.BuildAll(ctx, chunk, builder, work, func(r corpus.Result) {
			n++ // progress goes to stderr, also with --json
			fmt.Fprintf(st.err, "[%d/%d] built %-40s %-12s %5.1fs %s\n", n, len(entries), r.Name, r.Outcome, r.BuildTime.Seconds(), trim(r.Reason, 100))
		})
		if !*noVM {
			if err := corpus.ApplyAll(ctx, rs, corpus.VMOptions{Kernel: p.BootImage, Modules: p.Modules, Batch: *batch}); err != nil {
				return err
			}
			for _, r := range rs {
				fmt.Fprintf(st.err, "        %-46s %-14s %s\n", r.Name, r.Outcome, trim(r.Reason, 100))
			}
		}
		for _, r := range rs {
			if csvOut != nil {
				csvOut.Write(csvRow(r))
			}
		}
		if csvOut != nil {
			csvOut.Flush()
		}
		results = append(results, rs...)
	}
	sum := corpus.Summarize(results)
	if *jsonOut {
		return printJSON(st.out, struct {
			Date    string          `json:"date"`
			Kernel  string          `json:"kernel"`
			Summary corpus.Summary  `json:"summary"`
			Results []corpus.Result `json:"results"`
		}{time.Now().UTC().Format(time.RFC3339), *release, sum, results})
	}
	tw := tabwriter.NewWriter(st.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FIX\tOBJECT\tFUNCTIONS\tBUILD\tPORT\tRESULT\tREASON")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.1fs\t%s\t%s\t%s\n", r.Name, r.Object, strings.Join(r.Functions, ","), r.BuildTime.Seconds(), r.Port, r.Outcome, trim(r.Reason, 120))
	}
	tw.Flush()
	var parts []string
	for k, v := range sum.Outcomes {
		parts = append(parts, fmt.Sprintf("%s %d", k, v))
	}
	sort.Strings(parts)
	fmt.Fprintf(st.out, "\n%d fixes: %s; live-patched end to end: %.0f%% (%.0f%% of the %d this kernel needs: not contained, changing its code); automatically %.0f%%, with the fix author's hooks %d\n",
		sum.Total, strings.Join(parts, ", "), 100*sum.Share, 100*sum.ShareNeeded, sum.Total-sum.NotNeeded(), 100*sum.ShareAutomatic, sum.WithHooks)
	return nil
}

func runCorpusGuest(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "corpus-guest", "PLAN.json", "The guest side of 'stitch corpus'.")
	levels := fs.Bool("levels", false, "the plan is of cumulative levels (stitch corpus --cumulative)")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	if *levels {
		return corpus.GuestLevels(ctx, fs.Arg(0), st.out)
	}
	return corpus.Guest(ctx, fs.Arg(0), st.out)
}

var csvHeader = []string{"fix", "file", "changed_lines", "location", "object", "functions", "build_seconds", "port", "outcome", "reason", "hooks"}

func csvRow(r corpus.Result) []string {
	return []string{r.Name, r.File, strconv.Itoa(r.Lines), r.Location, r.Object, strings.Join(r.Functions, " "),
		strconv.FormatFloat(r.BuildTime.Seconds(), 'f', 1, 64), r.Port, r.Outcome, r.Reason, hooksName(r.Hooks, r.Livepatch)}
}

// hooksName names for the CSV what the fix author added to a fix, without
// the corpus's directory: the hooks file (NAME.c) and the livepatch form
// (livepatch/NAME.patch), space-separated.
func hooksName(paths ...string) string {
	var names []string
	for _, p := range paths {
		if p != "" {
			name := filepath.Base(p)
			if filepath.Base(filepath.Dir(p)) == "livepatch" {
				name = "livepatch/" + name
			}
			names = append(names, name)
		}
	}
	return strings.Join(names, " ")
}

func trim(s string, n int) string {
	if len(s) > n {
		return s[:n-3] + "..."
	}
	return s
}
