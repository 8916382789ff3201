package api

import "time"

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
	// Lost: applied, short of a check, and silent (no check-in, no
	// report) for over two check-in intervals; they no longer hold a stage.
	Lost int `json:"lost"`
	// Counted: the failures the rollout's thresholds count, at most a
	// bounded number per enrollment key.
	Counted int `json:"counted"`
}

// MachineReport is one machine's patch level.
type MachineReport struct {
	ID            string    `json:"id"`
	Hostname      string    `json:"hostname"`
	Group         string    `json:"group"`
	Channel       string    `json:"channel"`
	KernelRelease string    `json:"kernel_release"`
	KernelBuildID string    `json:"kernel_build_id"`
	LastCheckIn   time.Time `json:"last_checkin,omitzero"`
	Applied       []string  `json:"applied"` // targets
	// PatchLevel is the registration time of the newest applied patch:
	// the machine has every fix for its kernel published until then that
	// it was offered.
	PatchLevel time.Time `json:"patch_level,omitzero"`
	FixedCVEs  []string  `json:"fixed_cves"`
	// Missing are patches for its kernel it has not applied.
	Missing []string `json:"missing"`
}

// CVEReport is one CVE across the fleet. Exposure is known only for
// kernels some registered patch targets: a machine counts as exposed when
// a patch for its kernel fixes the CVE and it has not applied it.
type CVEReport struct {
	CVE     string   `json:"cve"`
	Patches []string `json:"patches"`
	Fixed   int      `json:"fixed"`
	Exposed []string `json:"exposed"` // machine ids
}
