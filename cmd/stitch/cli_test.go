package main

import (
	"bufio"
	"flag"
	"io"
	"log/slog"
	"strings"
	"testing"
)

// runCLI runs the whole command line as main does, with its output kept.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errs strings.Builder
	st := &stdio{in: strings.NewReader(""), out: &out, err: &errs, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	code = run(st, args)
	return out.String(), errs.String(), code
}

// subcommandNames reads the subcommands off a group's usage.
func subcommandNames(usage string) []string {
	var names []string
	sc := bufio.NewScanner(strings.NewReader(usage))
	in := false
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "subcommands:":
			in = true
		case in && strings.HasPrefix(line, "  "):
			names = append(names, strings.Fields(line)[0])
		case in:
			return names
		}
	}
	return names
}

// Every command and every subcommand answers -h with its usage and exit
// 0, without doing anything.
func TestHelpEverywhere(t *testing.T) {
	var walk func(path []string)
	walk = func(path []string) {
		out, errs, code := runCLI(t, append(path, "-h")...)
		if code != exitOK {
			t.Errorf("stitch %s -h: exit %d\n%s%s", strings.Join(path, " "), code, out, errs)
			return
		}
		if !strings.Contains(out+errs, "usage: stitch "+strings.Join(path, " ")) {
			t.Errorf("stitch %s -h prints no usage of its own:\n%s%s", strings.Join(path, " "), out, errs)
		}
		for _, sub := range subcommandNames(out) {
			walk(append(append([]string{}, path...), sub))
		}
	}
	n := 0
	for _, c := range commands() {
		if !c.hidden {
			walk([]string{c.name})
			n++
		}
	}
	// The groups are found from their usage: make sure they were.
	if out, _, _ := runCLI(t, "keys", "signing", "-h"); len(subcommandNames(out)) != 5 {
		t.Errorf("keys signing -h lists %v, want its 5 subcommands", subcommandNames(out))
	}
	if n < 15 {
		t.Errorf("only %d commands", n)
	}
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version"} {
		out, _, code := runCLI(t, arg)
		if code != exitOK || !strings.HasPrefix(out, "stitch ") || len(strings.TrimSpace(out)) <= len("stitch ") {
			t.Errorf("stitch %s: exit %d, %q", arg, code, out)
		}
	}
}

// Flags stand before, between or after the arguments; "--" ends them.
func TestParseFlagsAnywhere(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	x := fs.Int("x", 0, "")
	v := fs.Bool("v", false, "")
	if err := parseFlags(fs, []string{"a", "-x", "3", "b", "-v", "--", "-c", "d"}); err != nil {
		t.Fatal(err)
	}
	if *x != 3 || !*v || strings.Join(fs.Args(), " ") != "a b -c d" {
		t.Errorf("x %d, v %v, args %q", *x, *v, fs.Args())
	}
	fs = flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if err := parseFlags(fs, []string{"a", "--nope"}); exitCode(err) != exitUsage {
		t.Errorf("an unknown flag after an argument: %v", err)
	}
}

// A flag of another subcommand is refused, not ignored, and an error
// names the command once.
func TestSubcommandInput(t *testing.T) {
	t.Setenv(envToken, "some-token-for-the-test")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"fleet", "machines", "--channel", "lab"}, "flag provided but not defined: -channel"},
		{[]string{"fleet", "patches", "--channel", "canary"}, "flag provided but not defined: -channel"},
		{[]string{"fleet", "key", "--delay", "5m"}, "flag provided but not defined: -delay"},
		{[]string{"fleet", "move", "m1"}, "want 2 argument(s), got 1"},
		{[]string{"repo", "bogus"}, "stitch repo: unknown subcommand \"bogus\""},
		{[]string{"keys", "signing", "use"}, "stitch keys signing use: want 1 argument(s), got 0"},
		{[]string{"rollout", "start"}, "stitch rollout start: want 1 argument(s), got 0"},
	} {
		_, errs, code := runCLI(t, c.args...)
		if code != exitUsage || !strings.Contains(errs, c.want) {
			t.Errorf("stitch %s: exit %d, %q; want exit %d and %q", strings.Join(c.args, " "), code, errs, exitUsage, c.want)
		}
		for _, word := range []string{"fleet", "repo", "keys", "rollout"} {
			if strings.Contains(errs, word+": "+word+":") || strings.Contains(errs, word+": "+word+" ") {
				t.Errorf("stitch %s: the command is named twice: %q", strings.Join(c.args, " "), errs)
			}
		}
	}
}
