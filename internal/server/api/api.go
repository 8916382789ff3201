// Package api holds the JSON wire types of the server's machine API (and
// its admin API) and a typed client for them. It is imported by the agent
// and the stitch CLI, and by the server, so that both sides of the wire use
// the same definitions; it depends on nothing but the standard library.
package api

import (
	"fmt"
	"regexp"
	"slices"
	"time"
)

// Paths of the machine API.
const (
	PathEnroll  = "/v1/machines"
	PathSelf    = "/v1/machines/self"
	PathCheckIn = "/v1/machines/self/checkin"
	PathHealth  = "/v1/machines/self/health"
)

// EnrollRequest is what a machine sends to enroll (no token yet: the
// enrollment key is the credential).
type EnrollRequest struct {
	Key      string `json:"key"`
	Hostname string `json:"hostname"`
	// Group is the machine group to join (channel and pin follow the
	// group); empty means the key's group, else "default".
	Group string `json:"group,omitempty"`
}

// EnrollResponse carries the machine's id and its bearer token, which is
// shown only this once (the server stores a hash).
type EnrollResponse struct {
	MachineID string `json:"machine_id"`
	Token     string `json:"token"`
}

// Error is every error response's body.
type Error struct {
	Error string `json:"error"`
}

// Patch states a machine reports in a check-in.
const (
	StateApplied  = "applied"  // loaded and enabled
	StateReverted = "reverted" // was applied, now removed
	StateFailed   = "failed"   // apply was attempted and failed
	StateRefused  = "refused"  // the agent would not try (wrong kernel, verification)
)

// PatchState is one patch as the machine sees it.
type PatchState struct {
	Target string    `json:"target"` // TUF target name
	Name   string    `json:"name"`   // module (patch) name
	State  string    `json:"state"`  // StateApplied, ...
	Since  time.Time `json:"since"`
	Reason string    `json:"reason,omitempty"`
}

// CheckIn is a machine's periodic report: its exact kernel and the patches
// it holds.
type CheckIn struct {
	KernelRelease string       `json:"kernel_release"`
	KernelBuildID string       `json:"kernel_build_id"`
	AgentVersion  string       `json:"agent_version"`
	Patches       []PatchState `json:"patches"`
}

// Operations the server orders.
const (
	OpApply  = "apply"
	OpRevert = "revert"
)

// Action is one order for the machine.
type Action struct {
	Target string   `json:"target"` // fetch it with bundle.Client
	Name   string   `json:"name"`
	CVEs   []string `json:"cves,omitempty"`
	Op     string   `json:"op"` // OpApply or OpRevert
}

// CheckInResponse answers a check-in: the patches eligible now for this
// machine's kernel, channel and rollout stage ("apply"), and the ones it
// applied that have since been blocklisted ("revert").
type CheckInResponse struct {
	Actions            []Action `json:"actions"`
	NextCheckinSeconds int      `json:"next_checkin_seconds"`
}

// Health checks: right after the apply, then at fixed times after it, and
// after a reboot.
const (
	CheckApply = "apply"
	Check1m    = "1m"
	Check5m    = "5m"
	Check15m   = "15m"
	CheckBoot  = "boot"
)

// Reasons for an unhealthy report.
const (
	ReasonApplyFailed         = "apply-failed"
	ReasonTransitionTimeout   = "transition-timeout"
	ReasonKernelWarning       = "kernel-warning"
	ReasonOops                = "oops"
	ReasonCrashLoop           = "crash-loop"
	ReasonFingerprintMismatch = "fingerprint-mismatch"
	ReasonVerifyFailed        = "verify-failed"
	// ReasonRollbackFailed: the patch had to be taken out again (its
	// transition stalled, or the kernel was in trouble after it) and the
	// rollback failed too; the machine may hold it partly applied.
	ReasonRollbackFailed = "rollback-failed"
)

var (
	states  = []string{StateApplied, StateReverted, StateFailed, StateRefused}
	checks  = []string{CheckApply, Check1m, Check5m, Check15m, CheckBoot}
	reasons = []string{ReasonApplyFailed, ReasonTransitionTimeout, ReasonKernelWarning, ReasonOops, ReasonCrashLoop, ReasonFingerprintMismatch, ReasonVerifyFailed, ReasonRollbackFailed}
)

