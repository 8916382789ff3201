package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/vm"
)

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func runVM(ctx context.Context, st *stdio, args []string) error {
	fs := flag.NewFlagSet("vm", flag.ContinueOnError)
	fs.SetOutput(st.err)
	fs.Usage = func() {
		fmt.Fprintln(st.err, "usage: stitch vm [flags] -- COMMAND [ARGS...]\n\nBoots a kernel under QEMU and runs COMMAND in it; exits with COMMAND's status.\n\nflags:")
		fs.PrintDefaults()
	}
	var opts vm.Options
	var adds stringList
	var jsonOut, quiet bool
	fs.StringVar(&opts.Kernel, "kernel", kernel.Default, "kernel to boot: a boot image, or a release ready in the cache or installed")
	cache := fs.String("cache", kernel.CacheDir(), "cache directory (kernel profiles)")
	fs.Var(&adds, "add", "host `FILE` to put at /<base name> in the guest (repeatable)")
	fs.StringVar(&opts.Append, "append", "", "extra kernel command line")
	fs.IntVar(&opts.Memory, "memory", 512, "guest memory in MiB")
	fs.IntVar(&opts.CPUs, "cpus", 2, "guest CPUs")
	fs.IntVar(&opts.UID, "uid", 0, "user id to run the command as")
	fs.DurationVar(&opts.Timeout, "timeout", 5*time.Minute, "kill the VM after this long")
	fs.BoolVar(&jsonOut, "json", false, "print the result as JSON instead of streaming")
	fs.BoolVar(&quiet, "quiet", false, "do not stream the kernel console")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	opts.Args = fs.Args()
	if len(opts.Args) == 0 {
		fs.Usage()
		return usageError{errors.New("no command given")}
	}
	for _, a := range adds {
		opts.Files = append(opts.Files, vm.File{Src: a, Dst: "/" + filepath.Base(a)})
	}
	if !jsonOut {
		opts.Output = st.out
		if !quiet {
			opts.Console = prefixWriter{w: st.err, prefix: "console: "}
		}
	}
	opts.Logger = st.log
	img, _, err := bootImage(ctx, *cache, opts.Kernel)
	if err != nil {
		return err
	}
	opts.Kernel = img
	res, err := vm.Run(ctx, opts)
	if err != nil {
		return err
	}
	if jsonOut {
		enc := json.NewEncoder(st.out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	if res.ExitCode != 0 {
		return silentExit{code: res.ExitCode}
	}
	return nil
}

// prefixWriter marks each line (callers write whole lines) with a prefix.
type prefixWriter struct {
	w      interface{ Write([]byte) (int, error) }
	prefix string
}

func (p prefixWriter) Write(b []byte) (int, error) {
	if _, err := fmt.Fprintf(p.w, "%s%s", p.prefix, b); err != nil {
		return 0, err
	}
	return len(b), nil
}

// runVMForward is what QEMU runs for each connection the guest makes to a
// forwarded address: it joins stdin and stdout to a host TCP address.
func runVMForward(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, vm.ForwardCommand, "HOST:PORT", "The host side of a VM's forwarded connection (run by QEMU).")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	return vm.ForwardMain(ctx, fs.Arg(0), st.in, st.out)
}
