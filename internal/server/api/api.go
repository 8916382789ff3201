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

	"github.com/stitchpatch/stitch/internal/contract"
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
	// Group, when given, must be the key's group: a key decides its
	// machines' group (channel and pin follow it), and the server refuses
	// another with 403. Empty means the key's group.
	Group string `json:"group,omitempty"`
	// HostID identifies the host across enrollments: an application-
	// specific hash of its /etc/machine-id (never the id itself), 32 to
	// 64 lower-case hex digits. The server keeps one record per key and
	// host id: enrolling again gives that record a new token (the old one
	// stops working) and takes no other slot of the key's limit. Empty
	// (older agents): every enrollment is a new machine.
	HostID string `json:"host_id,omitempty"`
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

// PatchState is one patch as the machine sees it.
type PatchState struct {
	Target string    `json:"target"` // TUF target name
	Name   string    `json:"name"`   // module (patch) name
	State  string    `json:"state"`  // contract.StateApplied, ...
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
	// Unsupported, when set, says why this machine's kernel cannot be
	// live-patched (no CONFIG_LIVEPATCH, ...): it is offered nothing and
	// shown as unsupported, not as missing its patches.
	Unsupported string `json:"unsupported,omitempty"`
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
	// Level, for a level of a patch stream (a cumulative patch), is
	// where it stands: a machine holds one level of a stream and takes
	// the newest offered, so it can choose before it fetches anything.
	Level *contract.Level `json:"level,omitempty"`
}

// CheckInResponse answers a check-in: the patches eligible now for this
// machine's kernel, channel and rollout stage ("apply"), and the ones it
// applied that have since been blocklisted ("revert").
type CheckInResponse struct {
	Actions            []Action `json:"actions"`
	NextCheckinSeconds int      `json:"next_checkin_seconds"`
	// Checks is the server's health-check schedule: when, after an
	// apply, the machine reports on a patch. Absent from old servers,
	// whose schedule was contract.DefaultSchedule.
	Checks contract.Schedule `json:"checks,omitempty"`
}

// Health is a machine's report on one patch at one check.
type Health struct {
	Target  string `json:"target"`
	Name    string `json:"name"`
	Check   string `json:"check"` // contract.CheckApply, a check of the schedule, contract.CheckBoot
	Healthy bool   `json:"healthy"`
	Reason  string `json:"reason,omitempty"` // when unhealthy: contract.ReasonApplyFailed, ...
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

// ValidHostID says whether s has the form of EnrollRequest.HostID.
func ValidHostID(s string) bool { return hostIDRe.MatchString(s) }

var hostIDRe = regexp.MustCompile(`^[0-9a-f]{32,64}$`)

// MaxRequest is the largest request body the server reads: the API's
// requests are small, the largest a check-in of MaxPatches patches.
const MaxRequest = 256 << 10

// MaxPatches bounds the patches one check-in may list, so that a check-in
// fits MaxRequest.
const MaxPatches = 128

// Validate names the first field that is wrong and what it should be.
func (c *CheckIn) Validate() error {
	switch {
	case !contract.ValidRelease(c.KernelRelease):
		return fmt.Errorf("kernel_release %q: want uname -r", c.KernelRelease)
	case !contract.ValidBuildID(c.KernelBuildID):
		return fmt.Errorf("kernel_build_id %q: want the running vmlinux's GNU build-id in lower-case hex", c.KernelBuildID)
	case !contract.ValidAgentVersion(c.AgentVersion):
		return fmt.Errorf("agent_version %q: want at most 64 characters of A-Z, a-z, 0-9, ._+~-", c.AgentVersion)
	case len(c.Patches) > MaxPatches:
		return fmt.Errorf("patches: %d listed, at most %d", len(c.Patches), MaxPatches)
	case len(c.Unsupported) > 256:
		return fmt.Errorf("unsupported: %d bytes, at most 256", len(c.Unsupported))
	}
	for i, p := range c.Patches {
		switch {
		case !contract.ValidTarget(p.Target):
			return fmt.Errorf("patches[%d].target %q: want a repository target name (RELEASE/NAME-HASH.stitch)", i, p.Target)
		case !contract.ValidName(p.Name):
			return fmt.Errorf("patches[%d].name %q: want the module name", i, p.Name)
		case !slices.Contains(contract.States, p.State):
			return fmt.Errorf("patches[%d].state %q: want one of %v", i, p.State, contract.States)
		case len(p.Reason) > 1024:
			return fmt.Errorf("patches[%d].reason: %d bytes, at most 1024", i, len(p.Reason))
		}
	}
	return nil
}

// Validate names the first field that is wrong and what it should be;
// the check must be one of schedule's, or apply or boot.
func (h *Health) Validate(schedule contract.Schedule) error {
	switch {
	case !contract.ValidTarget(h.Target):
		return fmt.Errorf("target %q: want a repository target name (RELEASE/NAME-HASH.stitch)", h.Target)
	case !contract.ValidName(h.Name):
		return fmt.Errorf("name %q: want the module name", h.Name)
	case !schedule.ValidCheck(h.Check):
		return fmt.Errorf("check %q: want %s, %s or one of the schedule's %v", h.Check, contract.CheckApply, contract.CheckBoot, schedule)
	case h.Healthy && h.Reason != "":
		return fmt.Errorf("reason %q given for a healthy report: leave it empty", h.Reason)
	case !h.Healthy && !slices.Contains(contract.Reasons, h.Reason):
		return fmt.Errorf("reason %q: an unhealthy report needs one of %v", h.Reason, contract.Reasons)
	case len(h.Detail) > 4096:
		return fmt.Errorf("detail: %d bytes, at most 4096", len(h.Detail))
	}
	return nil
}
