package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/livepatch"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// progressPrinter prints one line per progress step to w.
func progressPrinter(w io.Writer) func(livepatch.Progress) {
	return func(p livepatch.Progress) {
		line := fmt.Sprintf("%s: %-10s %6.1fs", p.Patch, p.Phase, p.Elapsed.Seconds())
		if p.Pending > 0 {
			line += fmt.Sprintf("  %d task(s) not yet switched", p.Pending)
		}
		fmt.Fprintln(w, line)
	}
}

// applyReport is what apply and revert print with --json.
type applyReport struct {
	Patch   string                     `json:"patch"`
	Action  string                     `json:"action"`
	OK      bool                       `json:"ok"`
	Error   string                     `json:"error,omitempty"`
	Stalled *livepatch.TransitionError `json:"stalled,omitempty"`
	Trouble *livepatch.TroubleError    `json:"trouble,omitempty"`
	// RollbackFailed: the stall or trouble above could not be undone.
	RollbackFailed *livepatch.RollbackError `json:"rollback_failed,omitempty"`
	// Signature: the kernel requires a module signature it cannot accept.
	Signature *livepatch.SignatureError `json:"signature,omitempty"`
	Progress  []livepatch.Progress      `json:"progress"`
	State     *livepatch.Patch          `json:"state,omitempty"`
	Elapsed   time.Duration             `json:"elapsed_ns"`
}

func runApply(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "apply", "FILE.ko", "Loads a livepatch module and follows its transition; rolls back if it does not finish in time.")
	var opts livepatch.ApplyOptions
	jsonOut := fs.Bool("json", false, "print a JSON report")
	fs.DurationVar(&opts.Timeout, "timeout", 60*time.Second, "roll back if the transition has not finished after this long")
	fs.DurationVar(&opts.Watch, "watch", 0, "after the transition, watch the kernel this long and revert on a new warning, oops or soft lockup")
	manifest := fs.String("manifest", "", "the module's manifest (from stitch build): check first that it was built for exactly this kernel, by build-id and by the running code of every function it replaces")
	fs.BoolVar(&opts.Force, "force", false, "DANGEROUS: on timeout, force the transition instead of rolling back; the module can then never be unloaded")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	path := fs.Arg(0)
	if _, err := os.Stat(path); err != nil {
		return usageError{fmt.Errorf("%s: %w", path, errors.Unwrap(err))}
	}
	if *manifest != "" {
		m, err := contract.ReadManifest(*manifest)
		if err != nil {
			return usageError{fmt.Errorf("%s: %w", *manifest, err)}
		}
		opts.Expect = agent.Expect(m)
	}
	if opts.Force {
		fmt.Fprintln(st.err, "WARNING: --force skips livepatch's consistency check for stalled tasks; the module can never be unloaded afterwards")
	}
	k := &livepatch.Kernel{Logger: st.log}
	return runTransition(st, "apply", *jsonOut, &opts, func() (string, error) {
		m, err := k.Apply(ctx, path, opts)
		if m != nil {
			return m.Name, err
		}
		return "", err
	}, k)
}

func runRevert(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "revert", "NAME", "Disables a livepatch, follows the reverse transition, and unloads its module.")
	var opts livepatch.ApplyOptions
	jsonOut := fs.Bool("json", false, "print a JSON report")
	fs.DurationVar(&opts.Timeout, "timeout", 60*time.Second, "give up waiting for the reverse transition after this long")
	if err := parseArgs(fs, args, 1); err != nil {
		return err
	}
	name := fs.Arg(0)
	k := &livepatch.Kernel{Logger: st.log}
	return runTransition(st, "revert", *jsonOut, &opts, func() (string, error) {
		return name, k.Revert(ctx, name, opts)
	}, k)
}

// runTransition runs apply or revert, streaming progress to stderr (or
// collecting it for --json), and prints the outcome.
func runTransition(st *stdio, action string, jsonOut bool, opts *livepatch.ApplyOptions, do func() (string, error), k *livepatch.Kernel) error {
	rep := applyReport{Action: action, Progress: []livepatch.Progress{}}
	print := progressPrinter(st.err)
	opts.Progress = func(p livepatch.Progress) {
		rep.Progress = append(rep.Progress, p)
		if !jsonOut {
			print(p)
		}
	}
	start := time.Now()
	name, err := do()
	rep.Patch, rep.Elapsed, rep.OK = name, time.Since(start), err == nil
	if err != nil {
		rep.Error = err.Error()
		errors.As(err, &rep.Stalled)
		errors.As(err, &rep.Trouble)
		errors.As(err, &rep.RollbackFailed)
		errors.As(err, &rep.Signature)
	} else if action == "apply" {
		rep.State, _ = k.Patch(name)
	}
	if jsonOut {
		if perr := printJSON(st.out, rep); perr != nil {
			return perr
		}
		if err != nil {
			return silentExit{code: exitCode(err)}
		}
		return nil
	}
	if err != nil {
		return err
	}
	verb := map[string]string{"apply": "applied", "revert": "reverted"}[action]
	fmt.Fprintf(st.out, "%s %s in %.1fs\n", verb, name, rep.Elapsed.Seconds())
	return nil
}

func runStatus(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "status", "", `Shows the kernel release, livepatch support, loaded patches and taint, and the agent's view: the effective kernel version, the CVEs fixed, check-ins, and coverage. The exit status is the coverage, for monitoring: 0 up to date, 8 patches pending, 9 not covered (no agent, loading off, a patch failed or not loaded), 10 error (check-ins failing or overdue, or the patch repository refused).`)
	jsonOut := fs.Bool("json", false, "print JSON")
	dir := fs.String("dir", agent.DefaultDir, "the agent's state directory")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	return printAgentStatus(st, &agent.Agent{Dir: *dir}, *jsonOut, true)
}

// printKernelStatus prints the kernel's livepatch state.
func printKernelStatus(w io.Writer, s *livepatch.Status) {
	fmt.Fprintf(w, "kernel:    %s (build-id %s)\n", s.Release, s.BuildID)
	fmt.Fprintf(w, "livepatch: %s\n", map[bool]string{true: "supported", false: "NOT supported (no /sys/kernel/livepatch)"}[s.Livepatch])
	fmt.Fprintf(w, "taint:     %d %s\n", s.Taint.Value, s.Taint)
	for _, f := range s.Taint.Flags {
		if f.Relevant {
			fmt.Fprintf(w, "           %s: %s\n", f.Letter, f.Means)
		}
	}
	if sg := s.Signing; sg != nil {
		if sg.Required() {
			fmt.Fprintf(w, "signing:   required (%s); the kernel holds %d keys\n", sg.Policy(), len(sg.Keys))
		} else {
			fmt.Fprintln(w, "signing:   not required (no lockdown, no module.sig_enforce)")
		}
	}
	if len(s.Patches) == 0 {
		fmt.Fprintln(w, "patches:   none")
	}
	for _, p := range s.Patches {
		state := "disabled"
		if p.Enabled {
			state = "enabled"
		}
		if p.Transition {
			state += ", in transition"
		}
		fmt.Fprintf(w, "patch %s: %s\n", p.Name, state)
		for _, o := range p.Objects {
			var fns []string
			for _, f := range o.Functions {
				fns = append(fns, fmt.Sprintf("%s,%d", f.Name, f.Sympos))
			}
			fmt.Fprintf(w, "  %s (%s): %s\n", o.Name, map[bool]string{true: "patched", false: "not loaded"}[o.Patched], strings.Join(fns, " "))
		}
	}
}
