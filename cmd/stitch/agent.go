package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/livepatch"
)

// runAgent: stitch agent [--once | --boot] [--dir DIR], and its
// subcommands enroll, install, disable, enable.
func runAgent(ctx context.Context, st *stdio, args []string) error {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		return runGroup(ctx, st, "agent", []subcommand{
			{name: "enroll", summary: "register this machine with a patch server or a mirror", run: runAgentEnroll},
			{name: "install", summary: "install this binary and the agent's systemd units", run: runAgentInstall},
			{name: "disable", summary: "stop loading patches until enabled", run: func(ctx context.Context, st *stdio, a []string) error { return runAgentSwitch(st, a, true) }},
			{name: "enable", summary: "allow loading patches again", run: func(ctx context.Context, st *stdio, a []string) error { return runAgentSwitch(st, a, false) }},
		}, args)
	}
	fs := newFlagSet(st, "agent", "", `Keeps this machine patched: checks in with the patch server on its interval, applies the patches it offers for this exact kernel after verifying them (TUF signatures, build-id, vermagic, the running code), watches the kernel and reverts on trouble, reports health, and obeys revert orders. Runs until stopped; --once does one pass; --boot reloads the cached patches without a network.

Subcommands: enroll, install, disable, enable (stitch agent SUB -h).`)
	dir := fs.String("dir", agent.DefaultDir, "the agent's state directory")
	once := fs.Bool("once", false, "one pass: check in, apply, watch new patches through their first health check, report, exit")
	boot := fs.Bool("boot", false, "early-boot pass: reload the cached patches, no network (the stitch-agent-boot unit)")
	jsonOut := fs.Bool("json", false, "with --once or --boot: print the resulting status as JSON")
	verbose := fs.Bool("v", false, "log each step")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	if *once && *boot {
		return usageError{errors.New("--once or --boot, not both")}
	}
	level := slog.LevelInfo
	if !*verbose && (*once || *boot) {
		level = slog.LevelWarn
	}
	a := newAgent(st, *dir, level)
	if *once || *boot {
		var err error
		if *boot {
			err = a.Boot(ctx)
		} else {
			err = a.Once(ctx)
		}
		if errors.Is(err, agent.ErrNotEnrolled) || errors.Is(err, agent.ErrLocked) {
			return err
		}
		if perr := printAgentStatus(st, a, *jsonOut, false); perr != nil && err == nil {
			return perr
		}
		return err
	}
	a.Logger.Info("agent starting", "dir", *dir, "version", a.Version)
	err := a.Run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func newAgent(st *stdio, dir string, level slog.Level) *agent.Agent {
	log := slog.New(slog.NewTextHandler(st.err, &slog.HandlerOptions{Level: level}))
	a := &agent.Agent{Dir: dir, Kernel: &livepatch.Kernel{Logger: log}, Version: version(), Logger: log}
	if kl := livepatch.OpenKernelLog(); kl != nil {
		a.Log = kl
	}
	return a
}

