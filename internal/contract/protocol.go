package contract

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
)

// States a machine reports a patch in.
const (
	StateApplied  = "applied"  // loaded and enabled
	StateReverted = "reverted" // was applied, now removed
	StateFailed   = "failed"   // apply was attempted and failed
	StateRefused  = "refused"  // the agent would not try (wrong kernel, verification)
)

// States lists every patch state, for validation.
var States = []string{StateApplied, StateReverted, StateFailed, StateRefused}

// Health checks that are not on the schedule: right after the apply, and
// after a reboot.
const (
	CheckApply = "apply"
	CheckBoot  = "boot"
)

// Check is one timed health check: a machine that applied a patch reports
// on it After the apply.
type Check struct {
	Name  string
	After time.Duration
}

// checkJSON is a Check on the wire, its time in milliseconds.
type checkJSON struct {
	Name    string `json:"name"`
	AfterMS int64  `json:"after_ms"`
}

func (c Check) MarshalJSON() ([]byte, error) {
	return json.Marshal(checkJSON{c.Name, c.After.Milliseconds()})
}

func (c *Check) UnmarshalJSON(b []byte) error {
	var j checkJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	if j.AfterMS < 0 || j.AfterMS > maxCheckAfter.Milliseconds() {
		return fmt.Errorf("check %q: after_ms %d out of range", j.Name, j.AfterMS)
	}
	c.Name, c.After = j.Name, time.Duration(j.AfterMS)*time.Millisecond
	return nil
}

// maxCheckAfter bounds how long after an apply a check may fall.
const maxCheckAfter = 7 * 24 * time.Hour

// Schedule is the timed health checks, in increasing order. The server
// holds the one in force and tells every machine in its check-in answer.
type Schedule []Check

// DefaultSchedule: health checks 1, 5 and 15 minutes after the apply.
var DefaultSchedule = NewSchedule(time.Minute, 5*time.Minute, 15*time.Minute)

// NewSchedule names checks at the given times by their durations ("1m",
// "1h30m").
func NewSchedule(after ...time.Duration) Schedule {
	s := make(Schedule, len(after))
	for i, d := range after {
		s[i] = Check{Name: shortDuration(d), After: d}
	}
	return s
}

// shortDuration is d as time.Duration prints it without trailing zero
// units: 5m rather than 5m0s, 2h rather than 2h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// Validate says what is wrong with a schedule: the checks must have
// distinct valid names and strictly increasing positive times.
func (s Schedule) Validate() error {
	if len(s) > 16 {
		return fmt.Errorf("schedule: %d checks, at most 16", len(s))
	}
	for i, c := range s {
		switch {
		case !nameRe.MatchString(c.Name) || c.Name == CheckApply || c.Name == CheckBoot:
			return fmt.Errorf("schedule: check %d is named %q: want a short name other than %q and %q", i, c.Name, CheckApply, CheckBoot)
		case c.After < time.Millisecond || c.After > maxCheckAfter:
			return fmt.Errorf("schedule: check %s at %v: want a time after the apply, at most a week", c.Name, c.After)
		case i > 0 && c.After <= s[i-1].After:
			return fmt.Errorf("schedule: check %s at %v does not come after %s at %v", c.Name, c.After, s[i-1].Name, s[i-1].After)
		case slices.ContainsFunc(s[:i], func(o Check) bool { return o.Name == c.Name }):
			return fmt.Errorf("schedule: check %s named twice", c.Name)
		}
	}
	return nil
}

// Index is the position of the timed check called name, -1 when it is
// none of them (apply, boot, or unknown).
func (s Schedule) Index(name string) int {
	return slices.IndexFunc(s, func(c Check) bool { return c.Name == name })
}

// Times is the checks' times after the apply.
func (s Schedule) Times() []time.Duration {
	t := make([]time.Duration, len(s))
	for i, c := range s {
		t[i] = c.After
	}
	return t
}

// ValidCheck says whether name is a check a machine may report under s.
func (s Schedule) ValidCheck(name string) bool {
	return name == CheckApply || name == CheckBoot || s.Index(name) >= 0
}

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

// Reasons lists every reason, for validation.
var Reasons = []string{ReasonApplyFailed, ReasonTransitionTimeout, ReasonKernelWarning, ReasonOops,
	ReasonCrashLoop, ReasonFingerprintMismatch, ReasonVerifyFailed, ReasonRollbackFailed}
