package main

import (
	"context"
	"io"

	"github.com/stitchpatch/stitch/internal/demo"
	"github.com/stitchpatch/stitch/internal/kernel"
)

func runDemo(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "demo", "", "Builds a livepatch for each kernel named (one build for all), boots each kernel in a VM in turn,\n"+
		"and patches and restores it live.")
	var o demo.Options
	var releases stringList
	fs.Var(&releases, "kernel", "kernel release to patch (repeatable; default "+kernel.Default+"; installed, or fetched with stitch kernel add)")
	fs.Var(&releases, "release", "the same as --kernel")
	fs.StringVar(&o.Cache, "cache", kernel.CacheDir(), "cache directory (kernel profiles, prepared trees, extracted images)")
	console := fs.Bool("console", false, "also show the VMs' kernel console")
	jsonOut := fs.Bool("json", false, "print a JSON report (the progress and the guests' output go to stderr)")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	o.Releases, o.Out = releases, st.out
	if *jsonOut {
		o.Out = st.err
	}
	if *console {
		o.Console = prefixWriter{w: st.err, prefix: "console: "}
	}
	results, err := demo.Run(ctx, o)
	if *jsonOut && results != nil {
		if perr := printDemoJSON(st.out, results); perr != nil {
			return perr
		}
	}
	return err
}

// printDemoJSON prints each kernel's result with its error.
func printDemoJSON(w io.Writer, results []*demo.Result) error {
	type kernelJSON struct {
		*demo.Result
		OK    bool   `json:"ok"`
		Error string `json:"error,omitempty"`
	}
	rep := struct {
		Kernels []kernelJSON `json:"kernels"`
		Failed  int          `json:"failed"`
	}{}
	for _, r := range results {
		k := kernelJSON{Result: r, OK: r.OK()}
		if r.Err != nil {
			k.Error = r.Err.Error()
			rep.Failed++
		}
		rep.Kernels = append(rep.Kernels, k)
	}
	return printJSON(w, rep)
}

func runDemoGuest(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "demo-guest", "MODULE.ko", "The guest side of 'stitch demo'.")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	return demo.Guest(ctx, fs.Arg(0), st.out)
}