func runAgentEnroll(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "agent enroll", "", "Registers this machine with a patch server (or a mirror) and pins the repository's root of trust. The enrollment key may come from STITCH_ENROLL_KEY instead of --key, to keep it out of ps.")
	var o agent.EnrollOptions
	dir := fs.String("dir", agent.DefaultDir, "the agent's state directory")
	fs.StringVar(&o.Server, "server", "", "patch server URL, e.g. https://patches.example.com:8440 (empty: a mirror only, with --repo)")
	fs.StringVar(&o.Key, "key", os.Getenv("STITCH_ENROLL_KEY"), "enrollment key")
	fs.StringVar(&o.Group, "group", "", "the group you expect to join: the key decides it, and enrollment fails when it is another (default: the key's)")
	fs.StringVar(&o.Repo, "repo", "", "TUF repository URL (default SERVER/v1/repo; a mirror: http(s):// or file:///dir)")
	fs.StringVar(&o.Proxy, "proxy", "", "HTTP proxy URL (default: HTTPS_PROXY/HTTP_PROXY from the environment)")
	fs.DurationVar(&o.Interval, "interval", 0, "check-in interval when the server does not set one (default 1h)")
	root := fs.String("root", "", "the repository's root.json (from `stitch repo root` on the repository's host)")
	ca := fs.String("ca", "", "PEM bundle of the CA that signed the https server's certificate: the only one trusted for the server and repository, kept as DIR/ca.pem (default: the system's CAs)")
	mok := fs.Bool("mok-import", false, "under Secure Boot, when the kernel does not trust the fleet's module-signing certificate: request its enrollment as a Machine Owner Key (mokutil --import --root-pw); confirm it on the console at the next boot")
	jsonOut := fs.Bool("json", false, "print JSON")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	if *root == "" || (o.Server != "" && o.Key == "") {
		return usageError{errors.New("agent enroll: --root is required, and --key (or STITCH_ENROLL_KEY) with --server")}
	}
	b, err := os.ReadFile(*root)
	if err != nil {
		return usageError{fmt.Errorf("--root: %w", err)}
	}
	o.Root = b
	if *ca != "" {
		if o.CA, err = os.ReadFile(*ca); err != nil {
			return usageError{fmt.Errorf("--ca: %w", err)}
		}
		o.CAFile = *ca
	}
	a := &agent.Agent{Dir: *dir}
	cfg, err := a.Enroll(ctx, o)
	if err != nil {
		return err
	}
	// Under Secure Boot the kernel loads the fleet's patches only once it
	// trusts the fleet's certificate: say so now, not at the first patch.
	ks, _ := (&livepatch.Kernel{Logger: st.log}).Signing()
	sg, err := a.Signing(ks)
	if err != nil {
		return err
	}
	blocked := sg.Blocked()
	imported := false
	if blocked != "" && *mok && len(sg.Keys) > 0 {
		if err := agent.ImportMOK(ctx, sg.Keys[0].File); err != nil {
			return err
		}
		imported = true
	}
	if *jsonOut {
		return printJSON(st.out, map[string]any{"machine_id": cfg.MachineID, "server": cfg.Server, "repo": cfg.Repo, "dir": *dir,
			"module_signing": sg, "blocked": blocked, "mok_import_requested": imported})
	}
	if cfg.Server != "" {
		fmt.Fprintf(st.out, "enrolled as machine %s with %s\n", cfg.MachineID, cfg.Server)
	} else {
		fmt.Fprintf(st.out, "set up to follow the mirror %s\n", cfg.Repo)
	}
	if blocked != "" {
		fmt.Fprintf(st.out, "\nSECURE BOOT: %s.\n", blocked)
		if len(sg.Keys) > 0 {
			steps := agent.MOKSteps(sg.Keys[0].File)
			if imported {
				fmt.Fprintf(st.out, "Its enrollment is requested (mokutil --import, with root's password). To finish, once:\n")
				steps = steps[1:]
			} else {
				fmt.Fprintf(st.out, "Enroll it once on this machine (or run stitch agent enroll with --mok-import to do the first step):\n")
			}
			for i, s := range steps {
				fmt.Fprintf(st.out, "  %d. %s\n", i+1, s)
			}
			fmt.Fprintf(st.out, "Machines whose firmware keys you own can take it into db instead (docs/signing.md).\n\n")
		}
	}
	fmt.Fprintf(st.out, "next: stitch agent --once (one pass now), or stitch agent install (run it as a service)\n")
	return nil
}

func runAgentInstall(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "agent install", "", "Installs this binary and the agent's systemd units (stitch-agent-boot: reload patches early at boot; stitch-agent: the daemon), then enables and starts them.")
	bin := fs.String("bin", "/usr/local/sbin/stitch", "where to install the binary")
	unitDir := fs.String("unit-dir", "/etc/systemd/system", "where to write the units")
	dir := fs.String("dir", agent.DefaultDir, "the agent's state directory")
	noStart := fs.Bool("no-start", false, "write the files only")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := agent.Install(self, *bin, *unitDir, *dir, st.out); err != nil {
		return err
	}
	if *noStart {
		return nil
	}
	if _, err := exec.LookPath("systemctl"); err != nil {
		return fmt.Errorf("agent install: no systemctl on this machine: start `%s agent --boot` early at boot and `%s agent` as a service by other means (--no-start only writes the files)", *bin, *bin)
	}
	cmds := [][]string{{"daemon-reload"}, append([]string{"enable", "--now"}, agent.UnitNames()...)}
	for _, c := range cmds {
		out, err := exec.CommandContext(ctx, "systemctl", c...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("systemctl %s: %w\n%s", strings.Join(c, " "), err, out)
		}
	}
	fmt.Fprintln(st.out, "enabled and started: "+strings.Join(agent.UnitNames(), ", "))
	return nil
}

func runAgentSwitch(st *stdio, args []string, off bool) error {
	name, about := "agent enable", "Allows the agent to load patches again (removes DIR/off)."
	if off {
		name, about = "agent disable", "Stops the agent from loading any patch, at boot or later, until `stitch agent enable` (creates DIR/off). Patches already loaded stay; revert them with stitch revert. The kernel command line switch stitch=off does the same for one boot."
	}
	fs := newFlagSet(st, name, "", about)
	dir := fs.String("dir", agent.DefaultDir, "the agent's state directory")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	a := &agent.Agent{Dir: *dir}
	if err := a.SetDisabled(off); err != nil {
		return err
	}
	fmt.Fprintf(st.out, "patch loading %s\n", map[bool]string{true: "disabled", false: "enabled"}[off])
	return nil
}

