// Package rollout is the rule book of a staged rollout, the one the server
// runs: pure functions over counts, free of storage and HTTP, so they can be
// tested exhaustively. A patch goes to a growing share of eligible machines,
// a machine's place in the order fixed by a hash of its id. A stage advances
// once every machine that applied it and is still heard from passed every
// health check. Failures are counted once per machine and at most a bounded
// number of times per enrollment key; past the count threshold the rollout
// halts for an operator, and only when the failure rate is past its
// threshold too does it blocklist the patch by itself (machines that applied
// it revert).
package rollout

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
)

// ErrBadPolicy means a policy that cannot work (bad input).
var ErrBadPolicy = errors.New("bad rollout policy")

// ErrState means an operator's action that the rollout's state does not
// allow (resuming a running rollout, halting a blocklisted one).
var ErrState = errors.New("not allowed in this state")

// State of a rollout.
type State string

const (
	Running     State = "running"
	Halted      State = "halted"      // stopped for an operator; machines keep what they have
	Blocklisted State = "blocklisted" // stopped for failures; machines that applied it revert
	Complete    State = "complete"
)

// Offers says whether a rollout in state s offers its patch to machines
// within its stage.
func (s State) Offers() bool { return s == Running || s == Complete }

// Reverts says whether machines that applied the patch of a rollout in
// state s are told to revert it.
func (s State) Reverts() bool { return s == Blocklisted }

// Defaults of the policy's fields whose zero value means "the default".
const (
	// DefaultMaxFailuresPerKey is the least number of failures one
	// enrollment key's machines may count for.
	DefaultMaxFailuresPerKey = 2
	// DefaultMinMachines is how many machines a rollout needs before its
	// failure rate means anything.
	DefaultMinMachines = 10
)

// SilentIntervals is how many check-in intervals a machine may stay silent
// (no check-in, no health report) before the rollout counts it as lost.
const SilentIntervals = 2

// Policy configures a rollout.
type Policy struct {
	Stages []float64       // growing shares of machines, ending with 1
	Checks []time.Duration // health checks after apply, increasing
	// MaxFailures is how many counted failures a rollout tolerates; more
	// halt it for an operator, or blocklist it when MaxRate is passed too.
	MaxFailures int
	// MaxRate is the share of counted failures among the rollout's
	// machines tolerated (once MinMachines took part); more, with more
	// than MaxFailures, blocklists the patch.
	MaxRate float64
	// MaxFailuresPerKey bounds what one enrollment key's machines count
	// for: at most max(MaxFailuresPerKey, half the key's machines in the
	// rollout). 0 means DefaultMaxFailuresPerKey.
	MaxFailuresPerKey int
	// MinMachines is how many machines must have taken part before the
	// failure rate can blocklist a patch. 0 means DefaultMinMachines.
	MinMachines int
}

// DefaultPolicy: 1% → 10% → 50% → 100%, checks at 1, 5 and 15 minutes;
// halt on the third counted failure, blocklist when, besides, more than 2%
// of at least 10 machines failed.
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
	if p.MaxFailures < 0 || p.MaxRate < 0 || p.MaxRate >= 1 || math.IsNaN(p.MaxRate) {
		return fmt.Errorf("%w: max failures %d and rate %v must be non-negative, rate below 1", ErrBadPolicy, p.MaxFailures, p.MaxRate)
	}
	if p.MaxFailuresPerKey < 0 || p.MinMachines < 0 {
		return fmt.Errorf("%w: max failures per key %d and min machines %d must be non-negative (0: the default)", ErrBadPolicy, p.MaxFailuresPerKey, p.MinMachines)
	}
	return nil
}

func (p Policy) perKey() int {
	if p.MaxFailuresPerKey > 0 {
		return p.MaxFailuresPerKey
	}
	return DefaultMaxFailuresPerKey
}

func (p Policy) minMachines() int {
	if p.MinMachines > 0 {
		return p.MinMachines
	}
	return DefaultMinMachines
}

