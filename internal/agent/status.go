package agent

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/livepatch"
)

// Coverage is the one-word answer a monitoring check wants.
type Coverage string

const (
	UpToDate   Coverage = "up-to-date"  // every offered patch is applied and loaded
	Pending    Coverage = "pending"     // patches were offered that are not applied yet
	NotCovered Coverage = "not-covered" // no agent, no livepatch, loading off, or a patch failed or is not loaded
	Error      Coverage = "error"       // the agent cannot check in, or has not for too long
)

// Status is what the agent knows of the machine's protection.
type Status struct {
	Coverage Coverage `json:"coverage"`
	Why      string   `json:"why,omitempty"`
	Enrolled bool     `json:"enrolled"`
	Server   string   `json:"server,omitempty"`
	Repo     string   `json:"repo,omitempty"`
	Machine  string   `json:"machine_id,omitempty"`
	// Level is the live level's number when one is loaded, and
	// otherwise counts the agent's patches loaded in the running kernel;
	// Effective names the kernel with it, e.g. "6.1.0-54-amd64 + stitch
	// level 7 (12 fixes, CVE-2024-1086, ...) + 1 hot-fix".
	Level     int    `json:"level"`
	Effective string `json:"effective_kernel"`
	// LiveLevel is the level of a patch stream loaded now, from its
	// manifest; HotFixes the patches loaded on top of it.
	LiveLevel   *LevelStatus  `json:"live_level,omitempty"`
	HotFixes    []string      `json:"hot_fixes,omitempty"`
	FixedCVEs   []string      `json:"fixed_cves"`
	Patches     []PatchStatus `json:"patches"`
	Pending     []string      `json:"pending,omitempty"`
	Disabled    string        `json:"disabled,omitempty"` // why loading is off
	LastCheckIn time.Time     `json:"last_checkin,omitzero"`
	NextCheckIn time.Time     `json:"next_checkin,omitzero"`
	LastError   string        `json:"last_error,omitempty"`
	// RepoError is the last refusal of the patch repository (TUF) or
	// failed download; the patches it held back are pending.
	// Signing: would the kernel load the fleet's signed patches.
	Signing     *SigningStatus `json:"module_signing,omitempty"`
	RepoError   string         `json:"repo_error,omitempty"`
	RepoErrorAt time.Time      `json:"repo_error_at,omitzero"`
}

// LevelStatus is a live level: its stream, number and what it carries.
type LevelStatus struct {
	Stream     string   `json:"stream"`
	Number     int      `json:"level"`
	Supersedes int      `json:"supersedes"`
	Name       string   `json:"name"`
	Target     string   `json:"target"`
	Fixes      []string `json:"fixes"`
	CVEs       []string `json:"cves"`
	Withdrawn  []string `json:"withdrawn,omitempty"`
}

// PatchStatus is one of the agent's patches for the running kernel.
type PatchStatus struct {
	Name   string    `json:"name"`
	Target string    `json:"target"`
	CVEs   []string  `json:"cves"`
	State  string    `json:"state"`
	Loaded bool      `json:"loaded"`
	Since  time.Time `json:"since"`
	Reason string    `json:"reason,omitempty"`
	Detail string    `json:"detail,omitempty"`
	// Stream and Level place a level; Superseded marks one a newer
	// level replaced (kept to fall back to); HotFix a patch loaded on
	// top of the live level.
	Stream     string `json:"stream,omitempty"`
	Level      int    `json:"level,omitempty"`
	Superseded bool   `json:"superseded,omitempty"`
	HotFix     bool   `json:"hot_fix,omitempty"`
}

