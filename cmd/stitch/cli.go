package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
	"text/tabwriter"
)

// Environment defaults of the admin commands' flags. The token is never a
// flag, so that it stays out of ps output.
const (
	envServer = "STITCH_SERVER"
	envToken  = "STITCH_TOKEN"
	// envAdminToken is the older name of envToken, still read.
	envAdminToken = "STITCH_ADMIN_TOKEN"
)

// subcommand is one verb of a command group ("stitch fleet machines").
type subcommand struct {
	name    string
	aliases []string
	args    string // the positional arguments, for usage
	summary string
	run     func(ctx context.Context, st *stdio, args []string) error
}

// runGroup runs the subcommand args[0] of group; with no subcommand, -h,
// --help or help it lists them.
func runGroup(ctx context.Context, st *stdio, group string, subs []subcommand, args []string) error {
	groupUsage := func(w io.Writer) {
		fmt.Fprintf(w, "usage: stitch %s SUBCOMMAND [flags] [args]\n\nsubcommands:\n", group)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, s := range subs {
			fmt.Fprintf(tw, "  %s %s\t%s\n", s.name, s.args, s.summary)
		}
		tw.Flush()
		fmt.Fprintf(w, "\nRun 'stitch %s SUBCOMMAND -h' for its flags.\n", group)
	}
	if len(args) == 0 {
		groupUsage(st.err)
		return usageError{errors.New("want a subcommand")}
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		groupUsage(st.out)
		return flag.ErrHelp
	}
	for _, s := range subs {
		if s.name == args[0] || contains(s.aliases, args[0]) {
			err := s.run(ctx, st, args[1:])
			var inner subcommandError
			switch {
			case err == nil || errors.Is(err, flag.ErrHelp):
				return err
			case errors.As(err, &inner):
				return subcommandError{s.name + " " + inner.path, inner.err}
			}
			return subcommandError{s.name, err}
		}
	}
	var names []string
	for _, s := range subs {
		names = append(names, s.name)
	}
	return usageError{fmt.Errorf("unknown subcommand %q (%s)", args[0], strings.Join(names, ", "))}
}

// subcommandError is a subcommand's error with the subcommand's path
// ("signing init"), so that it is named once where the error is printed.
type subcommandError struct {
	path string
	err  error
}

func (e subcommandError) Error() string { return e.path + ": " + e.err.Error() }
func (e subcommandError) Unwrap() error { return e.err }

func contains(list []string, s string) bool {
	for _, l := range list {
		if l == s {
			return true
		}
	}
	return false
}

// newFlagSet is a command's flag set: errors and -h go to standard error,
// and the usage says the positional arguments and what the command does.
func newFlagSet(st *stdio, name, args, about string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(st.err)
	fs.Usage = func() {
		fmt.Fprintf(st.err, "usage: stitch %s [flags] %s\n\n%s\n\nflags (before or after the arguments):\n", name, args, about)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses flags wherever they stand among the arguments, as git
// and kubectl do ("rollout start T --server URL"); after "--" everything
// is an argument. fs.Args() is then the positional arguments in order.
func parseFlags(fs *flag.FlagSet, args []string) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return usageError{err}
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		// fs stopped at "--" (consumed) or at a positional argument.
		if i := len(args) - len(rest) - 1; i >= 0 && args[i] == "--" {
			pos = append(pos, rest...)
			break
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
	return fs.Parse(append([]string{"--"}, pos...))
}

// parseArgs parses flags anywhere (parseFlags) and insists on exactly n
// positional arguments.
func parseArgs(fs *flag.FlagSet, args []string, n int) error {
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != n {
		fs.Usage()
		return usageError{fmt.Errorf("want %d argument(s), got %d", n, fs.NArg())}
	}
	return nil
}

// envDefault is the value of the environment variable name, or def.
func envDefault(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// version names this build: the module version, or for a build from a
// checkout "devel+" and the commit, in the characters the server accepts
// from agents.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	if v == "" || v == "(devel)" {
		v = "devel"
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += "+" + s.Value[:12]
			}
		}
	}
	return v
}
