package api

import (
	"context"
	"net/http"
	"net/url"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
)

// Admin API: the admin bearer token, never a machine's.

// KeyRequest creates an enrollment key.
type KeyRequest struct {
	MaxMachines int       `json:"max_machines"`        // 0: the free tier's 3
	ExpiresAt   time.Time `json:"expires_at,omitzero"` // zero: never
	Group       string    `json:"group,omitempty"`     // machines enrolled with it join this group; default "default"
}

// KeyResponse returns the secret once; only its hash is stored.
type KeyResponse struct {
	ID          string `json:"id"`
	Key         string `json:"key"`
	MaxMachines int    `json:"max_machines"`
	Group       string `json:"group"`
}

// KeyInfo is an enrollment key as the operator lists it (never its
// secret).
type KeyInfo struct {
	ID          string    `json:"id"`
	Group       string    `json:"group"`
	MaxMachines int       `json:"max_machines"`
	Machines    int       `json:"machines"` // enrolled with it now
	CreatedAt   time.Time `json:"created_at"`
	ExpiresAt   time.Time `json:"expires_at,omitzero"` // zero: never
	RevokedAt   time.Time `json:"revoked_at,omitzero"` // zero: not revoked
}

// RevokeRequest revokes an enrollment key: it enrolls nothing more (nor
// re-enrolls its hosts). Its machines keep their tokens unless
// DeleteMachines, which deletes them too.
type RevokeRequest struct {
	DeleteMachines bool `json:"delete_machines,omitempty"`
}

// RevokeResponse is the revoked key and how many machines went with it.
type RevokeResponse struct {
	Key             KeyInfo `json:"key"`
	DeletedMachines int     `json:"deleted_machines"`
}

// Paths of the admin API's keys and machines.
const (
	PathAdminKeys     = "/v1/admin/keys"
	PathAdminMachines = "/v1/admin/machines/"
)

// Keys lists the enrollment keys (admin token).
func (c *Client) Keys(ctx context.Context) ([]KeyInfo, error) {
	var out []KeyInfo
	err := c.Do(ctx, http.MethodGet, PathAdminKeys, nil, &out)
	return out, err
}

// RevokeKey revokes key id (admin token).
func (c *Client) RevokeKey(ctx context.Context, id string, req RevokeRequest) (RevokeResponse, error) {
	var out RevokeResponse
	err := c.Do(ctx, http.MethodPost, PathAdminKeys+"/"+url.PathEscape(id)+"/revoke", req, &out)
	return out, err
}

// DeleteMachine deletes machine id (admin token): its token stops working
// and its reports leave every rollout.
func (c *Client) DeleteMachine(ctx context.Context, id string) error {
	return c.Do(ctx, http.MethodDelete, PathAdminMachines+url.PathEscape(id), nil, nil)
}

// PatchRequest registers a target already published in the server's
// repository and starts its rollout at the first stage.
type PatchRequest struct {
	Target string `json:"target"`
}

// RolloutRequest carries an operator's reason for halt, resume or
// blocklist.
type RolloutRequest struct {
	Reason string `json:"reason,omitempty"`
}

// Channel is a release channel: patches reach its machines delay_seconds
// after their registration, and none registered after cutoff (when set).
type Channel struct {
	Name         string    `json:"name"`
	DelaySeconds int64     `json:"delay_seconds"`
	Cutoff       time.Time `json:"cutoff,omitzero"`
}

// Group is a machine group on a channel; pin (when set) holds the group at
// the patches registered up to then.
type Group struct {
	Name    string    `json:"name"`
	Channel string    `json:"channel"`
	Pin     time.Time `json:"pin,omitzero"`
}

// MachineGroupRequest moves a machine to another group.
type MachineGroupRequest struct {
	Group string `json:"group"`
}

