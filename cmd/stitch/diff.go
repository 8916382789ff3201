package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// runDiff compares a pre-fix and a post-fix build of one kernel object.
func runDiff(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "diff", "PRE.o POST.o",
		"Compare two builds of one object (compiled with -ffunction-sections -fdata-sections)\n"+
			"and report changed, new and removed functions, new data, and every change a\n"+
			"livepatch cannot carry, with the reason.")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	image := fs.String("image", kernel.Default, "boot image, or release, of the kernel the objects were compiled for (its special-section layouts are read from it)")
	if err := parseArgs(fs, args, 2); err != nil {
		return err
	}
	pre, post := fs.Arg(0), fs.Arg(1)
	img, _, err := bootImage(ctx, kernel.CacheDir(), *image)
	if err != nil {
		return err
	}
	vmlinux, err := kallsyms.CachedVmlinux(ctx, img, kernel.CacheDir(), st.log)
	if errors.Is(err, os.ErrNotExist) {
		return usageError{err}
	}
	if err != nil {
		return err
	}
	lay, err := layout.FromVmlinux(vmlinux)
	if err != nil {
		return err
	}
	res, err := objdiff.DiffFiles(pre, post, lay)
	if errors.Is(err, objdiff.ErrNoObject) {
		return usageError{err}
	}
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(st.out, res)
	}
	printDiff(st.out, pre, post, res)
	return nil
}

func printDiff(w io.Writer, pre, post string, r *objdiff.Result) {
	fmt.Fprintf(w, "%s -> %s\n", pre, post)
	funcs := func(title string, fs []objdiff.Func) {
		if len(fs) == 0 {
			return
		}
		fmt.Fprintf(w, "\n%s (%d):\n", title, len(fs))
		for _, f := range fs {
			var notes []string
			if f.PreName != "" {
				notes = append(notes, "was "+f.PreName)
			}
			if f.Local {
				notes = append(notes, "static")
			}
			var locals []string
			for _, ref := range f.Refs {
				if ref.Local && !ref.Section && !ref.New {
					locals = append(locals, ref.Name)
				}
			}
			if len(locals) > 0 {
				notes = append(notes, "uses local "+strings.Join(locals, ", "))
			}
			line := "  " + f.Name
			if len(notes) > 0 {
				line += "  (" + strings.Join(notes, "; ") + ")"
			}
			fmt.Fprintln(w, line)
		}
	}
	names := func(title string, ns []string) {
		if len(ns) == 0 {
			return
		}
		fmt.Fprintf(w, "\n%s (%d):\n", title, len(ns))
		for _, n := range ns {
			fmt.Fprintln(w, "  "+n)
		}
	}
	funcs("changed functions", r.Changed)
	funcs("new functions", r.New)
	names("removed functions", r.Removed)
	var data []string
	for _, d := range r.NewData {
		line := fmt.Sprintf("%s (%d bytes in %s)", d.Name, d.Size, d.Section)
		if d.Why != "" {
			line += ": new copy, " + d.Why
		}
		data = append(data, line)
	}
	names("new data", data)
	names("unchanged but for __LINE__ constants", r.LineOnly)
	if len(r.Explanations) > 0 {
		fmt.Fprintf(w, "\nchanged through an inlined function:\n")
		for _, e := range r.Explanations {
			fmt.Fprintf(w, "  %s: inline %s\n", strings.Join(e.Changed, ", "), e.Inlined)
		}
	}
	if len(r.Changed)+len(r.New)+len(r.NewData)+len(r.Unsafe) == 0 {
		fmt.Fprintln(w, "\nno changes")
		return
	}
	if r.Patchable() {
		fmt.Fprintln(w, "\nall changes can be live-patched")
		return
	}
	fmt.Fprintf(w, "\ncannot be live-patched (%d):\n", len(r.Unsafe))
	for _, p := range r.Unsafe {
		fmt.Fprintf(w, "  [%s] %s: %s\n", p.Kind, p.Symbol, p.Reason)
	}
}
