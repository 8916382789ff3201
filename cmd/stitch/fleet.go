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

// adminCmd is what every admin command has: its flag set, with the
// server (default STITCH_SERVER) and --json.
type adminCmd struct {
	fs     *flag.FlagSet
	server *string
	json   *bool
}

func newAdminCmd(st *stdio, name, args, about string) *adminCmd {
	fs := newFlagSet(st, name, args, about+"\n\nThe server's token comes from "+envToken+" (or "+envAdminToken+"), never a flag, so it stays out of ps.")
	return &adminCmd{
		fs:     fs,
		server: fs.String("server", envDefault(envServer, "http://127.0.0.1:8440"), "the stitch server's URL (default from "+envServer+")"),
		json:   fs.Bool("json", false, "print JSON"),
	}
}

// client parses args (n positional arguments) and makes the API client.
func (a *adminCmd) client(args []string, n int) (*api.Client, error) {
	if err := parseArgs(a.fs, args, n); err != nil {
		return nil, err
	}
	token := envDefault(envToken, os.Getenv(envAdminToken))
	if token == "" {
		return nil, usageError{fmt.Errorf("set %s to the server's admin token", envToken)}
	}
	return &api.Client{BaseURL: *a.server, Token: token, HTTP: &http.Client{Timeout: time.Minute}}, nil
}

// runRollout: stitch rollout start|halt|resume|blocklist TARGET [--reason R].
func runRollout(ctx context.Context, st *stdio, args []string) error {
	op := func(name, summary string) subcommand {
		return subcommand{name: name, args: "TARGET", summary: summary, run: func(ctx context.Context, st *stdio, args []string) error {
			a := newAdminCmd(st, "rollout "+name, "TARGET", summary+".")
			reason := a.fs.String("reason", "", "why (kept with the rollout)")
			c, err := a.client(args, 1)
			if err != nil {
				return err
			}
			target := a.fs.Arg(0)
			var out api.PatchReport
			if name == "start" {
				err = c.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, &out)
			} else {
				err = c.Do(ctx, "POST", "/v1/admin/rollouts/"+target+"/"+name, api.RolloutRequest{Reason: *reason}, &out)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", target, err)
			}
			if l := out.Level; l != nil {
				return report(st, *a.json, out, "%s: level %d of stream %s: %s at stage %d (%.0f%%) %s\n", out.Target, l.Number, l.Stream, out.State, out.Stage, out.Share*100, out.Reason)
			}
			return report(st, *a.json, out, "%s: %s at stage %d (%.0f%%) %s\n", out.Target, out.State, out.Stage, out.Share*100, out.Reason)
		}}
	}
	return runGroup(ctx, st, "rollout", []subcommand{
		op("start", "register a published patch and start its staged rollout"),
		op("halt", "stop offering a patch to more machines"),
		op("resume", "go on with a halted rollout"),
		op("blocklist", "withdraw a patch: agents revert it"),
	}, args)
}