// PatchReport is one patch's rollout.
type PatchReport struct {
	Target        string    `json:"target"`
	Name          string    `json:"name"`
	KernelRelease string    `json:"kernel_release"`
	KernelBuildID string    `json:"kernel_build_id"`
	CVEs          []string  `json:"cves"`
	RegisteredAt  time.Time `json:"registered_at"`
	State         string    `json:"state"` // running, halted, blocklisted, complete
	Reason        string    `json:"reason,omitempty"`
	Stage         int       `json:"stage"`    // index into the policy's stages
	Share         float64   `json:"share"`    // the stage's share of eligible machines
	Eligible      int       `json:"eligible"` // machines running the patch's kernel
	Applied       int       `json:"applied"`  // applied and not failed
	Healthy       int       `json:"healthy"`  // applied and passed every check
	Failed        int       `json:"failed"`
	Pending       int       `json:"pending"` // offered now, not applied yet
	// Level, for a level of a patch stream: its stream, number, the
	// level it supersedes and the fixes it withdraws.
	Level *contract.Level `json:"level,omitempty"`
	// Lost: applied, short of a check, and silent (no check-in, no
	// report) for over two check-in intervals; they no longer hold a stage.
	Lost int `json:"lost"`
	// Counted: the failures the rollout's thresholds count, at most a
	// bounded number per enrollment key.
	Counted int `json:"counted"`
	// Waiting are eligible machines not offered the patch yet because
	// their channel's deploy delay has not passed since its registration;
	// the first of them is offered it at WaitingUntil (by stage).
	Waiting      int       `json:"waiting"`
	WaitingUntil time.Time `json:"waiting_until,omitzero"`
	// Held are eligible machines never offered it: their channel's
	// cutoff or their group's pin is before its registration.
	Held int `json:"held"`
}

// MachineReport is one machine's patch level.
type MachineReport struct {
	ID            string `json:"id"`
	Hostname      string `json:"hostname"`
	KeyID         string `json:"key_id"` // the key it enrolled with
	Group         string `json:"group"`
	Channel       string `json:"channel"`
	KernelRelease string `json:"kernel_release"`
	KernelBuildID string `json:"kernel_build_id"`
	// Unsupported says why the machine's kernel cannot be live-patched,
	// as its agent reported; empty for a machine that can.
	Unsupported  string    `json:"unsupported,omitempty"`
	AgentVersion string    `json:"agent_version,omitempty"`
	LastCheckIn  time.Time `json:"last_checkin,omitzero"`
	Applied      []string  `json:"applied"` // targets
	// PatchLevel is the registration time of the newest applied patch:
	// the machine has every fix for its kernel published until then that
	// it was offered.
	PatchLevel time.Time `json:"patch_level,omitzero"`
	// Level is the patch level as the machine's own status counts it:
	// the number of the level it runs of a patch stream, or else how many
	// patches it holds applied.
	Level     int      `json:"level"`
	FixedCVEs []string `json:"fixed_cves"`
	// Missing are patches for its kernel it has not applied; of a patch
	// stream, the newest level not blocklisted when the machine runs an
	// older one or none (the levels below it are not missing).
	Missing []string `json:"missing"`
	// ExposedCVEs are the CVEs a registered patch for its kernel fixes
	// that the machine is still exposed to, as the CVE report counts
	// them: also those of a blocklisted patch, which is no longer
	// missing but fixed nothing.
	ExposedCVEs []string `json:"exposed_cves"`
	// Levels are the levels the machine runs, one per stream: it reports
	// the level applied, and the server offered it that level.
	Levels []MachineLevel `json:"levels"`
}

// MachineLevel is the level of a stream a machine runs.
type MachineLevel struct {
	Stream string `json:"stream"`
	Number int    `json:"number"`
	Target string `json:"target"`
	State  string `json:"state"` // its rollout's: blocklisted means it is being reverted
}

