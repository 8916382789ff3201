package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/corpus"
	"github.com/stitchpatch/stitch/internal/kernel"
)

type levelOptions struct {
	cumulative bool
	from       string
	dropEvery  int
	out        string
	report     string
	chunk      int
	release    string
	cache      string
	noVM       bool
	json       bool
}

// levelReport is the machine-readable result of stitch corpus
// --cumulative (docs/build.md, "Cumulative patches and levels: at scale").
type levelReport struct {
	Date       string               `json:"date"`
	Kernel     string               `json:"kernel"`
	From       string               `json:"from,omitempty"`
	Candidates int                  `json:"candidates"`
	Levels     []*corpus.LevelBuild `json:"levels"`
	VM         *corpus.LevelRun     `json:"vm,omitempty"`
	VMElapsed  time.Duration        `json:"vm_elapsed_ns,omitempty"`
	VMError    string               `json:"vm_error,omitempty"`
}

// runCorpusLevels builds the corpus's cumulative levels and runs them in
// a VM. Exit status: 0 when the levels built and the VM stage passed (or
// was skipped), 1 when a check in the VM failed or no fix combined.
func runCorpusLevels(ctx context.Context, st *stdio, entries []corpus.Entry, o levelOptions) error {
	rep := &levelReport{Date: time.Now().UTC().Format(time.RFC3339), Kernel: o.release, From: o.from}
	if o.from != "" {
		f, err := os.Open(o.from)
		if err != nil {
			return usageError{err}
		}
		applied, err := corpus.AppliedIn(f)
		f.Close()
		if err != nil {
			return usageError{fmt.Errorf("%s: %w", o.from, err)}
		}
		keep := map[string]bool{}
		for _, n := range applied {
			keep[n] = true
		}
		var sel []corpus.Entry
		for _, e := range entries {
			if keep[e.Name] {
				sel = append(sel, e)
			}
		}
		entries = sel
	}
	if len(entries) == 0 {
		return usageError{errors.New("no fix to combine (check --filter and --from)")}
	}
	rep.Candidates = len(entries)
	fixes, err := corpus.ReadFixes(entries)
	if err != nil {
		return usageError{err}
	}
	out := o.out
	if out == "" {
		if out, err = os.MkdirTemp("", "stitch-levels-"); err != nil {
			return err
		}
		defer os.RemoveAll(out)
	}
	p, err := kernel.Open(ctx, o.cache, o.release)
	if err != nil {
		return err
	}
	env, err := build.OpenEnv(ctx, p, o.cache, st.log)
	if err != nil {
		return err
	}
	n := 0
	lb := corpus.NewLevelBuilder(env, out, func(key string, cached bool, elapsed time.Duration, err error) {
		n++
		status := "ok"
		if err != nil {
			status = trim(strings.Join(strings.Fields(err.Error()), " "), 120)
		}
		fmt.Fprintf(st.err, "[%d/%d] compiled %s %.1fs %s\n", n, len(fixes), key, elapsed.Seconds(), status)
	})
	lb.Progress = func(level int, a corpus.Attempted) {
		status := "built"
		if a.Error != "" {
			status = "failed: " + trim(a.Error, 200)
		}
		fmt.Fprintf(st.err, "level %d: %d fixes: %.1fs %s\n", level, a.Fixes, a.Elapsed.Seconds(), status)
	}
	save := func() {
		if o.report != "" {
			if f, err := os.Create(o.report); err == nil {
				printJSON(f, rep)
				f.Close()
			}
		}
	}
	done := 0
	lb.Precompile(ctx, fixes, o.chunk, func(k int, elapsed time.Duration, err error) {
		done += k
		status := "ok"
		if err != nil {
			status = "failed, left to compile one by one: " + trim(strings.Join(strings.Fields(err.Error()), " "), 200)
		}
		fmt.Fprintf(st.err, "compiled a batch of %d fixes (%d done) in %.0fs: %s\n", k, done, elapsed.Seconds(), status)
	})
	l1, err := lb.Build(ctx, 1, fixes, nil)
	if l1 != nil {
		rep.Levels = append(rep.Levels, l1)
	}
	save()
	if err != nil {
		return err
	}
	printLevel(st, l1)
	levels := []string{l1.Module}
	if o.dropEvery > 0 {
		keep, _ := corpus.WithoutEvery(l1.Fixes, o.dropEvery)
		l2, err := lb.Build(ctx, 2, corpus.Pick(fixes, keep), l1)
		if l2 != nil {
			rep.Levels = append(rep.Levels, l2)
		}
		save()
		if err != nil {
			return err
		}
		printLevel(st, l2)
		levels = append(levels, l2.Module)
	}
	if !o.noVM {
		start := time.Now()
		var files []string
		for _, l := range rep.Levels {
			files = append(files, l.Files...)
		}
		vmOut, _ := os.Create(filepath.Join(out, "vm.log"))
		if vmOut != nil {
			defer vmOut.Close()
		}
		run, err := corpus.RunLevels(ctx, levels, l1.Modules, files, corpus.LevelVMOptions{Kernel: p.BootImage, Modules: p.Modules, Output: vmOut})
		rep.VM, rep.VMElapsed = run, time.Since(start)
		if err != nil {
			rep.VMError = err.Error()
		}
		save()
		if err != nil {
			return err
		}
		printRun(st, run)
	}
	if o.json {
		if err := printJSON(st.out, rep); err != nil {
			return err
		}
	}
	if rep.VM != nil && !rep.VM.OK {
		return silentExit{exitFailed}
	}
	return nil
}

func printLevel(st *stdio, l *corpus.LevelBuild) {
	fmt.Fprintf(st.err, "level %d (%s): %d fixes, %d functions in %d objects (vmlinux and %d modules), %d bytes; built in %.0fs (compiling %.0fs), %d attempts\n",
		l.Number, l.Name, len(l.Fixes), l.Funcs, l.Objects, len(l.Modules), l.Bytes, l.Elapsed.Seconds(), l.Compile.Seconds(), len(l.Attempts))
	for _, d := range l.Dropped {
		fmt.Fprintf(st.err, "  did not combine: %s (%s): %s\n", d.Name, d.How, trim(d.Reason, 300))
	}
	if len(l.Withdrawn) > 0 {
		fmt.Fprintf(st.err, "  withdrawn from the level before: %s\n", strings.Join(l.Withdrawn, ", "))
	}
}

func printRun(st *stdio, r *corpus.LevelRun) {
	fmt.Fprintf(st.err, "VM: %d modules loaded, %d not\n", len(r.Loaded), len(r.LoadFailed))
	for _, p := range r.Phases {
		fmt.Fprintf(st.err, "  %-46s %6.1fs (load %.1fs, transition %.1fs, at most %d tasks pending, unload %.1fs); livepatches %v; %d workloads, failed %v %s\n",
			p.Name, p.Total.Seconds(), p.Load.Seconds(), p.Transition.Seconds(), p.MaxPending, p.Unload.Seconds(), p.Patches, len(p.Workloads), p.Failed, p.Error)
	}
	for _, p := range r.Problems {
		fmt.Fprintf(st.err, "  PROBLEM: %s\n", p)
	}
	fmt.Fprintf(st.err, "VM checks: ok=%v\n", r.OK)
}
