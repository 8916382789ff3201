package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/stitchpatch/stitch/internal/kernel"
)

func runKernel(ctx context.Context, st *stdio, args []string) error {
	return runGroup(ctx, st, "kernel", []subcommand{
		{name: "add", args: "RELEASE...", summary: "fetch kernels from the archive into the cache", run: runKernelAdd},
		{name: "list", aliases: []string{"ls"}, summary: "kernels ready to build for, and those the archive offers", run: runKernelList},
		{name: "rm", aliases: []string{"remove"}, args: "RELEASE...", summary: "remove kernels from the cache", run: runKernelRm},
	}, args)
}

func runKernelAdd(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "kernel add", "RELEASE...", "Fetches kernels into the cache: image, headers and exact source from the apt archive (debs already in the cache are reused), extracted under CACHE/kernels/RELEASE. Nothing is installed into /boot unless --install.")
	install := fs.Bool("install", false, "also apt-get install the image and headers on this system (root)")
	cache := fs.String("cache", kernel.CacheDir(), "cache directory")
	jsonOut := fs.Bool("json", false, "print a JSON report")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return usageError{errors.New("no release given")}
	}
	type result struct {
		Release string        `json:"release"`
		Added   *kernel.Added `json:"added,omitempty"`
		Error   string        `json:"error,omitempty"`
	}
	var results []result
	var errs []error
	// One kernel's failure does not stop the others.
	for _, r := range fs.Args() {
		a, err := kernel.Add(ctx, *cache, r, kernel.AddOptions{Install: *install, Progress: st.err, Log: st.log})
		res := result{Release: r, Added: a}
		if err != nil {
			res.Error = err.Error()
			errs = append(errs, err)
		} else if !*jsonOut {
			p := a.Profile
			fmt.Fprintf(st.out, "%s ready: image %s, source %s %s, boot image %s\n", p.Release, p.Image.Version, p.Source.Name, p.Source.Version, p.BootImage)
		}
		results = append(results, res)
		if ctx.Err() != nil {
			break
		}
	}
	if *jsonOut {
		if err := printJSON(st.out, results); err != nil {
			return err
		}
	}
	return errors.Join(errs...)
}

func runKernelList(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "kernel list", "", "Lists the kernels ready to build for (in the cache or installed) with their boot images, and the kernels the apt archive offers: ready, available (`stitch kernel add` fetches it) or no source (the archive lacks its exact source).")
	cache := fs.String("cache", kernel.CacheDir(), "cache directory")
	jsonOut := fs.Bool("json", false, "print JSON")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	ready, err := kernel.List(ctx, *cache)
	if err != nil {
		return err
	}
	isReady := map[string]bool{}
	for _, p := range ready {
		isReady[p.Release] = true
	}
	type offer struct {
		kernel.Offer
		State string `json:"state"` // ready, available, no-source
	}
	var archive []offer
	offers, aerr := kernel.Archive(ctx)
	for _, o := range offers {
		state := "available"
		switch {
		case isReady[o.Release]:
			state = "ready"
		case !o.SourceAvailable:
			state = "no-source"
		}
		archive = append(archive, offer{o, state})
	}
	if *jsonOut {
		out := struct {
			Ready        []*kernel.Profile `json:"ready"`
			Archive      []offer           `json:"archive"`
			ArchiveError string            `json:"archive_error,omitempty"`
		}{Ready: ready, Archive: archive}
		if aerr != nil {
			out.ArchiveError = aerr.Error()
		}
		return printJSON(st.out, out)
	}
	tw := tabwriter.NewWriter(st.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "READY\tFLAVOUR\tSOURCE\tORIGIN\tBOOT IMAGE")
	for _, p := range ready {
		fmt.Fprintf(tw, "%s\t%s\t%s %s\t%s\t%s\n", p.Release, p.Flavour, p.Source.Name, p.Source.Version, p.Origin, p.BootImage)
	}
	if len(ready) == 0 {
		fmt.Fprintln(tw, "(none)")
	}
	tw.Flush()
	fmt.Fprintln(st.out)
	if aerr != nil {
		fmt.Fprintf(st.out, "archive: %v\n", aerr)
		return nil
	}
	tw = tabwriter.NewWriter(st.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ARCHIVE\tIMAGE VERSION\tEXACT SOURCE\tSTATE")
	for _, o := range archive {
		state := o.State
		if state == "no-source" {
			state = "no source in the archive"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s %s\t%s\n", o.Release, o.Image.Version, o.Source.Name, o.Source.Version, state)
	}
	return tw.Flush()
}

func runKernelRm(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "kernel rm", "RELEASE...", "Removes kernels from the cache: profile, extracted packages, prepared source tree and extracted vmlinux. Kernels installed on the system are refused.")
	purge := fs.Bool("purge", false, "also delete the kernel's .debs (those no other ready kernel uses)")
	cache := fs.String("cache", kernel.CacheDir(), "cache directory")
	jsonOut := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return usageError{errors.New("no release given")}
	}
	var removed []*kernel.Removed
	var errs []error
	for _, r := range fs.Args() {
		rm, err := kernel.Remove(ctx, *cache, r, *purge)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, rm)
		if !*jsonOut {
			fmt.Fprintf(st.out, "removed %s (%d paths)\n", r, len(rm.Paths))
		}
	}
	if *jsonOut {
		if err := printJSON(st.out, removed); err != nil {
			return err
		}
	}
	return errors.Join(errs...)
}

// bootImage resolves a --kernel/--image argument: an existing file is a
// boot image; otherwise a release, whose profile gives it.
func bootImage(ctx context.Context, cache, arg string) (string, *kernel.Profile, error) {
	if fi, err := os.Stat(arg); err == nil && !fi.IsDir() {
		return arg, nil, nil
	}
	if _, err := kernel.ParseRelease(arg); err != nil {
		return "", nil, usageError{fmt.Errorf("%s is neither a boot image nor a kernel release: %w", arg, err)}
	}
	p, err := kernel.Open(ctx, cache, arg)
	if err != nil {
		return "", nil, err
	}
	return p.BootImage, p, nil
}
