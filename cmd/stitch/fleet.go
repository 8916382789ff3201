package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stitchpatch/stitch/internal/server/api"
)

// adminFlags are what every admin command needs: the server and, from
// STITCH_ADMIN_TOKEN (not a flag, so it stays out of ps), the token.
func adminFlags(fs *flag.FlagSet) (*string, *bool) {
	return fs.String("server", "http://127.0.0.1:8440", "the stitch server's URL"), fs.Bool("json", false, "print JSON")
}

func adminClient(server string) (*api.Client, error) {
	token := os.Getenv("STITCH_ADMIN_TOKEN")
	if token == "" {
		return nil, usageError{fmt.Errorf("set STITCH_ADMIN_TOKEN to the server's admin token")}
	}
	return &api.Client{BaseURL: server, Token: token, HTTP: &http.Client{Timeout: time.Minute}}, nil
}

// runRollout: stitch rollout start|halt|resume|blocklist TARGET [--reason R].
func runRollout(ctx context.Context, st *stdio, args []string) error {
	if len(args) < 2 || strings.HasPrefix(args[1], "-") {
		return usageError{fmt.Errorf("rollout: usage: stitch rollout start|halt|resume|blocklist TARGET [--reason R] [--server URL] [--json]")}
	}
	op, target := args[0], args[1]
	fs := flag.NewFlagSet("rollout "+op, flag.ContinueOnError)
	fs.SetOutput(st.err)
	server, asJSON := adminFlags(fs)
	reason := fs.String("reason", "", "why (kept with the rollout)")
	if err := fs.Parse(args[2:]); err != nil {
		return usageError{err}
	}
	c, err := adminClient(*server)
	if err != nil {
		return err
	}
	var out api.PatchReport
	switch op {
	case "start":
		err = c.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, &out)
	case "halt", "resume", "blocklist":
		err = c.Do(ctx, "POST", "/v1/admin/rollouts/"+target+"/"+op, api.RolloutRequest{Reason: *reason}, &out)
	default:
		return usageError{fmt.Errorf("rollout: unknown operation %q (start, halt, resume, blocklist)", op)}
	}
	if err != nil {
		return fmt.Errorf("rollout %s %s: %w", op, target, err)
	}
	if l := out.Level; l != nil {
		return report(st, *asJSON, out, "%s: level %d of stream %s: %s at stage %d (%.0f%%) %s\n", out.Target, l.Number, l.Stream, out.State, out.Stage, out.Share*100, out.Reason)
	}
	return report(st, *asJSON, out, "%s: %s at stage %d (%.0f%%) %s\n", out.Target, out.State, out.Stage, out.Share*100, out.Reason)
}

