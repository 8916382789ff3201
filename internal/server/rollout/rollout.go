// Package rollout holds the rules of a staged rollout, free of storage and
// HTTP so they can be tested exhaustively: a patch goes to a growing share
// of eligible machines, a machine's place in the order fixed by a hash of
// its id; a stage advances only when every machine that applied it reported
// healthy at each health check; failures past a threshold halt the rollout
// and blocklist the patch, and machines that applied it must revert.
package rollout

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
)

// ErrBadPolicy means a policy that cannot work (bad input).
var ErrBadPolicy = errors.New("bad rollout policy")

// State of a rollout.
type State string

const (
	Running     State = "running"
	Halted      State = "halted"      // an operator stopped it; machines keep what they have
	Blocklisted State = "blocklisted" // stopped for failures; machines that applied it revert
	Complete    State = "complete"
)

// Policy configures a rollout.
type Policy struct {
	Stages      []float64       // growing shares of machines, ending with 1
	Checks      []time.Duration // health checks after apply, increasing
	MaxFailures int             // failures tolerated before blocklisting (more halts)
	MaxRate     float64         // failure share of applied machines tolerated (more halts)
}

// DefaultPolicy: 1% → 10% → 50% → 100%, checks at 1, 5 and 15 minutes,
// blocklist on the third failure or on more than 2% failing.
var DefaultPolicy = Policy{
	Stages:      []float64{0.01, 0.10, 0.50, 1},
	Checks:      contract.DefaultSchedule.Times(),
	MaxFailures: 2,
	MaxRate:     0.02,
}

// Validate names what is wrong with p.
func (p Policy) Validate() error {
	if len(p.Stages) == 0 || p.Stages[len(p.Stages)-1] != 1 {
		return fmt.Errorf("%w: stages %v must end with 1 (100%%)", ErrBadPolicy, p.Stages)
	}
	for i, s := range p.Stages {
		if s <= 0 || s > 1 || (i > 0 && s <= p.Stages[i-1]) {
			return fmt.Errorf("%w: stages %v must grow strictly within (0, 1]", ErrBadPolicy, p.Stages)
		}
	}
	for i, c := range p.Checks {
		if c <= 0 || (i > 0 && c <= p.Checks[i-1]) {
			return fmt.Errorf("%w: checks %v must grow strictly and be positive", ErrBadPolicy, p.Checks)
		}
	}
	if p.MaxFailures < 0 || p.MaxRate < 0 || p.MaxRate >= 1 {
		return fmt.Errorf("%w: max failures %d and rate %v must be non-negative, rate below 1", ErrBadPolicy, p.MaxFailures, p.MaxRate)
	}
	return nil
}

// Rank is a machine's place in a patch's order, in [0, 1). Hashing the
// patch with the id gives each patch a different first 1%, so the same
// machines are not always the canaries.
func Rank(patch, machine string) float64 {
	h := sha256.Sum256([]byte(patch + "\x00" + machine))
	return float64(binary.BigEndian.Uint64(h[:8])>>11) / (1 << 53)
}

// ChecksPassed is how many health checks a machine that applied at applied
// and has passed done of them has passed after a healthy report at now:
// every check whose time since the apply has come counts. named is the
// index of the check the report names (-1 for none): it counts, with
// those before it, once half its time has come. The machine times its
// checks from its own apply, and the server's clock for it starts only
// at its first report, a moment or (after an outage) a long while later;
// the floor keeps a hasty agent from rushing a rollout.
func (p Policy) ChecksPassed(applied, now time.Time, done, named int) int {
	elapsed := now.Sub(applied)
	for done < len(p.Checks) && elapsed >= p.Checks[done] {
		done++
	}
	if named >= done && named < len(p.Checks) && elapsed >= p.Checks[named]/2 {
		done = named + 1
	}
	return done
}

// Exceeded says whether failures among machines (those that applied or
// failed to apply the patch) are past the policy's threshold: more than
// MaxFailures, or a share above MaxRate once at least 10 machines took part.
func (p Policy) Exceeded(failures, machines int) bool {
	if machines == 0 {
		return false
	}
	return failures > p.MaxFailures || (machines >= 10 && float64(failures)/float64(machines) > p.MaxRate)
}