// Health is a machine's report on one patch at one check.
type Health struct {
	Target  string `json:"target"`
	Name    string `json:"name"`
	Check   string `json:"check"` // CheckApply, ...
	Healthy bool   `json:"healthy"`
	Reason  string `json:"reason,omitempty"` // when unhealthy: ReasonApplyFailed, ...
	Detail  string `json:"detail,omitempty"` // e.g. the kernel's warning line
}

// MachineView is what a machine may read about itself.
type MachineView struct {
	ID            string       `json:"id"`
	Hostname      string       `json:"hostname"`
	Group         string       `json:"group"`
	Channel       string       `json:"channel"`
	KernelRelease string       `json:"kernel_release,omitempty"`
	KernelBuildID string       `json:"kernel_build_id,omitempty"`
	AgentVersion  string       `json:"agent_version,omitempty"`
	LastCheckIn   time.Time    `json:"last_checkin,omitzero"`
	Patches       []PatchState `json:"patches"`
}

var (
	targetRe  = regexp.MustCompile(`^[A-Za-z0-9._+~-]{1,64}/[A-Za-z0-9_-]{1,55}-[0-9a-f]{16}\.stitch$`)
	nameRe    = regexp.MustCompile(`^[A-Za-z0-9_-]{1,55}$`)
	releaseRe = regexp.MustCompile(`^[A-Za-z0-9._+~-]{1,64}$`)
	buildIDRe = regexp.MustCompile(`^[0-9a-f]{8,128}$`)
	versionRe = regexp.MustCompile(`^[A-Za-z0-9._+~-]{0,64}$`)
)

// MaxRequest is the largest request body the server reads: the API's
// requests are small, the largest a check-in of MaxPatches patches.
const MaxRequest = 256 << 10

// MaxPatches bounds the patches one check-in may list, so that a check-in
// fits MaxRequest.
const MaxPatches = 128

// ValidTarget says whether s is a bundle's target name in a repository
// (bundle.TargetName's form: RELEASE/NAME-HASH16.stitch).
func ValidTarget(s string) bool { return targetRe.MatchString(s) }

// Validate names the first field that is wrong and what it should be.
func (c *CheckIn) Validate() error {
	switch {
	case !releaseRe.MatchString(c.KernelRelease):
		return fmt.Errorf("kernel_release %q: want uname -r", c.KernelRelease)
	case !buildIDRe.MatchString(c.KernelBuildID):
		return fmt.Errorf("kernel_build_id %q: want the running vmlinux's GNU build-id in lower-case hex", c.KernelBuildID)
	case !versionRe.MatchString(c.AgentVersion):
		return fmt.Errorf("agent_version %q: want at most 64 characters of A-Z, a-z, 0-9, ._+~-", c.AgentVersion)
	case len(c.Patches) > MaxPatches:
		return fmt.Errorf("patches: %d listed, at most %d", len(c.Patches), MaxPatches)
	}
	for i, p := range c.Patches {
		switch {
		case !ValidTarget(p.Target):
			return fmt.Errorf("patches[%d].target %q: want a repository target name (RELEASE/NAME-HASH.stitch)", i, p.Target)
		case !nameRe.MatchString(p.Name):
			return fmt.Errorf("patches[%d].name %q: want the module name", i, p.Name)
		case !slices.Contains(states, p.State):
			return fmt.Errorf("patches[%d].state %q: want one of %v", i, p.State, states)
		case len(p.Reason) > 1024:
			return fmt.Errorf("patches[%d].reason: %d bytes, at most 1024", i, len(p.Reason))
		}
	}
	return nil
}

// Validate names the first field that is wrong and what it should be.
func (h *Health) Validate() error {
	switch {
	case !ValidTarget(h.Target):
		return fmt.Errorf("target %q: want a repository target name (RELEASE/NAME-HASH.stitch)", h.Target)
	case !nameRe.MatchString(h.Name):
		return fmt.Errorf("name %q: want the module name", h.Name)
	case !slices.Contains(checks, h.Check):
		return fmt.Errorf("check %q: want one of %v", h.Check, checks)
	case h.Healthy && h.Reason != "":
		return fmt.Errorf("reason %q given for a healthy report: leave it empty", h.Reason)
	case !h.Healthy && !slices.Contains(reasons, h.Reason):
		return fmt.Errorf("reason %q: an unhealthy report needs one of %v", h.Reason, reasons)
	case len(h.Detail) > 4096:
		return fmt.Errorf("detail: %d bytes, at most 4096", len(h.Detail))
	}
	return nil
}