// runFleet: stitch fleet patches|machines|cves|levels|keys|key|revoke|delete|channel|group|move ...
func runFleet(ctx context.Context, st *stdio, args []string) error {
	if len(args) == 0 {
		return usageError{fmt.Errorf("fleet: want a subcommand: patches, machines, cves, levels, keys (reports); key, revoke KEY, delete MACHINE, channel NAME, group NAME, move MACHINE GROUP")}
	}
	sub, rest := args[0], args[1:]
	var pos []string // positional arguments before the flags
	for len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		pos, rest = append(pos, rest[0]), rest[1:]
	}
	fs := flag.NewFlagSet("fleet "+sub, flag.ContinueOnError)
	fs.SetOutput(st.err)
	server, asJSON := adminFlags(fs)
	maxMachines := fs.Int("max-machines", 0, "key: machines the key may enroll (0: the free tier's 3)")
	expires := fs.String("expires", "", "key: expiry, RFC 3339 (empty: never)")
	group := fs.String("group", "", "key: the group its machines join")
	delay := fs.Duration("delay", 0, "channel: deploy delay after a patch's registration")
	cutoff := fs.String("cutoff", "", "channel: no patch registered after this time (RFC 3339)")
	channel := fs.String("channel", "", "group: its channel")
	pin := fs.String("pin", "", "group: hold at the patches registered up to this time (RFC 3339)")
	deleteMachines := fs.Bool("delete-machines", false, "revoke: delete the key's machines too (their tokens stop working)")
	if err := fs.Parse(rest); err != nil {
		return usageError{err}
	}
	want := map[string]int{"patches": 0, "machines": 0, "cves": 0, "levels": 0, "keys": 0, "key": 0, "revoke": 1, "delete": 1, "channel": 1, "group": 1, "move": 2}
	n, ok := want[sub]
	if !ok {
		return usageError{fmt.Errorf("fleet: unknown subcommand %q", sub)}
	}
	if len(pos) != n {
		return usageError{fmt.Errorf("fleet %s: want %d argument(s) before the flags, got %d", sub, n, len(pos))}
	}
	times := map[string]*time.Time{}
	for name, v := range map[string]string{"expires": *expires, "cutoff": *cutoff, "pin": *pin} {
		t := time.Time{}
		if v != "" {
			var err error
			if t, err = time.Parse(time.RFC3339, v); err != nil {
				return usageError{fmt.Errorf("--%s %q: want RFC 3339, e.g. 2026-12-01T00:00:00Z", name, v)}
			}
		}
		times[name] = &t
	}
	c, err := adminClient(*server)
	if err != nil {
		return err
	}
	switch sub {
	case "patches", "machines", "cves":
		return fleetReport(ctx, st, c, sub, *asJSON)
	case "levels":
		ls, err := c.Levels(ctx)
		var se *api.StatusError
		switch {
		case errors.As(err, &se) && se.Code == http.StatusNotFound:
			return fmt.Errorf("fleet levels: the server has no levels report (it is older than this stitch): %w", err)
		case err != nil:
			return fmt.Errorf("fleet levels: %w", err)
		}
		if *asJSON {
			return printJSON(st.out, ls)
		}
		printLevels(st, ls)
		return nil
	case "keys":
		keys, err := c.Keys(ctx)
		if err != nil {
			return fmt.Errorf("fleet keys: %w", err)
		}
		if *asJSON {
			return printJSON(st.out, keys)
		}
		tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
		defer tw.Flush()
		fmt.Fprintln(tw, "KEY\tGROUP\tMACHINES\tCREATED\tEXPIRES\tREVOKED")
		for _, k := range keys {
			fmt.Fprintf(tw, "%s\t%s\t%d of %d\t%s\t%s\t%s\n", k.ID, k.Group, k.Machines, k.MaxMachines, fleetDate(k.CreatedAt), fleetDate(k.ExpiresAt), fleetDate(k.RevokedAt))
		}
		return nil
	case "revoke":
		out, err := c.RevokeKey(ctx, pos[0], api.RevokeRequest{DeleteMachines: *deleteMachines})
		if err != nil {
			return fmt.Errorf("fleet revoke: %w", err)
		}
		if *deleteMachines {
			return report(st, *asJSON, out, "key %s revoked; %d machines deleted\n", out.Key.ID, out.DeletedMachines)
		}
		return report(st, *asJSON, out, "key %s revoked: it enrolls nothing more; its %d machines stay enrolled (delete them with `stitch fleet delete MACHINE`, or revoke with --delete-machines)\n", out.Key.ID, out.Key.Machines)
	case "delete":
		if err := c.DeleteMachine(ctx, pos[0]); err != nil {
			return fmt.Errorf("fleet delete: %w", err)
		}
		return report(st, *asJSON, map[string]string{"deleted": pos[0]}, "machine %s deleted: its token no longer works and its reports no longer count\n", pos[0])
	case "key":
		var out api.KeyResponse
		if err := c.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: *maxMachines, ExpiresAt: *times["expires"], Group: *group}, &out); err != nil {
			return fmt.Errorf("fleet key: %w", err)
		}
		return report(st, *asJSON, out, "%s\n(key %s: up to %d machines, group %s; shown once, keep it secret)\n", out.Key, out.ID, out.MaxMachines, out.Group)
	case "channel":
		in := api.Channel{Name: pos[0], DelaySeconds: int64(delay.Seconds()), Cutoff: *times["cutoff"]}
		if err := c.Do(ctx, "PUT", "/v1/admin/channels/"+url.PathEscape(pos[0]), in, nil); err != nil {
			return fmt.Errorf("fleet channel: %w", err)
		}
		return report(st, *asJSON, in, "channel %s: delay %s\n", in.Name, *delay)
	case "group":
		in := api.Group{Name: pos[0], Channel: *channel, Pin: *times["pin"]}
		if err := c.Do(ctx, "PUT", "/v1/admin/groups/"+url.PathEscape(pos[0]), in, nil); err != nil {
			return fmt.Errorf("fleet group: %w", err)
		}
		return report(st, *asJSON, in, "group %s: channel %s\n", in.Name, in.Channel)
	default: // move
		in := api.MachineGroupRequest{Group: pos[1]}
		if err := c.Do(ctx, "PUT", "/v1/admin/machines/"+url.PathEscape(pos[0])+"/group", in, nil); err != nil {
			return fmt.Errorf("fleet move: %w", err)
		}
		return report(st, *asJSON, in, "machine %s: group %s\n", pos[0], pos[1])
	}
}