// runFleet: stitch fleet SUBCOMMAND: reports, settings and revocation.
func runFleet(ctx context.Context, st *stdio, args []string) error {
	reportCmd := func(kind, summary string) subcommand {
		return subcommand{name: kind, summary: summary, run: func(ctx context.Context, st *stdio, args []string) error {
			a := newAdminCmd(st, "fleet "+kind, "", summary+".")
			c, err := a.client(args, 0)
			if err != nil {
				return err
			}
			return fleetReport(ctx, st, c, kind, *a.json)
		}}
	}
	return runGroup(ctx, st, "fleet", []subcommand{
		reportCmd("patches", "each patch's rollout and each fix's coverage of the kernels"),
		{name: "machines", summary: "machines: search, filter, sort, page; --coverage: each machine's patches and CVEs", run: runFleetMachines},
		reportCmd("cves", "each CVE: machines fixed, exposed, not covered"),
		{name: "levels", summary: "each kernel's cumulative patch levels and their rollouts", run: runFleetLevels},
		{name: "keys", summary: "enrollment keys", run: listCmd("fleet keys", "Lists the enrollment keys: group, machines enrolled of the most allowed, dates.",
			api.PathAdminKeys, "KEY\tGROUP\tMACHINES\tCREATED\tEXPIRES\tREVOKED", func(k api.KeyInfo) string {
				return fmt.Sprintf("%s\t%s\t%d of %d\t%s\t%s\t%s", k.ID, k.Group, k.Machines, k.MaxMachines, fleetDate(k.CreatedAt), fleetDate(k.ExpiresAt), fleetDate(k.RevokedAt))
			})},
		{name: "channels", summary: "channels and their deploy delays", run: listCmd("fleet channels", "Lists the channels: a channel offers a patch once its delay has passed since the patch's registration, and none registered after its cutoff.",
			"/v1/admin/channels", "CHANNEL\tDELAY\tCUTOFF", func(ch api.Channel) string {
				return fmt.Sprintf("%s\t%s\t%s", ch.Name, time.Duration(ch.DelaySeconds)*time.Second, fleetDate(ch.Cutoff))
			})},
		{name: "groups", summary: "machine groups and their channels", run: listCmd("fleet groups", "Lists the machine groups with their channel and pin.",
			"/v1/admin/groups", "GROUP\tCHANNEL\tPIN", func(g api.Group) string {
				return fmt.Sprintf("%s\t%s\t%s", g.Name, g.Channel, fleetDate(g.Pin))
			})},
		{name: "key", summary: "create an enrollment key", run: runFleetKey},
		{name: "revoke", args: "KEY", summary: "revoke an enrollment key", run: runFleetRevoke},
		{name: "delete", args: "MACHINE", summary: "delete a machine: its token stops working", run: runFleetDelete},
		{name: "channel", args: "NAME", summary: "create or change a channel", run: runFleetChannel},
		{name: "group", args: "NAME", summary: "create or change a group", run: runFleetGroup},
		{name: "move", args: "MACHINE GROUP", summary: "move a machine to another group", run: runFleetMove},
		{name: "operators", summary: "named operator tokens and their roles", run: listCmd("fleet operators", "Lists the named operator tokens and their roles.",
			api.PathAdminOperators, "OPERATOR\tROLE\tCREATED\tREVOKED", func(o api.Operator) string {
				return fmt.Sprintf("%s\t%s\t%s\t%s", o.Name, o.Role, fleetDate(o.CreatedAt), fleetDate(o.RevokedAt))
			})},
		{name: "operator", args: "NAME", summary: "create a named operator token with a role", run: runFleetOperator},
		{name: "revoke-operator", args: "NAME", summary: "revoke an operator's token", run: runFleetRevokeOperator},
		{name: "audit", summary: "the audit log of operator actions", run: runFleetAudit},
	}, args)
}

// listCmd is a subcommand that lists what GET path answers: as JSON, or
// a table of header and one row per item.
func listCmd[T any](name, about, path, header string, row func(T) string) func(context.Context, *stdio, []string) error {
	return func(ctx context.Context, st *stdio, args []string) error {
		a := newAdminCmd(st, name, "", about)
		c, err := a.client(args, 0)
		if err != nil {
			return err
		}
		var items []T
		if err := c.Do(ctx, "GET", path, nil, &items); err != nil {
			return err
		}
		if *a.json {
			return printJSON(st.out, items)
		}
		tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, header)
		for _, it := range items {
			fmt.Fprintln(tw, row(it))
		}
		return tw.Flush()
	}
}

func runFleetLevels(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet levels", "", "Each kernel's streams of cumulative patch levels: per level its rollout, the machines on it and what it carries.")
	c, err := a.client(args, 0)
	if err != nil {
		return err
	}
	ls, err := c.Levels(ctx)
	var se *api.StatusError
	switch {
	case errors.As(err, &se) && se.Code == http.StatusNotFound:
		return fmt.Errorf("the server has no levels report (it is older than this stitch): %w", err)
	case err != nil:
		return err
	}
	if *a.json {
		return printJSON(st.out, ls)
	}
	printLevels(st, ls)
	return nil
}

// rfc3339 parses an optional time flag.
func rfc3339(flagName, v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return t, usageError{fmt.Errorf("--%s %q: want RFC 3339, e.g. 2026-12-01T00:00:00Z", flagName, v)}
	}
	return t, nil
}

