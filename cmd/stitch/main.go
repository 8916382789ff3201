// Command stitch builds, verifies, applies and distributes live patches
// for running Linux kernels. It only parses flags and calls the packages
// under internal/; see README.md for the commands and their exit codes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	goruntime "runtime"
	"sort"
	"syscall"

	"github.com/stitchpatch/stitch/internal/vm"
)

// command is one subcommand. run gets the arguments after the command's name.
type command struct {
	name    string
	summary string
	hidden  bool // internal plumbing, not listed in help
	run     func(ctx context.Context, st *stdio, args []string) error
}

// stdio carries the process's streams so commands never reach for globals.
type stdio struct {
	in       io.Reader
	out, err io.Writer
	log      *slog.Logger
}

func commands() []command {
	return []command{
		{name: "vm", summary: "boot a kernel under QEMU and run a command in it", run: runVM},
		{name: vm.ForwardCommand, summary: "the host side of a VM's forwarded connection", run: runVMForward, hidden: true},
		{name: "apply", summary: "load a livepatch module and follow its transition", run: runApply},
		{name: "revert", summary: "disable a livepatch, follow the reverse transition, unload it", run: runRevert},
		{name: "status", summary: "show the kernel's livepatch state", run: runStatus},
		{name: "list", summary: "same as status", run: runStatus, hidden: true},
		{name: "diff", summary: "compare pre- and post-fix builds of an object: what changed, what cannot be live-patched", run: runDiff},
		{name: "kernel", summary: "kernels to build for: add (fetch from the archive into the cache), list (ready and offered), rm", run: runKernel},
		{name: "build", summary: "build a livepatch module from source fixes", run: runBuild},
		{name: "kallsyms", summary: "print a kernel's symbols decoded from its boot image, a kallsyms listing or a module", run: runKallsyms},
		{name: "corpus", summary: "measure Stitch on a corpus of real fixes", run: runCorpus},
		{name: "corpus-guest", summary: "the guest side of corpus", run: runCorpusGuest, hidden: true},
		{name: "repo", summary: "create and maintain a signed (TUF) patch repository: init, refresh, status, list, root, export, import", run: runRepo},
		{name: "publish", summary: "add a build to a repository and sign it: its whole OUT/ (every kernel's module and manifest, every contained record), a bundle, or --module and --manifest", run: runPublish},
		{name: "server", summary: "serve the patch repository, enroll machines and roll patches out in stages (HTTP API)", run: runServer},
		{name: "rollout", summary: "start, halt, resume or blocklist a patch's rollout on a server", run: runRollout},
		{name: "fleet", summary: "fleet reports (patches with each fix's coverage of the kernels, machines, cves, patch levels, keys), settings (keys, channels, groups) and revocation (revoke a key, delete a machine) on a server", run: runFleet},
		{name: "agent", summary: "keep this machine patched: enroll, check in, verify, apply, watch, report (enroll, install, disable, enable)", run: runAgent},
		{name: "keys", summary: "rotate a repository's signing keys, renew its root with the offline root key; module-signing keys (keys signing init|rotate|use|retire|list)", run: runKeys},
		{name: "demo", summary: "patch a real kernel live in a VM, then restore it", run: runDemo},
		{name: "demo-guest", summary: "the guest side of demo", run: runDemoGuest, hidden: true},
	}
}

func main() {
	// Inside a stitch VM this binary is the guest's /init.
	if os.Getpid() == 1 {
		vm.GuestInit()
		return
	}
	// In a VM with a module share, the kernel runs it as /sbin/modprobe.
	if filepath.Base(os.Args[0]) == "modprobe" {
		os.Exit(vm.ModprobeMain(os.Args[1:], os.Stderr))
	}
	st := &stdio{in: os.Stdin, out: os.Stdout, err: os.Stderr}
	st.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	os.Exit(run(st, os.Args[1:]))
}

// run runs the command args names and returns the process's exit code.
func run(st *stdio, args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if len(args) > 0 && (args[0] == "--version" || args[0] == "version") {
		fmt.Fprintf(st.out, "stitch %s (%s)\n", version(), goruntime.Version())
		return exitOK
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(st.err)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, st, args[1:])
		if err == nil {
			return exitOK
		}
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		code := exitCode(err)
		var silent silentExit
		if !errors.As(err, &silent) {
			name := c.name
			var sub subcommandError
			if errors.As(err, &sub) {
				name, err = name+" "+sub.path, sub.err
			}
			fmt.Fprintf(st.err, "stitch %s: %v\n", name, err)
		}
		return code
	}
	fmt.Fprintf(st.err, "stitch: unknown command %q (run 'stitch help' for the list)\n", args[0])
	return exitUsage
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: stitch COMMAND [flags] [args]\n\ncommands:")
	cs := commands()
	sort.Slice(cs, func(i, j int) bool { return cs[i].name < cs[j].name })
	for _, c := range cs {
		if !c.hidden {
			fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
		}
	}
	fmt.Fprintln(w, "\nRun 'stitch COMMAND -h' for a command's flags. Exit codes are listed in README.md.")
}