// CVEReport is one CVE across the fleet. A machine is fixed when it
// applied a patch for its kernel that fixes the CVE, or when its kernel's
// source already contains the fix (a published contained record);
// exposed when a registered patch for its kernel fixes it and it has not
// applied it; not covered when its kernel has neither a patch nor a
// contained record for it (the server cannot tell whether such a kernel
// is vulnerable: nothing was built for it, or the fix did not port).
type CVEReport struct {
	CVE     string   `json:"cve"`
	Patches []string `json:"patches"`
	// Records are the contained records naming the CVE.
	Records []string `json:"records"`
	Fixed   int      `json:"fixed"`
	// ContainedMachines are the fixed machines whose kernel contains the
	// fix (counted in Fixed).
	ContainedMachines int      `json:"contained_machines"`
	Exposed           []string `json:"exposed"` // machine ids
	// NotCoveredMachines run the kernels in NotCoveredKernels.
	NotCoveredMachines int              `json:"not_covered_machines"`
	NotCoveredKernels  []KernelCoverage `json:"not_covered_kernels"`
}

// FixReport is one fix across kernels: the registered patches and the
// published contained records that share a patch name or an upstream
// commit are one fix. Each kernel is in one list: Contained (its source
// has the fix, with or without a patch), Patched (a registered patch),
// or NotCovered (the fleet runs it and it has neither).
type FixReport struct {
	Names    []string `json:"names"`    // patch names, one unless builds named it otherwise
	Upstream []string `json:"upstream"` // upstream commits, when the builds recorded them
	CVEs     []string `json:"cves"`

	Patched    []KernelCoverage `json:"patched"`
	Contained  []KernelCoverage `json:"contained"`
	NotCovered []KernelCoverage `json:"not_covered"`

	// Machines on each list's kernels, and of the patched ones those that
	// report a patch of the fix applied.
	PatchedMachines    int `json:"patched_machines"`
	AppliedMachines    int `json:"applied_machines"`
	ContainedMachines  int `json:"contained_machines"`
	NotCoveredMachines int `json:"not_covered_machines"`
}

// KernelCoverage is one kernel (release and build-id) in a fix's or a
// CVE's coverage.
type KernelCoverage struct {
	Release string `json:"release"`
	BuildID string `json:"build_id"`
	// Machines whose last check-in reported this kernel.
	Machines int `json:"machines"`
	// Applied: of them, those that report one of Patches applied.
	Applied int `json:"applied"`
	// Patches are the registered patches of the fix for this kernel.
	Patches []PatchRef `json:"patches,omitempty"`
	// Records are the contained records of the fix for this kernel.
	Records []string `json:"records,omitempty"`
}

// PatchRef is a registered patch and its rollout's state.
type PatchRef struct {
	Target string `json:"target"`
	State  string `json:"state"`
}

// PathAdminFixes is the per-fix coverage report.
const PathAdminFixes = "/v1/admin/reports/fixes"

// Fixes reads the per-fix coverage report (admin token).
func (c *Client) Fixes(ctx context.Context) ([]FixReport, error) {
	var out []FixReport
	err := c.Do(ctx, http.MethodGet, PathAdminFixes, nil, &out)
	return out, err
}

// PathAdminLevels is the report of patch levels.
const PathAdminLevels = "/v1/admin/reports/levels"

// KernelLevels is one kernel's patch streams across the fleet: how many
// of its machines run each level of each stream, and what each level
// carries. Only kernels with a registered level are reported.
type KernelLevels struct {
	Release string `json:"release"`
	BuildID string `json:"build_id"`
	// Machines whose last check-in reported this kernel.
	Machines int            `json:"machines"`
	Streams  []StreamLevels `json:"streams"`
}

// StreamLevels is one stream of a kernel.
type StreamLevels struct {
	Stream string `json:"stream"`
	// NoLevel are the kernel's machines that run no level of the stream.
	NoLevel int           `json:"no_level"`
	Levels  []LevelReport `json:"levels"` // by number
}