func runFleetKey(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet key", "", "Creates an enrollment key; it is shown once.")
	maxMachines := a.fs.Int("max-machines", 0, "machines the key may enroll (0: the free tier's 3)")
	expires := a.fs.String("expires", "", "expiry, RFC 3339 (empty: never)")
	group := a.fs.String("group", "", "the group its machines join")
	c, err := a.client(args, 0)
	if err != nil {
		return err
	}
	exp, err := rfc3339("expires", *expires)
	if err != nil {
		return err
	}
	var out api.KeyResponse
	if err := c.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: *maxMachines, ExpiresAt: exp, Group: *group}, &out); err != nil {
		return err
	}
	return report(st, *a.json, out, "%s\n(key %s: up to %d machines, group %s; shown once, keep it secret)\n", out.Key, out.ID, out.MaxMachines, out.Group)
}

func runFleetRevoke(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet revoke", "KEY", "Revokes an enrollment key: it enrolls nothing more.")
	deleteMachines := a.fs.Bool("delete-machines", false, "delete the key's machines too (their tokens stop working)")
	c, err := a.client(args, 1)
	if err != nil {
		return err
	}
	out, err := c.RevokeKey(ctx, a.fs.Arg(0), api.RevokeRequest{DeleteMachines: *deleteMachines})
	if err != nil {
		return err
	}
	if *deleteMachines {
		return report(st, *a.json, out, "key %s revoked; %d machines deleted\n", out.Key.ID, out.DeletedMachines)
	}
	return report(st, *a.json, out, "key %s revoked: it enrolls nothing more; its %d machines stay enrolled (delete them with `stitch fleet delete MACHINE`, or revoke with --delete-machines)\n", out.Key.ID, out.Key.Machines)
}

func runFleetDelete(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet delete", "MACHINE", "Deletes a machine: its token no longer works and its reports no longer count.")
	c, err := a.client(args, 1)
	if err != nil {
		return err
	}
	id := a.fs.Arg(0)
	if err := c.DeleteMachine(ctx, id); err != nil {
		return err
	}
	return report(st, *a.json, map[string]string{"deleted": id}, "machine %s deleted: its token no longer works and its reports no longer count\n", id)
}

func runFleetChannel(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet channel", "NAME", "Creates or changes a channel.")
	delay := a.fs.Duration("delay", 0, "deploy delay after a patch's registration")
	cutoff := a.fs.String("cutoff", "", "no patch registered after this time (RFC 3339)")
	c, err := a.client(args, 1)
	if err != nil {
		return err
	}
	cut, err := rfc3339("cutoff", *cutoff)
	if err != nil {
		return err
	}
	in := api.Channel{Name: a.fs.Arg(0), DelaySeconds: int64(delay.Seconds()), Cutoff: cut}
	if err := c.Do(ctx, "PUT", "/v1/admin/channels/"+url.PathEscape(in.Name), in, nil); err != nil {
		return err
	}
	return report(st, *a.json, in, "channel %s: delay %s\n", in.Name, *delay)
}

func runFleetGroup(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet group", "NAME", "Creates or changes a machine group.")
	channel := a.fs.String("channel", "", "its channel")
	pin := a.fs.String("pin", "", "hold at the patches registered up to this time (RFC 3339)")
	c, err := a.client(args, 1)
	if err != nil {
		return err
	}
	p, err := rfc3339("pin", *pin)
	if err != nil {
		return err
	}
	in := api.Group{Name: a.fs.Arg(0), Channel: *channel, Pin: p}
	if err := c.Do(ctx, "PUT", "/v1/admin/groups/"+url.PathEscape(in.Name), in, nil); err != nil {
		return err
	}
	return report(st, *a.json, in, "group %s: channel %s\n", in.Name, in.Channel)
}

func runFleetMove(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet move", "MACHINE GROUP", "Moves a machine to another group.")
	c, err := a.client(args, 2)
	if err != nil {
		return err
	}
	id, in := a.fs.Arg(0), api.MachineGroupRequest{Group: a.fs.Arg(1)}
	if err := c.Do(ctx, "PUT", "/v1/admin/machines/"+url.PathEscape(id)+"/group", in, nil); err != nil {
		return err
	}
	return report(st, *a.json, in, "machine %s: group %s\n", id, in.Group)
}