func fleetReport(ctx context.Context, st *stdio, c *api.Client, kind string, asJSON bool) error {
	var raw json.RawMessage
	if err := c.Do(ctx, "GET", "/v1/admin/reports/"+kind, nil, &raw); err != nil {
		return fmt.Errorf("fleet %s: %w", kind, err)
	}
	if kind == "patches" {
		// Each patch's rollout, then each fix's coverage of the kernels.
		var fixes []api.FixReport
		var se *api.StatusError
		switch err := c.Do(ctx, "GET", api.PathAdminFixes, nil, &fixes); {
		case errors.As(err, &se) && se.Code == http.StatusNotFound:
			fmt.Fprintln(st.err, "note: the server has no per-fix coverage report (it is older than this stitch): rollouts only")
		case err != nil:
			return fmt.Errorf("fleet %s: %w", kind, err)
		}
		if asJSON {
			return printJSON(st.out, struct {
				Patches json.RawMessage `json:"patches"`
				Fixes   []api.FixReport `json:"fixes,omitempty"`
			}{raw, fixes})
		}
		var rs []api.PatchReport
		if err := json.Unmarshal(raw, &rs); err != nil {
			return fmt.Errorf("fleet %s: the server's answer: %w", kind, err)
		}
		printRollouts(st, rs)
		if len(fixes) > 0 {
			fmt.Fprintln(st.out)
			printFixes(st, fixes)
		}
		return nil
	}
	if asJSON {
		_, err := fmt.Fprintf(st.out, "%s\n", raw)
		return err
	}
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	defer tw.Flush()
	switch kind {
	case "machines":
		var rs []api.MachineReport
		json.Unmarshal(raw, &rs)
		fmt.Fprintln(tw, "MACHINE\tHOST\tKEY\tGROUP\tKERNEL\tPATCH LEVEL\tLEVELS\tAPPLIED\tMISSING\tFIXED CVES")
		for _, r := range rs {
			level := "-"
			if !r.PatchLevel.IsZero() {
				level = r.PatchLevel.Format(time.DateOnly)
			}
			var levels []string
			for _, l := range r.Levels {
				levels = append(levels, fmt.Sprintf("%s %d", l.Stream, l.Number))
				if l.State == "blocklisted" {
					levels[len(levels)-1] += " (blocklisted)"
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", r.ID, r.Hostname, r.KeyID, r.Group, r.KernelRelease, level, orDash(strings.Join(levels, ", ")),
				len(r.Applied), len(r.Missing), strings.Join(r.FixedCVEs, " "))
		}
	case "cves":
		var rs []api.CVEReport
		json.Unmarshal(raw, &rs)
		fmt.Fprintln(tw, "CVE\tFIXED\tEXPOSED\tNOT COVERED\tPATCHES\tCONTAINED IN")
		for _, r := range rs {
			fixed := strconv.Itoa(r.Fixed)
			if r.ContainedMachines > 0 {
				fixed += fmt.Sprintf(" (%d by source)", r.ContainedMachines)
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\n", r.CVE, fixed, len(r.Exposed), r.NotCoveredMachines, orDash(strings.Join(r.Patches, " ")), orDash(recordKernels(r.Records)))
		}
		// Where the fleet runs kernels nothing covers, under the table.
		tw.Flush()
		for _, r := range rs {
			if len(r.NotCoveredKernels) > 0 {
				fmt.Fprintf(st.out, "%s not covered on %s\n", r.CVE, kernelCounts(r.NotCoveredKernels))
			}
		}
	}
	return nil
}

// printRollouts is the table of each patch's rollout, and under it why a
// stopped rollout stopped.
func printRollouts(st *stdio, rs []api.PatchReport) {
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tSTATE\tSTAGE\tELIGIBLE\tAPPLIED\tHEALTHY\tLOST\tFAILED\tPENDING\tCVES")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%d (%.0f%%)\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", r.Target, r.State, r.Stage, r.Share*100, r.Eligible, r.Applied, r.Healthy, r.Lost, r.Failed, r.Pending, strings.Join(r.CVEs, " "))
	}
	tw.Flush()
	for _, r := range rs {
		if r.Reason != "" && r.State != "running" && r.State != "complete" {
			fmt.Fprintf(st.out, "%s %s: %s\n", r.Target, r.State, r.Reason)
		}
	}
}