// LevelReport is one level: its rollout, the machines that run it and
// what it carries.
type LevelReport struct {
	Number       int       `json:"number"`
	Supersedes   int       `json:"supersedes"`
	Target       string    `json:"target"`
	Name         string    `json:"name"`
	RegisteredAt time.Time `json:"registered_at"`
	State        string    `json:"state"` // its rollout's: running, halted, blocklisted, complete
	Reason       string    `json:"reason,omitempty"`
	Stage        int       `json:"stage"`
	Share        float64   `json:"share"`
	// Machines run it: they report it applied (their newest of the
	// stream) and the server offered it to them; a machine's word alone
	// does not count.
	Machines int `json:"machines"`
	// Fixes it carries, CVEs it closes, and the fixes of earlier levels
	// it withdraws (their code is back to the original under it).
	Fixes     []LevelFix `json:"fixes"`
	CVEs      []string   `json:"cves"`
	Withdrawn []string   `json:"withdrawn"`
}

// LevelFix is one fix a level carries.
type LevelFix struct {
	Name     string   `json:"name"`
	CVEs     []string `json:"cves"`
	Upstream string   `json:"upstream,omitempty"`
}

// Levels reads the report of patch levels (admin token).
func (c *Client) Levels(ctx context.Context) ([]KernelLevels, error) {
	var out []KernelLevels
	err := c.Do(ctx, http.MethodGet, PathAdminLevels, nil, &out)
	return out, err
}

// Operator roles, each allowed what the ones before it are: metrics
// reads /metrics only (for Prometheus); read-only reads every report;
// operator also runs rollouts and sets channels, groups and machines'
// groups; admin also manages enrollment keys, machines and operators.
const (
	RoleMetrics  = "metrics"
	RoleReadOnly = "read-only"
	RoleOperator = "operator"
	RoleAdmin    = "admin"
)

// Roles are the roles, least allowed first.
var Roles = []string{RoleMetrics, RoleReadOnly, RoleOperator, RoleAdmin}

// OperatorRequest creates a named operator token.
type OperatorRequest struct {
	Name string `json:"name"`
	Role string `json:"role"`
}

// Operator is a named operator token (without its secret).
type Operator struct {
	Name      string    `json:"name"`
	Role      string    `json:"role"`
	CreatedAt time.Time `json:"created_at"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// OperatorResponse returns a new operator's token once; only its hash
// is stored.
type OperatorResponse struct {
	Operator
	Token string `json:"token"`
}

// AuditEntry is one operator action, done or refused.
type AuditEntry struct {
	At     time.Time `json:"at"`
	Actor  string    `json:"actor"`
	Action string    `json:"action"`
	Target string    `json:"target"`
	Detail string    `json:"detail,omitempty"`
	Remote string    `json:"remote"`
	Status int       `json:"status"`
}

// PathAdminOperators and PathAdminAudit are the operator routes.
const (
	PathAdminOperators = "/v1/admin/operators"
	PathAdminAudit     = "/v1/admin/audit"
	PathAdminWhoAmI    = "/v1/admin/whoami"
)

// MachinePage is one page of machines (GET /v1/admin/machines?q=&kernel=
// &group=&state=&sort=&desc=1&limit=&offset=): the machines the filters
// select, in order, and how many they select in all.
type MachinePage struct {
	Total    int              `json:"total"`
	Offset   int              `json:"offset"`
	Machines []MachineSummary `json:"machines"`
}

// MachineSummary is a machine as the machine list shows it.
type MachineSummary struct {
	ID            string    `json:"id"`
	Hostname      string    `json:"hostname"`
	KeyID         string    `json:"key_id"`
	Group         string    `json:"group"`
	Channel       string    `json:"channel"`
	KernelRelease string    `json:"kernel_release"`
	KernelBuildID string    `json:"kernel_build_id"`
	AgentVersion  string    `json:"agent_version"`
	LastCheckIn   time.Time `json:"last_checkin,omitzero"`
	Stale         bool      `json:"stale"`
	Unsupported   string    `json:"unsupported,omitempty"`
}
