package main

import (
	"context"

	"github.com/stitchpatch/stitch/internal/demo"
	"github.com/stitchpatch/stitch/internal/kernel"
)

func runDemo(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "demo", "", "Builds a livepatch for the distro kernel, boots that kernel in a VM, and patches and restores it live.")
	var o demo.Options
	fs.StringVar(&o.Release, "release", kernel.Default, "kernel release to patch (installed, or fetched with `stitch kernel add`)")
	console := fs.Bool("console", false, "also show the VM's kernel console")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	o.Out = st.out
	if *console {
		o.Console = prefixWriter{w: st.err, prefix: "console: "}
	}
	return demo.Run(ctx, o)
}

func runDemoGuest(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "demo-guest", "MODULE.ko", "The guest side of 'stitch demo'.")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	return demo.Guest(ctx, fs.Arg(0), st.out)
}