// statusReport is what stitch status prints with --json: the kernel's
// livepatch state and the agent's view.
type statusReport struct {
	*livepatch.Status
	Agent *agent.Status `json:"agent"`
}

// printAgentStatus prints the kernel's and the agent's state. With
// monitor, the coverage becomes the exit code.
func printAgentStatus(st *stdio, a *agent.Agent, jsonOut, monitor bool) error {
	k := &livepatch.Kernel{Logger: st.log}
	ks, err := k.Status()
	if err != nil {
		if monitor {
			fmt.Fprintln(st.err, err)
			return silentExit{code: exitStatusError}
		}
		return err
	}
	as, err := a.Status(ks)
	if err != nil {
		as = &agent.Status{Coverage: agent.Error, Why: err.Error()}
	}
	if jsonOut {
		if err := printJSON(st.out, statusReport{Status: ks, Agent: as}); err != nil {
			return err
		}
	} else {
		printKernelStatus(st.out, ks)
		printCoverage(st.out, as)
	}
	if !monitor {
		return nil
	}
	if code := coverageExit[as.Coverage]; code != 0 {
		return silentExit{code: code}
	}
	return nil
}

// signingLine answers "would the kernel load the fleet's signed
// patches" in a few words.
func signingLine(s *agent.SigningStatus) string {
	var names []string
	for _, k := range s.Keys {
		if k.Trusted == s.Trusted {
			names = append(names, k.Subject+" "+k.KeyID)
		}
	}
	switch {
	case s.Trusted:
		return "yes (" + strings.Join(names, ", ") + ")"
	case len(s.Keys) == 0:
		return "no: the repository signs no modules"
	case !s.Required:
		return "no, not needed: this kernel does not require signed modules (" + strings.Join(names, ", ") + " not enrolled)"
	default:
		return "no: enroll " + s.Keys[0].File + " (stitch agent enroll explains how)"
	}
}

var coverageExit = map[agent.Coverage]int{
	agent.UpToDate: exitOK, agent.Pending: exitPending, agent.NotCovered: exitNotCovered, agent.Error: exitStatusError,
}

func printCoverage(w io.Writer, s *agent.Status) {
	fmt.Fprintf(w, "effective: %s\n", s.Effective)
	line := string(s.Coverage)
	if s.Why != "" {
		line += ": " + s.Why
	}
	fmt.Fprintf(w, "coverage:  %s\n", line)
	if !s.Enrolled {
		return
	}
	if s.Server != "" {
		fmt.Fprintf(w, "agent:     machine %s, server %s\n", s.Machine, s.Server)
	} else {
		fmt.Fprintf(w, "agent:     mirror %s\n", s.Repo)
	}
	when := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.Local().Format("2006-01-02 15:04:05 MST")
	}
	fmt.Fprintf(w, "checkin:   last %s, next %s\n", when(s.LastCheckIn), when(s.NextCheckIn))
	if s.LastError != "" {
		fmt.Fprintf(w, "error:     %s\n", s.LastError)
	}
	if s.RepoError != "" {
		fmt.Fprintf(w, "repo:      refused at %s (retrying): %s\n", when(s.RepoErrorAt), s.RepoError)
	}
	if s.Disabled != "" {
		fmt.Fprintf(w, "loading:   OFF (%s)\n", s.Disabled)
	}
	if sg := s.Signing; sg != nil && (sg.Required || len(sg.Keys) > 0) {
		fmt.Fprintf(w, "signing key trusted: %s\n", signingLine(sg))
	}
	if len(s.FixedCVEs) > 0 {
		fmt.Fprintf(w, "fixed:     %s\n", strings.Join(s.FixedCVEs, " "))
	}
	for _, p := range s.Patches {
		state := p.State
		if p.State == "applied" && !p.Loaded {
			state = "applied, NOT LOADED"
		}
		if p.Reason != "" {
			state += " (" + p.Reason + ")"
		}
		switch {
		case p.Superseded:
			state += " (superseded)"
		case p.HotFix:
			state += " (hot-fix)"
		}
		cves := strings.Join(p.CVEs, " ")
		if cves == "" {
			cves = "no CVE"
		}
		fmt.Fprintf(w, "  %-28s %-22s %s  since %s\n", p.Name, state, cves, when(p.Since))
	}
	for _, t := range s.Pending {
		fmt.Fprintf(w, "  pending: %s\n", t)
	}
}