// printFixes is the table of each fix's kernels: one line per kernel,
// patched (with its rollout's state), containing the fix, or not covered.
func printFixes(st *stdio, fixes []api.FixReport) {
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	defer tw.Flush()
	fmt.Fprintln(tw, "FIX\tUPSTREAM\tCVES\tKERNEL\tBUILD-ID\tCOVERAGE\tMACHINES\tAPPLIED")
	for _, f := range fixes {
		head := []string{strings.Join(f.Names, " "), orDash(shortCommits(f.Upstream)), orDash(strings.Join(f.CVEs, " "))}
		line := func(k api.KernelCoverage, coverage, applied string) {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", head[0], head[1], head[2], k.Release, shortID(k.BuildID), coverage, k.Machines, applied)
			head = []string{"", "", ""} // the fix's columns once, on its first line
		}
		for _, k := range f.Patched {
			var states []string
			for _, p := range k.Patches {
				states = append(states, p.State)
			}
			line(k, "patch ("+strings.Join(states, ", ")+")", strconv.Itoa(k.Applied))
		}
		for _, k := range f.Contained {
			line(k, "contains the fix", "-")
		}
		for _, k := range f.NotCovered {
			line(k, "NOT COVERED", "-")
		}
		if len(f.Patched)+len(f.Contained)+len(f.NotCovered) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\t-\t0\t-\n", head[0], head[1], head[2])
		}
	}
}

// printLevels is the table of each kernel's streams: per level, its
// rollout, the machines that run it and what it carries, the machines on
// no level first; under it, the fixes each level withdraws and why a
// stopped level's rollout stopped.
func printLevels(st *stdio, ks []api.KernelLevels) {
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "KERNEL\tBUILD-ID\tSTREAM\tLEVEL\tSTATE\tSTAGE\tMACHINES\tFIXES\tCVES")
	var notes []string
	for _, k := range ks {
		head := []string{k.Release, shortID(k.BuildID)}
		for _, s := range k.Streams {
			fmt.Fprintf(tw, "%s\t%s\t%s\tnone\t-\t-\t%d\t-\t-\n", head[0], head[1], s.Stream, s.NoLevel)
			head = []string{"", ""} // the kernel's columns once, on its first line
			for _, l := range s.Levels {
				fmt.Fprintf(tw, "\t\t\t%d\t%s\t%d (%.0f%%)\t%d\t%d\t%s\n", l.Number, l.State, l.Stage, l.Share*100, l.Machines, len(l.Fixes), orDash(strings.Join(l.CVEs, " ")))
				if len(l.Withdrawn) > 0 {
					notes = append(notes, fmt.Sprintf("%s level %d on %s withdraws %s", s.Stream, l.Number, k.Release, strings.Join(l.Withdrawn, " ")))
				}
				if l.Reason != "" && l.State != "running" && l.State != "complete" {
					notes = append(notes, fmt.Sprintf("%s %s: %s", l.Target, l.State, l.Reason))
				}
			}
		}
	}
	tw.Flush()
	for _, n := range notes {
		fmt.Fprintln(st.out, n)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// shortID is a build-id's first 12 digits, enough to tell two builds of
// one release apart.
func shortID(id string) string { return id[:min(12, len(id))] }

func shortCommits(cs []string) string {
	var out []string
	for _, c := range cs {
		out = append(out, shortID(c))
	}
	return strings.Join(out, " ")
}

// recordKernels are the releases of contained records' targets
// (contained/RELEASE/NAME-HASH.json).
func recordKernels(records []string) string {
	var out []string
	for _, r := range records {
		if parts := strings.Split(r, "/"); len(parts) == 3 && !slices.Contains(out, parts[1]) {
			out = append(out, parts[1])
		}
	}
	return strings.Join(out, " ")
}

// kernelCounts is "RELEASE (N machines), ...", with the build-id where a
// release runs in more than one build.
func kernelCounts(ks []api.KernelCoverage) string {
	builds := map[string]int{}
	for _, k := range ks {
		builds[k.Release]++
	}
	var out []string
	for _, k := range ks {
		name := k.Release
		if builds[k.Release] > 1 {
			name += " build " + shortID(k.BuildID)
		}
		unit := "machines"
		if k.Machines == 1 {
			unit = "machine"
		}
		out = append(out, fmt.Sprintf("%s (%d %s)", name, k.Machines, unit))
	}
	return strings.Join(out, ", ")
}

// fleetDate prints t's day, or "-" for none.
func fleetDate(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.DateOnly)
}