// CanAdvance says whether a stage is done: at least one machine that
// applied the patch passed every check, and none that has not failed is
// still short of a check. Failures within the policy's tolerance do not
// hold a rollout back (past it, the patch is blocklisted).
func CanAdvance(machines, failed, unfinished int) bool { return machines > failed && unfinished == 0 }

// machine is what the rollout knows of one machine that applied the patch.
type machine struct {
	applied time.Time
	checks  int // health checks passed, in order
	failed  bool
}

// Rollout is one patch's rollout. Not safe for concurrent use; the server
// serializes access per patch.
type Rollout struct {
	Patch    string
	Policy   Policy
	Stage    int // index into Policy.Stages
	State    State
	Reason   string // why it stopped
	machines map[string]*machine
	failures int
}

// New starts a rollout at the first stage.
func New(patch string, p Policy) (*Rollout, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &Rollout{Patch: patch, Policy: p, State: Running, machines: map[string]*machine{}}, nil
}

// Share is the fraction of machines the current stage reaches.
func (r *Rollout) Share() float64 { return r.Policy.Stages[r.Stage] }

// Offer says whether machine may receive the patch now.
func (r *Rollout) Offer(id string) bool {
	if r.State != Running && r.State != Complete {
		return false
	}
	return Rank(r.Patch, id) < r.Share()
}

// MustRevert says whether machine applied a patch that is now blocklisted.
func (r *Rollout) MustRevert(id string) bool {
	m := r.machines[id]
	return r.State == Blocklisted && m != nil
}

// Applied records that machine applied the patch at t. A machine that was
// never offered the patch is refused: it cannot widen the rollout itself.
func (r *Rollout) Applied(id string, t time.Time) error {
	if !r.Offer(id) {
		return fmt.Errorf("machine %s was not offered %s (stage %d, %s)", id, r.Patch, r.Stage, r.State)
	}
	if _, ok := r.machines[id]; !ok {
		r.machines[id] = &machine{applied: t}
	}
	return nil
}

// Healthy records a healthy report at t: every check whose time since
// apply has passed counts as passed.
func (r *Rollout) Healthy(id string, t time.Time) {
	m := r.machines[id]
	if m == nil || m.failed {
		return
	}
	m.checks = r.Policy.ChecksPassed(m.applied, t, m.checks, -1)
}

// Failed records a failure (apply failed, transition timed out, kernel
// warning or oops, crash loop) and blocklists the patch past the threshold,
// whether the rollout is running, halted or complete: machines that have
// it must revert.
func (r *Rollout) Failed(id, reason string, t time.Time) {
	m := r.machines[id]
	if m == nil {
		// An apply that failed outright still counts, if it was offered.
		if !r.Offer(id) {
			return
		}
		m = &machine{applied: t}
		r.machines[id] = m
	}
	if m.failed {
		return
	}
	m.failed = true
	r.failures++
	if r.State != Blocklisted && r.Policy.Exceeded(r.failures, len(r.machines)) {
		r.State = Blocklisted
		r.Reason = fmt.Sprintf("%d of %d machines failed at stage %d (last: %s: %s)", r.failures, len(r.machines), r.Stage, id, reason)
	}
}

// Advance moves to the next stage when every machine that applied the
// patch and did not fail passed every check, and at least one did (see
// CanAdvance). It reports whether it advanced.
func (r *Rollout) Advance() bool {
	if r.State != Running {
		return false
	}
	unfinished := 0
	for _, m := range r.machines {
		if !m.failed && m.checks < len(r.Policy.Checks) {
			unfinished++
		}
	}
	if !CanAdvance(len(r.machines), r.failures, unfinished) {
		return false
	}
	if r.Stage == len(r.Policy.Stages)-1 {
		r.State = Complete
		return false
	}
	r.Stage++
	return true
}

// Halt, Resume and Blocklist are the operator's hands.
func (r *Rollout) Halt(reason string) {
	if r.State == Running {
		r.State, r.Reason = Halted, reason
	}
}

func (r *Rollout) Resume() error {
	if r.State != Halted && r.State != Blocklisted {
		return fmt.Errorf("rollout of %s is %s, not halted", r.Patch, r.State)
	}
	r.State, r.Reason = Running, ""
	return nil
}

func (r *Rollout) Blocklist(reason string) { r.State, r.Reason = Blocklisted, reason }

// Counts are applied (healthy so far) and failed machines.
func (r *Rollout) Counts() (applied, failed int) {
	return len(r.machines) - r.failures, r.failures
}