// Status reads the agent's state without taking its lock, and judges it
// against the kernel's livepatch state ks.
func (a *Agent) Status(ks *livepatch.Status) (*Status, error) {
	out := &Status{Effective: ks.Release, FixedCVEs: []string{}, Patches: []PatchStatus{}}
	cfg, _, err := a.config()
	if errors.Is(err, ErrNotEnrolled) {
		out.Coverage, out.Why = NotCovered, fmt.Sprintf("no agent enrolled in %s (stitch agent enroll)", a.Dir)
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	st, err := LoadState(a.Dir)
	if err != nil {
		return nil, err
	}
	out.Enrolled, out.Server, out.Repo, out.Machine = true, cfg.Server, cfg.Repo, cfg.MachineID
	out.LastCheckIn, out.NextCheckIn, out.LastError, out.Pending = st.LastCheckIn, st.NextCheckIn, st.LastError, st.Pending
	out.RepoError, out.RepoErrorAt = st.RepoError, st.RepoErrorAt
	_, out.Disabled = a.Disabled()
	if out.Signing, err = a.Signing(ks.Signing); err != nil {
		return nil, err
	}
	loaded := map[string]bool{}
	for _, p := range ks.Patches {
		loaded[p.Name] = p.Enabled
	}
	var live *Patch
	for _, p := range st.Patches {
		if p.Level != nil && p.State == contract.StateApplied && loaded[p.Name] && p.Release == ks.Release && p.BuildID == ks.BuildID {
			live = p
		}
	}
	var failed, missing, halfOut []string
	count := 0
	for _, p := range st.Patches {
		if p.Release != ks.Release || p.BuildID != ks.BuildID {
			continue
		}
		ps := PatchStatus{Name: p.Name, Target: p.Target, CVEs: p.CVEs, State: p.State, Since: p.Since, Reason: p.Reason, Detail: p.Detail, Superseded: p.Superseded}
		if ps.CVEs == nil {
			ps.CVEs = []string{}
		}
		if p.Level != nil {
			ps.Stream, ps.Level = p.Level.Stream, p.Level.Number
		}
		ps.Loaded = p.State == contract.StateApplied && loaded[p.Name]
		ps.HotFix = ps.Loaded && live != nil && !p.Replace
		if ps.HotFix {
			out.HotFixes = append(out.HotFixes, p.Name)
		}
		out.Patches = append(out.Patches, ps)
		switch {
		case ps.Loaded:
			count++
			out.FixedCVEs = append(out.FixedCVEs, p.CVEs...)
		case p.State == contract.StateApplied:
			missing = append(missing, p.Name)
		case p.State == contract.StateFailed || p.State == contract.StateRefused:
			failed = append(failed, p.Name)
			if p.Reason == contract.ReasonRollbackFailed {
				// Its crash marker lasts while the kernel may hold it.
				if _, err := os.Stat(a.markerPath(p.Name)); err == nil {
					halfOut = append(halfOut, p.Name)
				}
			}
		}
	}
	slices.Sort(out.FixedCVEs)
	out.FixedCVEs = slices.Compact(out.FixedCVEs)
	switch {
	case live != nil:
		out.Level = live.Level.Number
		out.LiveLevel = &LevelStatus{Stream: live.Level.Stream, Number: live.Level.Number, Supersedes: live.Level.Supersedes,
			Name: live.Name, Target: live.Target, Fixes: live.Fixes, CVEs: live.CVEs, Withdrawn: live.Level.Withdrawn}
		if out.LiveLevel.Fixes == nil {
			out.LiveLevel.Fixes = []string{}
		}
		if out.LiveLevel.CVEs == nil {
			out.LiveLevel.CVEs = []string{}
		}
		out.Effective = fmt.Sprintf("%s + stitch level %d%s", ks.Release, out.Level, levelNote(out.LiveLevel))
		if n := len(out.HotFixes); n > 0 {
			out.Effective += fmt.Sprintf(" + %d hot-fix%s", n, map[bool]string{true: "es"}[n > 1])
		}
	case count > 0:
		out.Level = count
		out.Effective = fmt.Sprintf("%s + stitch level %d", ks.Release, out.Level)
	}
	// Overdue: a whole interval (as last planned) past the next check-in.
	overdue := !st.NextCheckIn.IsZero() && a.now().After(st.NextCheckIn.Add(st.NextCheckIn.Sub(st.LastCheckIn)))
	switch {
	case len(halfOut) > 0:
		out.Coverage, out.Why = NotCovered, fmt.Sprintf("could not take out %v after it failed: the kernel may hold it partly applied (see its detail, and dmesg; `stitch revert NAME` once its transition is over, or reboot)", halfOut)
	case !ks.Livepatch: // whatever else holds, this machine cannot be covered
		out.Coverage, out.Why = NotCovered, unsupportedReason
	case st.LastError != "" && st.LastAttempt.After(st.LastCheckIn):
		out.Coverage, out.Why = Error, "last check-in failed: "+st.LastError
	case st.LastCheckIn.IsZero():
		out.Coverage, out.Why = Error, "the agent has not checked in yet"
	case overdue:
		out.Coverage, out.Why = Error, fmt.Sprintf("no check-in since %s (is the agent running? systemctl status stitch-agent)", st.LastCheckIn.Format(time.RFC3339))
	case st.RepoError != "":
		out.Coverage, out.Why = Error, "the patch repository was refused (retrying; no patch is failed for it): "+st.RepoError
	case out.Disabled != "":
		out.Coverage, out.Why = NotCovered, "loading is off: "+out.Disabled
	case out.Signing.Blocked() != "":
		out.Coverage, out.Why = NotCovered, out.Signing.Blocked()
	case len(missing) > 0:
		out.Coverage, out.Why = NotCovered, fmt.Sprintf("applied but not loaded: %v (run stitch agent --boot, or check the boot log)", missing)
	case len(failed) > 0:
		out.Coverage, out.Why = NotCovered, fmt.Sprintf("failed or refused, so their fixes are missing: %v", failed)
	case len(st.Pending) > 0:
		out.Coverage, out.Why = Pending, fmt.Sprintf("%d offered patch(es) not applied yet", len(st.Pending))
	default:
		out.Coverage = UpToDate
	}
	return out, nil
}

// levelNote is what a level carries, for the effective kernel's name:
// " (12 fixes, CVE-2024-1086, CVE-2024-26581, CVE-2024-36971, 4 more CVEs)".
func levelNote(l *LevelStatus) string {
	var parts []string
	switch n := len(l.Fixes); n {
	case 0:
	case 1:
		parts = append(parts, "1 fix")
	default:
		parts = append(parts, fmt.Sprintf("%d fixes", n))
	}
	const shown = 3
	parts = append(parts, l.CVEs[:min(len(l.CVEs), shown)]...)
	if n := len(l.CVEs) - shown; n > 0 {
		parts = append(parts, fmt.Sprintf("%d more CVE%s", n, map[bool]string{true: "s"}[n > 1]))
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, ", ") + ")"
}