func fleetReport(ctx context.Context, st *stdio, c *api.Client, kind string, asJSON bool) error {
	var raw json.RawMessage
	if err := c.Do(ctx, "GET", "/v1/admin/reports/"+kind, nil, &raw); err != nil {
		return err
	}
	if kind == "patches" {
		// Each patch's rollout, then each fix's coverage of the kernels.
		var fixes []api.FixReport
		var se *api.StatusError
		switch err := c.Do(ctx, "GET", api.PathAdminFixes, nil, &fixes); {
		case errors.As(err, &se) && se.Code == http.StatusNotFound:
			fmt.Fprintln(st.err, "note: the server has no per-fix coverage report (it is older than this stitch): rollouts only")
		case err != nil:
			return err
		}
		if asJSON {
			return printJSON(st.out, struct {
				Patches json.RawMessage `json:"patches"`
				Fixes   []api.FixReport `json:"fixes,omitempty"`
			}{raw, fixes})
		}
		var rs []api.PatchReport
		if err := json.Unmarshal(raw, &rs); err != nil {
			return fmt.Errorf("the server's answer: %w", err)
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
		fmt.Fprintln(tw, "MACHINE\tHOST\tKEY\tGROUP\tKERNEL\tPATCH LEVEL\tLEVELS\tAPPLIED\tMISSING\tFIXED CVES\tEXPOSED CVES")
		for _, r := range rs {
			level := fmt.Sprintf("level %d", r.Level) // as `stitch status` on the machine says
			if !r.PatchLevel.IsZero() {
				level += " (" + r.PatchLevel.Format(time.DateOnly) + ")"
			}
			var levels []string
			for _, l := range r.Levels {
				levels = append(levels, fmt.Sprintf("%s %d", l.Stream, l.Number))
				if l.State == "blocklisted" {
					levels[len(levels)-1] += " (blocklisted)"
				}
			}
			kernel := orDash(r.KernelRelease)
			if r.Unsupported != "" {
				kernel += " (unsupported)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", r.ID, r.Hostname, r.KeyID, r.Group, kernel, level, orDash(strings.Join(levels, ", ")),
				len(r.Applied), len(r.Missing), orDash(strings.Join(r.FixedCVEs, " ")), orDash(strings.Join(r.ExposedCVEs, " ")))
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
		// Why an eligible machine has not been offered it yet.
		if r.Waiting > 0 {
			fmt.Fprintf(st.out, "%s: %d machine(s) wait for their channel's deploy delay; the first are offered it from %s (stitch fleet channels)\n", r.Target, r.Waiting, r.WaitingUntil.Format(time.RFC3339))
		}
		if r.Held > 0 {
			fmt.Fprintf(st.out, "%s: %d machine(s) never get it: their channel's cutoff or their group's pin is before its registration\n", r.Target, r.Held)
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

func runFleetOperator(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet operator", "NAME", "Creates a named operator token with a role: "+strings.Join(api.Roles, ", ")+
		" (each may do what the ones before it may: metrics reads /metrics only; read-only reads the reports; operator also runs rollouts and sets channels and groups; admin also manages keys, machines and operators). The token is shown once.")
	role := a.fs.String("role", api.RoleReadOnly, "the operator's role")
	c, err := a.client(args, 1)
	if err != nil {
		return err
	}
	var out api.OperatorResponse
	if err := c.Do(ctx, "POST", api.PathAdminOperators, api.OperatorRequest{Name: a.fs.Arg(0), Role: *role}, &out); err != nil {
		return err
	}
	return report(st, *a.json, out, "%s\n(operator %s, role %s; shown once, keep it secret: give it as %s)\n", out.Token, out.Name, out.Role, envToken)
}

func runFleetRevokeOperator(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet revoke-operator", "NAME", "Revokes an operator's token: it stops working at once, and the operator's console sessions end.")
	c, err := a.client(args, 1)
	if err != nil {
		return err
	}
	var out api.Operator
	if err := c.Do(ctx, "POST", api.PathAdminOperators+"/"+url.PathEscape(a.fs.Arg(0))+"/revoke", nil, &out); err != nil {
		return err
	}
	return report(st, *a.json, out, "operator %s revoked\n", out.Name)
}

func runFleetAudit(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet audit", "", "The audit log, newest first: every operator action that changed something, and every one refused.")
	actor := a.fs.String("actor", "", "only this operator's actions")
	limit := a.fs.Int("limit", 50, "entries at most (up to 1000)")
	c, err := a.client(args, 0)
	if err != nil {
		return err
	}
	q := url.Values{"limit": {strconv.Itoa(*limit)}}
	if *actor != "" {
		q.Set("actor", *actor)
	}
	var es []api.AuditEntry
	if err := c.Do(ctx, "GET", api.PathAdminAudit+"?"+q.Encode(), nil, &es); err != nil {
		return err
	}
	if *a.json {
		return printJSON(st.out, es)
	}
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	defer tw.Flush()
	fmt.Fprintln(tw, "TIME\tOPERATOR\tACTION\tTARGET\tRESULT\tDETAIL")
	for _, e := range es {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d %s\t%s\n", e.At.Format(time.RFC3339), e.Actor, e.Action, e.Target, e.Status, http.StatusText(e.Status), e.Detail)
	}
	return nil
}

func runFleetMachines(ctx context.Context, st *stdio, args []string) error {
	a := newAdminCmd(st, "fleet machines", "", "Lists machines a page at a time: hostname, group, kernel, agent, last check-in, state (stale: no check-in for two intervals; unsupported: the kernel cannot live-patch). With --coverage, each machine's patch level, applied and missing patches and fixed CVEs (the whole fleet at once).")
	search := a.fs.String("search", "", "a part of the hostname or machine id")
	kernel := a.fs.String("kernel", "", "only machines on this kernel release")
	group := a.fs.String("group", "", "only machines of this group")
	state := a.fs.String("state", "", "only stale, unsupported or never (never checked in) machines")
	sortBy := a.fs.String("sort", "hostname", "hostname, kernel, group or last_checkin")
	desc := a.fs.Bool("desc", false, "sort descending")
	limit := a.fs.Int("limit", 100, "machines a page (up to 1000)")
	page := a.fs.Int("page", 1, "the page to show")
	coverage := a.fs.Bool("coverage", false, "each machine's patches and CVEs instead (no filters)")
	c, err := a.client(args, 0)
	if err != nil {
		return err
	}
	if *coverage {
		return fleetReport(ctx, st, c, "machines", *a.json)
	}
	if *page < 1 {
		return usageError{fmt.Errorf("--page %d: want 1 or more", *page)}
	}
	q := url.Values{"sort": {*sortBy}, "limit": {strconv.Itoa(*limit)}, "offset": {strconv.Itoa((*page - 1) * *limit)}}
	for k, v := range map[string]string{"q": *search, "kernel": *kernel, "group": *group, "state": *state} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if *desc {
		q.Set("desc", "1")
	}
	var out api.MachinePage
	if err := c.Do(ctx, "GET", "/v1/admin/machines?"+q.Encode(), nil, &out); err != nil {
		return err
	}
	if *a.json {
		return printJSON(st.out, out)
	}
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "MACHINE\tHOST\tGROUP\tKERNEL\tAGENT\tLAST CHECK-IN\tSTATE")
	for _, m := range out.Machines {
		state := "ok"
		switch {
		case m.Unsupported != "":
			state = "unsupported"
		case m.LastCheckIn.IsZero():
			state = "never checked in"
		case m.Stale:
			state = "stale"
		}
		last := "-"
		if !m.LastCheckIn.IsZero() {
			last = m.LastCheckIn.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Hostname, m.Group, orDash(m.KernelRelease), orDash(m.AgentVersion), last, state)
	}
	tw.Flush()
	if n := len(out.Machines); n > 0 {
		fmt.Fprintf(st.out, "machines %d-%d of %d", out.Offset+1, out.Offset+n, out.Total)
		if out.Offset+n < out.Total {
			fmt.Fprintf(st.out, " (next: --page %d)", *page+1)
		}
		fmt.Fprintln(st.out)
	} else {
		fmt.Fprintf(st.out, "no machine on this page (%d in all)\n", out.Total)
	}
	return nil
}