// Rank is a machine's place in a patch's order, in [0, 1). Hashing the
// patch with the id gives each patch a different first 1%, so the same
// machines are not always the canaries.
func Rank(patch, machine string) float64 {
	h := sha256.Sum256([]byte(patch + "\x00" + machine))
	return float64(binary.BigEndian.Uint64(h[:8])>>11) / (1 << 53)
}

// Share is the fraction of machines stage reaches; a stage past the
// policy's last (the server restarted with fewer stages) reaches everyone.
func (p Policy) Share(stage int) float64 {
	return p.Stages[min(max(stage, 0), len(p.Stages)-1)]
}

// Reaches says whether stage reaches machine in patch's order; stage -1
// (the rollout had not begun) reaches nobody.
func (p Policy) Reaches(stage int, patch, machine string) bool {
	return stage >= 0 && Rank(patch, machine) < p.Share(stage)
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

// SilentAfter is how long a machine that is short of a check may stay
// silent before it counts as lost, given the check-in interval machines
// are told.
func SilentAfter(interval time.Duration) time.Duration { return SilentIntervals * interval }

// KeyCounts are the machines of one enrollment key in a patch's rollout
// (those that reported on it), each in exactly one class.
type KeyCounts struct {
	Key        string
	Failed     int // reported a failure, once per machine
	Healthy    int // passed every health check
	Unfinished int // short of a check and heard from within SilentAfter
	Lost       int // short of a check and silent for longer
}

// Machines are the key's machines that count: lost ones are left out.
func (k KeyCounts) Machines() int { return k.Failed + k.Healthy + k.Unfinished }

// Cap is how many failures a key with machines machines in the rollout
// (lost ones left out) counts for: a few machines on one key, a free-tier
// key's three say, cannot outvote the fleet, while a fleet whose machines
// all share one key still counts half of them.
func (p Policy) Cap(machines int) int { return max(p.perKey(), machines/2) }

// Tally sums a rollout's counts over keys.
type Tally struct {
	Machines   int // failed, healthy or unfinished (not lost)
	Failed     int // machines that reported a failure
	Counted    int // failures that count: each key's at most its Cap
	Healthy    int
	Unfinished int
	Lost       int
}

// Tally sums keys, capping each key's failures.
func (p Policy) Tally(keys []KeyCounts) Tally {
	var t Tally
	for _, k := range keys {
		t.Machines += k.Machines()
		t.Failed += k.Failed
		t.Counted += min(k.Failed, p.Cap(k.Machines()))
		t.Healthy += k.Healthy
		t.Unfinished += k.Unfinished
		t.Lost += k.Lost
	}
	return t
}

// Status is what Decide needs to know of a rollout besides its counts.
type Status struct {
	State State
	Stage int // index into Policy.Stages
	// Soaked: the stage has lasted a check-in interval, so every machine
	// in it had its chance to take the patch.
	Soaked bool
	// Tolerated are the counted failures an operator accepted by resuming
	// the rollout: the thresholds apply to those counted since.
	Tolerated int
}

// Action is what a decision does to a rollout.
type Action string

const (
	Wait      Action = "wait"      // nothing changes
	Advance   Action = "advance"   // on to the next stage
	Finish    Action = "complete"  // the last stage is done
	Halt      Action = "halt"      // stop for an operator, machines keep it
	Blocklist Action = "blocklist" // stop, machines that applied it revert
)

// Decision is Decide's verdict; Reason says why a rollout stopped.
type Decision struct {
	Action Action
	Reason string
}

// Decide is the rule book: what becomes of a rollout in status s whose
// machines, by enrollment key, are keys.
//
//   - A blocklisted rollout stays so (only an operator resumes it).
//   - Failures count once per machine, each key's at most Cap of its
//     machines, less those an operator tolerated. More than MaxFailures
//     of them blocklist the patch when they are also more than MaxRate of
//     the rollout's machines, at least MinMachines of them, whatever the
//     state (running, halted or complete: machines that have it revert).
//     More than MaxFailures alone halt a running or complete rollout for
//     an operator: the count says something is wrong, but too few
//     machines took part, or too small a share of them failed, for the
//     server to judge the patch by itself.
//   - A running rollout whose stage has soaked and has no unfinished
//     machine (lost ones no longer hold it) advances, or completes at the
//     last stage, when a machine passed every check. With none, a stage
//     that had untolerated failures halts (nothing vouches for the patch),
//     and a stage nobody took, or whose machines are all lost, advances
//     (the last completes only with a healthy machine).
func Decide(p Policy, s Status, keys []KeyCounts) Decision {
	if s.State == Blocklisted {
		return Decision{Action: Wait}
	}
	t := p.Tally(keys)
	failed := max(t.Counted-s.Tolerated, 0)
	countOver := failed > p.MaxFailures
	rateOver := t.Machines >= p.minMachines() && float64(failed) > p.MaxRate*float64(t.Machines)
	what := fmt.Sprintf("%d of %d machines failed at stage %d (%s)", t.Failed, t.Machines, s.Stage, p.counted(t, s.Tolerated))
	switch {
	case countOver && rateOver:
		return Decision{Action: Blocklist, Reason: fmt.Sprintf("%s: over %d failures and %.3g%% — blocklisted: machines that applied it revert",
			what, p.MaxFailures, p.MaxRate*100)}
	case countOver && s.State != Halted:
		why := fmt.Sprintf("%.3g%% of %d machines is within the %.3g%% rate", 100*float64(failed)/float64(max(t.Machines, 1)), t.Machines, p.MaxRate*100)
		if t.Machines < p.minMachines() {
			why = fmt.Sprintf("too few machines (under %d) to judge the rate", p.minMachines())
		}
		return Decision{Action: Halt, Reason: fmt.Sprintf("%s: over %d failures, %s — halted for an operator: stitch rollout resume or blocklist",
			what, p.MaxFailures, why)}
	}
	if s.State != Running || !s.Soaked || t.Unfinished > 0 {
		return Decision{Action: Wait}
	}
	last := s.Stage >= len(p.Stages)-1
	switch {
	case t.Healthy > 0 && last:
		return Decision{Action: Finish}
	case t.Healthy > 0:
		return Decision{Action: Advance}
	case failed > 0:
		return Decision{Action: Halt, Reason: fmt.Sprintf("no machine passed every check at stage %d: %d failed (%s), %d lost — halted for an operator: stitch rollout resume or blocklist",
			s.Stage, t.Failed, p.counted(t, s.Tolerated), t.Lost)}
	case !last:
		return Decision{Action: Advance}
	}
	return Decision{Action: Wait}
}

// counted explains the counted failures in a reason.
func (p Policy) counted(t Tally, tolerated int) string {
	s := fmt.Sprintf("%d counted, at most max(%d, half its machines) per enrollment key", t.Counted, p.perKey())
	if tolerated > 0 {
		s += fmt.Sprintf(", %d tolerated by an operator", tolerated)
	}
	if t.Lost > 0 {
		s += fmt.Sprintf("; %d lost", t.Lost)
	}
	return s
}

// Op is an operator's action on a rollout.
type Op string

const (
	OpHalt      Op = "halt"
	OpResume    Op = "resume"
	OpBlocklist Op = "blocklist"
)

// Operate is the state an operator's op leaves a rollout in state s in:
// halt stops a running rollout; resume restarts a halted or blocklisted
// one (the caller records the failures counted so far as tolerated);
// blocklist stops any rollout and has machines revert.
func Operate(s State, op Op) (State, error) {
	switch {
	case op == OpHalt && s == Running:
		return Halted, nil
	case op == OpHalt:
		return s, fmt.Errorf("%w: the rollout is %s, only a running one can be halted", ErrState, s)
	case op == OpResume && (s == Halted || s == Blocklisted):
		return Running, nil
	case op == OpResume:
		return s, fmt.Errorf("%w: the rollout is %s, not halted or blocklisted", ErrState, s)
	case op == OpBlocklist:
		return Blocklisted, nil
	}
	return s, fmt.Errorf("%w: unknown operation %q: want halt, resume or blocklist", ErrState, op)
}
