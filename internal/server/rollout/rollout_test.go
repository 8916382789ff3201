package rollout

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// fleetSim drives the rule book the way the server does, with counts: n
// machines, a virtual clock advanced a minute at a time, every machine
// checking in and reporting each minute unless it is silent, and Decide
// taken every minute on the counts by key.
type fleetSim struct {
	t        *testing.T
	pol      Policy
	patch    string
	interval time.Duration // the check-in interval: a stage's soak, the silence limit's unit
	n        int
	key      func(i int) string   // machine i's enrollment key
	fails    func(id string) bool // machines that break the patch
	silent   func(id string) bool // machines that go silent right after applying

	now      time.Time
	st       Status
	started  time.Time // when the current stage began
	reason   string
	machines map[string]*simMachine // those that took the patch
	stages   []int                  // the stage each machine took the patch at
	events   []Action
}

type simMachine struct {
	key     string
	applied time.Time
	heard   time.Time
	checks  int
	failed  bool
}

func newSim(t *testing.T, n int) *fleetSim {
	return &fleetSim{t: t, pol: DefaultPolicy, patch: "6.1.0/fix_a-0123456789abcdef.stitch", interval: 10 * time.Minute, n: n,
		key:   func(int) string { return "k-fleet" },
		fails: func(string) bool { return false }, silent: func(string) bool { return false },
		now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), st: Status{State: Running}, machines: map[string]*simMachine{}}
}

func simID(i int) string { return fmt.Sprintf("m%05d", i) }

// counts are what the store's query gives: by key, lost past the silence.
func (s *fleetSim) counts() []KeyCounts {
	by := map[string]*KeyCounts{}
	var keys []KeyCounts
	order := []string{}
	for _, m := range s.machines {
		k := by[m.key]
		if k == nil {
			k = &KeyCounts{Key: m.key}
			by[m.key] = k
			order = append(order, m.key)
		}
		switch {
		case m.failed:
			k.Failed++
		case m.checks >= len(s.pol.Checks):
			k.Healthy++
		case s.now.Sub(m.heard) > SilentAfter(s.interval):
			k.Lost++
		default:
			k.Unfinished++
		}
	}
	for _, key := range order {
		keys = append(keys, *by[key])
	}
	return keys
}

// run goes on until the rollout stops or completes, or a day passes.
func (s *fleetSim) run() {
	s.started = s.now
	for minute := 0; minute < 24*60 && s.st.State == Running; minute++ {
		s.now = s.now.Add(time.Minute)
		for i := range s.n {
			id := simID(i)
			if m := s.machines[id]; m != nil {
				if !m.failed && !s.silent(id) {
					m.checks, m.heard = s.pol.ChecksPassed(m.applied, s.now, m.checks, -1), s.now
				}
				continue
			}
			if !s.st.State.Offers() || !s.pol.Reaches(s.st.Stage, s.patch, id) {
				continue
			}
			s.machines[id] = &simMachine{key: s.key(i), applied: s.now, heard: s.now, failed: s.fails(id)}
			s.stages = append(s.stages, s.st.Stage)
			// Failures are decided on at once, as the server does on a
			// failure report.
			if s.fails(id) {
				s.decide()
			}
		}
		s.decide()
	}
}

func (s *fleetSim) decide() {
	s.st.Soaked = s.now.Sub(s.started) >= s.interval
	d := Decide(s.pol, s.st, s.counts())
	switch d.Action {
	case Advance:
		s.st.Stage++
		s.started = s.now
	case Finish:
		s.st.State = Complete
	case Halt:
		s.st.State, s.reason = Halted, d.Reason
	case Blocklist:
		s.st.State, s.reason = Blocklisted, d.Reason
	case Wait:
		return
	}
	s.events = append(s.events, d.Action)
}

func (s *fleetSim) reached(max float64) {
	s.t.Helper()
	for id := range s.machines {
		if r := Rank(s.patch, id); r >= max {
			s.t.Fatalf("machine %s ranked %.3f, beyond %.0f%%, received the patch", id, r, max*100)
		}
	}
}

func TestHealthyPatchReachesEveryone(t *testing.T) {
	s := newSim(t, 5000)
	s.run()
	if s.st.State != Complete || len(s.machines) != 5000 {
		t.Fatalf("state %s, stage %d, %d machines got it: %s", s.st.State, s.st.Stage, len(s.machines), s.reason)
	}
	if want := []Action{Advance, Advance, Advance, Finish}; fmt.Sprint(s.events) != fmt.Sprint(want) {
		t.Fatalf("events %v, want %v", s.events, want)
	}
}

// keyShapes are the two ways a fleet enrolls: all machines on one key (a
// single tenant), or on many small keys of three machines (the worst case
// for the per-key cap: no key counts for more than two failures).
var keyShapes = map[string]func(i int) string{
	"one key":           func(int) string { return "k-fleet" },
	"keys of three":     func(i int) string { return fmt.Sprintf("k-%d", i/3) },
	"keys of a hundred": func(i int) string { return fmt.Sprintf("k-%d", i/100) },
}

// A third of the 1% stage's machines (about 50 of 5000) crash: the third
// failure comes among the stage's first machines, too few (under 10) to
// judge a rate, so the rollout halts for an operator there; nobody ranked
// beyond 1% ever gets the patch.
func TestBrokenFirstStageHalts(t *testing.T) {
	for shape, key := range keyShapes {
		t.Run(shape, func(t *testing.T) {
			s := newSim(t, 5000)
			s.key = key
			s.fails = func(id string) bool { return Rank(s.patch, id) < 0.01 && id[len(id)-1]%3 == 0 }
			s.run()
			if s.st.State != Halted || s.st.Stage != 0 || !strings.Contains(s.reason, "too few machines") {
				t.Fatalf("state %s at stage %d (%s), want halted at stage 0 for too few machines", s.st.State, s.st.Stage, s.reason)
			}
			s.reached(0.01)
		})
	}
}

// A third of the machines ranked in the 10% stage break: blocklisted at
// or before that stage, on one key and on many.
func TestBrokenTenthStageIsBlocklisted(t *testing.T) {
	for shape, key := range keyShapes {
		t.Run(shape, func(t *testing.T) {
			s := newSim(t, 2000)
			s.key = key
			s.fails = func(id string) bool {
				r := Rank(s.patch, id)
				return r >= 0.01 && r < 0.10 && id[len(id)-1]%3 == 0
			}
			s.run()
			if s.st.State != Blocklisted || s.st.Stage > 1 {
				t.Fatalf("state %s at stage %d (%s), want blocklisted by stage 1", s.st.State, s.st.Stage, s.reason)
			}
			s.reached(0.10)
		})
	}
}

// Only machines ranked in (10%, 50%) break: the rollout passes 1% and 10%
// and stops in the 50% stage, nobody beyond 50% getting it. Stopped, not
// blocklisted: three failures among the 500 machines of the earlier
// stages are within the rate, so the server halts for an operator.
func TestFailureInLaterStageStopsThere(t *testing.T) {
	s := newSim(t, 5000)
	s.fails = func(id string) bool {
		k := Rank(s.patch, id)
		return k > 0.10 && k < 0.5 && id[len(id)-1]%2 == 0
	}
	s.run()
	if s.st.State != Halted || s.st.Stage != 2 || !strings.Contains(s.reason, "within the 2% rate") {
		t.Fatalf("state %s at stage %d (%s), want halted at stage 2", s.st.State, s.st.Stage, s.reason)
	}
	s.reached(0.5)
}

// Three fake reporters on one free-tier key fail every patch they are
// offered. Placed first in the order (the three lowest ranks), they count
// for two failures: in a fleet of 5000 the good patch neither halts nor is
// blocklisted, and completes. In a fleet of 300, whose 1% stage holds
// about three machines, the first of them is all its first stage has: nothing vouches
// for the patch there, so it halts for an operator, and still is not
// blocklisted.
func TestFakeReportersOnOneKeyCannotStopAPatch(t *testing.T) {
	for n, want := range map[int]State{5000: Complete, 300: Halted} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			s := newSim(t, n)
			ids := make([]string, n)
			for i := range n {
				ids[i] = simID(i)
			}
			slices.SortFunc(ids, func(a, b string) int { return cmp.Compare(Rank(s.patch, a), Rank(s.patch, b)) })
			fakes := map[string]bool{ids[0]: true, ids[1]: true, ids[2]: true}
			s.key = func(i int) string {
				if fakes[simID(i)] {
					return "k-free"
				}
				return "k-fleet"
			}
			s.fails = func(id string) bool { return fakes[id] }
			s.run()
			if s.st.State != want {
				t.Fatalf("three fake reporters left a good patch %s at stage %d (%s), want %s", s.st.State, s.st.Stage, s.reason, want)
			}
			if tl := s.pol.Tally(s.counts()); tl.Counted > 2 || (want == Complete && tl.Failed != 3) {
				t.Fatalf("tally %+v, want at most 2 counted (3 failed when complete)", tl)
			}
			if want == Halted && !strings.Contains(s.reason, "no machine passed every check at stage 0") {
				t.Fatalf("reason %q", s.reason)
			}
		})
	}
}

// A machine that applied the patch at the first stage and was never heard
// from again (rebooted into another kernel, decommissioned) does not hold
// the rollout: after two check-in intervals it is lost, and the rollout
// completes with it counted as such.
func TestSilentMachineIsLost(t *testing.T) {
	s := newSim(t, 500)
	var silent string
	for i := 0; silent == ""; i++ {
		if id := simID(i); Rank(s.patch, id) < s.pol.Stages[0] {
			silent = id
		}
	}
	s.silent = func(id string) bool { return id == silent }
	s.run()
	tl := s.pol.Tally(s.counts())
	if s.st.State != Complete || tl.Lost != 1 || tl.Healthy != 499 {
		t.Fatalf("state %s at stage %d, tally %+v: want complete with the silent machine lost", s.st.State, s.st.Stage, tl)
	}
}

// The same machine, alone in its stage: the stage advances once it is
// lost, which is no sooner than two intervals after it was last heard.
func TestLostMachineAloneInItsStage(t *testing.T) {
	p := Policy{Stages: []float64{0.5, 1}, Checks: DefaultPolicy.Checks, MaxFailures: 2, MaxRate: 0.02}
	st := Status{State: Running, Stage: 0, Soaked: true}
	if d := Decide(p, st, []KeyCounts{{Key: "k", Unfinished: 1}}); d.Action != Wait {
		t.Fatalf("an unfinished machine must hold the stage: %+v", d)
	}
	if d := Decide(p, st, []KeyCounts{{Key: "k", Lost: 1}}); d.Action != Advance {
		t.Fatalf("a lost machine held the stage: %+v", d)
	}
	st.Stage = 1
	if d := Decide(p, st, []KeyCounts{{Key: "k", Lost: 1}}); d.Action != Wait {
		t.Fatalf("the last stage completed with no healthy machine: %+v", d)
	}
	if d := Decide(p, st, []KeyCounts{{Key: "k", Lost: 1, Healthy: 1}}); d.Action != Finish {
		t.Fatalf("the last stage did not complete: %+v", d)
	}
	if SilentAfter(time.Hour) != 2*time.Hour {
		t.Fatalf("silent after %s, want two intervals", SilentAfter(time.Hour))
	}
}

func TestNoAdvanceBeforeLastCheck(t *testing.T) {
	s := newSim(t, 300)
	var first string
	for i := 0; first == ""; i++ {
		if id := simID(i); Rank(s.patch, id) < s.pol.Stages[0] {
			first = id
		}
	}
	s.n = 0 // only the machine placed by hand
	t0 := s.now
	s.machines[first] = &simMachine{key: "k", applied: t0, heard: t0}
	s.started = t0
	for _, m := range []time.Duration{14, 15} {
		s.now = t0.Add(m * time.Minute)
		s.machines[first].checks = s.pol.ChecksPassed(t0, s.now, s.machines[first].checks, -1)
		s.decide()
	}
	if fmt.Sprint(s.events) != fmt.Sprint([]Action{Advance}) || s.st.Stage != 1 {
		t.Fatalf("events %v at stage %d: want one advance, after the 15-minute check", s.events, s.st.Stage)
	}
}

// The findings of issue 12 as counts.
func TestFewMachinesCannotBlocklist(t *testing.T) {
	p := DefaultPolicy
	running := Status{State: Running, Stage: 1, Soaked: true}
	for name, tc := range map[string]struct {
		keys []KeyCounts
		want Action
	}{
		// One failure among 21 machines used to blocklist (4.8% > 2%).
		"1 of 21": {[]KeyCounts{{Key: "k", Failed: 1, Healthy: 20}}, Advance},
		// Three machines on a free-tier key count for two failures.
		"3 fakes among 23": {[]KeyCounts{{Key: "k", Healthy: 20}, {Key: "free", Failed: 3}}, Advance},
		// Alone in a stage, they are all it has: nothing vouches for the
		// patch, so the stage halts for an operator (it cannot blocklist).
		"3 fakes alone": {[]KeyCounts{{Key: "free", Failed: 3}}, Halt},
		// The cap bounds what a key adds; it does not make it nothing: on
		// top of a real failure the fakes' two make three, which halt
		// among 204 machines (1.5%) and blocklist among 104 (2.9%).
		"3 fakes and 1 of 201": {[]KeyCounts{{Key: "k", Healthy: 200, Failed: 1}, {Key: "free", Failed: 3}}, Halt},
		"3 fakes and 1 of 101": {[]KeyCounts{{Key: "k", Healthy: 100, Failed: 1}, {Key: "free", Failed: 3}}, Blocklist},
		"3 of 1000 halt":       {[]KeyCounts{{Key: "a", Failed: 1, Healthy: 400}, {Key: "b", Failed: 1, Healthy: 300}, {Key: "c", Failed: 1, Healthy: 297}}, Halt},
		"3 of 40 blocklist":    {[]KeyCounts{{Key: "a", Failed: 2, Healthy: 20}, {Key: "b", Failed: 1, Healthy: 17}}, Blocklist},
		"3 of 9 halt":          {[]KeyCounts{{Key: "a", Failed: 2, Healthy: 2}, {Key: "b", Failed: 1, Healthy: 4}}, Halt},
		// A single tenant: one key, a really broken patch.
		"one key, 20 of 60": {[]KeyCounts{{Key: "k", Failed: 20, Healthy: 40}}, Blocklist},
		"one key, 6 of 8":   {[]KeyCounts{{Key: "k", Failed: 6, Healthy: 2}}, Halt},
	} {
		if d := Decide(p, running, tc.keys); d.Action != tc.want {
			t.Errorf("%s: %+v, want %s", name, d, tc.want)
		}
	}
}

// Decide's verdicts, case by case.
func TestDecide(t *testing.T) {
	p := Policy{Stages: []float64{0.1, 1}, Checks: []time.Duration{time.Minute}, MaxFailures: 2, MaxRate: 0.1}
	k := func(f, h, u, l int) []KeyCounts {
		return []KeyCounts{{Key: "k", Failed: f, Healthy: h, Unfinished: u, Lost: l}}
	}
	for _, c := range []struct {
		name string
		st   Status
		keys []KeyCounts
		want Action
	}{
		{"empty stage, not soaked", Status{State: Running}, nil, Wait},
		{"empty stage moves on", Status{State: Running, Soaked: true}, nil, Advance},
		{"empty last stage waits", Status{State: Running, Stage: 1, Soaked: true}, nil, Wait},
		{"unfinished holds", Status{State: Running, Soaked: true}, k(0, 5, 1, 0), Wait},
		{"lost does not hold", Status{State: Running, Soaked: true}, k(0, 5, 0, 3), Advance},
		{"all lost moves on", Status{State: Running, Soaked: true}, k(0, 0, 0, 3), Advance},
		{"last stage completes", Status{State: Running, Stage: 1, Soaked: true}, k(1, 5, 0, 1), Finish},
		{"stage past the policy's last completes", Status{State: Running, Stage: 5, Soaked: true}, k(0, 5, 0, 0), Finish},
		{"tolerated failure does not hold", Status{State: Running, Soaked: true}, k(2, 5, 0, 0), Advance},
		{"only failures: halt", Status{State: Running, Soaked: true}, k(1, 0, 0, 0), Halt},
		{"only failures, not soaked: wait", Status{State: Running}, k(1, 0, 0, 0), Wait},
		{"only tolerated failures: advance", Status{State: Running, Soaked: true, Tolerated: 1}, k(1, 0, 0, 0), Advance},
		{"count over, few machines: halt", Status{State: Running}, k(3, 5, 0, 0), Halt},
		{"count and rate over: blocklist", Status{State: Running}, k(3, 20, 0, 0), Blocklist},
		{"count over, rate within: halt", Status{State: Running}, k(3, 40, 0, 0), Halt},
		{"lost leave the rate", Status{State: Running}, k(3, 20, 0, 20), Blocklist},
		{"halted: count over stays halted", Status{State: Halted}, k(3, 5, 0, 0), Wait},
		{"halted: blocklist", Status{State: Halted}, k(3, 20, 0, 0), Blocklist},
		{"halted does not advance", Status{State: Halted, Soaked: true}, k(0, 5, 0, 0), Wait},
		{"complete: halt", Status{State: Complete, Stage: 1}, k(3, 40, 0, 0), Halt},
		{"complete: blocklist", Status{State: Complete, Stage: 1}, k(3, 20, 0, 0), Blocklist},
		{"complete stays", Status{State: Complete, Stage: 1, Soaked: true}, k(0, 5, 0, 0), Wait},
		{"blocklisted stays", Status{State: Blocklisted, Soaked: true}, k(30, 5, 0, 0), Wait},
		{"resumed: tolerated failures", Status{State: Running, Tolerated: 3}, k(3, 20, 0, 0), Wait},
		{"resumed: more failures halt", Status{State: Running, Tolerated: 3}, k(6, 40, 0, 0), Halt},
		{"resumed: more failures blocklist", Status{State: Running, Tolerated: 3}, k(6, 20, 0, 0), Blocklist},
	} {
		d := Decide(p, c.st, c.keys)
		if d.Action != c.want {
			t.Errorf("%s: %+v, want %s", c.name, d, c.want)
		}
		if (d.Action == Halt || d.Action == Blocklist) != (d.Reason != "") {
			t.Errorf("%s: %s with reason %q", c.name, d.Action, d.Reason)
		}
	}
	d := Decide(DefaultPolicy, Status{State: Running, Stage: 1}, []KeyCounts{{Key: "a", Failed: 3, Healthy: 300}, {Key: "free", Failed: 3}, {Key: "b", Lost: 2}})
	for _, want := range []string{"6 of 306 machines failed at stage 1", "5 counted", "max(2, half its machines) per enrollment key", "2 lost", "halted for an operator: stitch rollout resume or blocklist"} {
		if !strings.Contains(d.Reason, want) {
			t.Errorf("reason %q lacks %q", d.Reason, want)
		}
	}
}

// Every combination of small counts on up to two keys, in every state:
// the verdicts keep the rules' promises.
func TestDecideExhaustively(t *testing.T) {
	p := Policy{Stages: []float64{0.1, 0.5, 1}, Checks: []time.Duration{time.Minute}, MaxFailures: 2, MaxRate: 0.1}
	const top = 4
	var keysets [][]KeyCounts
	for f := range top {
		for h := range top * 3 {
			for u := range 2 {
				for l := range 2 {
					keysets = append(keysets, []KeyCounts{{Key: "a", Failed: f, Healthy: h, Unfinished: u, Lost: l}})
				}
			}
		}
	}
	one := keysets
	for _, a := range one { // and a second key, healthy or not
		for _, f := range []int{0, 1, 3} {
			keysets = append(keysets, append([]KeyCounts{{Key: "b", Failed: f, Healthy: 6}}, a...))
		}
	}
	n := 0
	for _, keys := range keysets {
		for _, state := range []State{Running, Halted, Blocklisted, Complete} {
			for stage := range len(p.Stages) {
				for _, soaked := range []bool{false, true} {
					for tolerated := range 3 {
						n++
						st := Status{State: state, Stage: stage, Soaked: soaked, Tolerated: tolerated}
						d := Decide(p, st, keys)
						checkPromises(t, p, st, keys, d)
					}
				}
			}
		}
	}
	t.Logf("%d cases", n)
}

func checkPromises(t *testing.T, p Policy, st Status, keys []KeyCounts, d Decision) {
	t.Helper()
	tl := p.Tally(keys)
	failed := max(tl.Counted-st.Tolerated, 0)
	fail := func(why string) { t.Fatalf("%+v %+v: %+v: %s", st, keys, d, why) }
	switch d.Action {
	case Blocklist:
		if st.State == Blocklisted || failed <= p.MaxFailures || tl.Machines < p.minMachines() || float64(failed) <= p.MaxRate*float64(tl.Machines) {
			fail("blocklisted without both the count and the rate over")
		}
	case Halt:
		stalled := st.State == Running && st.Soaked && tl.Unfinished == 0 && tl.Healthy == 0 && failed > 0
		if (st.State != Running && st.State != Complete) || (failed <= p.MaxFailures && !stalled) {
			fail("halted without cause, or from a state that is not running or complete")
		}
	case Advance, Finish:
		if st.State != Running || !st.Soaked || tl.Unfinished > 0 {
			fail("moved on before the stage was done")
		}
		if (d.Action == Finish) != (st.Stage >= len(p.Stages)-1) || (d.Action == Finish && tl.Healthy == 0) {
			fail("completed before the last stage, or without a healthy machine")
		}
		if tl.Healthy == 0 && failed > 0 {
			fail("moved on with nothing but failures")
		}
	}
	// Lost machines change no verdict but the reason's wording.
	var found bool
	for _, k := range keys {
		found = found || k.Lost > 0
	}
	if found {
		var none []KeyCounts
		for _, k := range keys {
			k.Lost = 0
			none = append(none, k)
		}
		if e := Decide(p, st, none); e.Action != d.Action {
			t.Fatalf("%+v %+v: %s, but %s without the lost machines", st, keys, d.Action, e.Action)
		}
	}
	// One more failure (a healthy machine failing) never undoes a stop.
	if (d.Action == Blocklist || d.Action == Halt && st.State == Running) && tl.Healthy > 0 {
		worse := append([]KeyCounts{}, keys...)
		for i := range worse {
			if worse[i].Healthy > 0 {
				worse[i].Healthy--
				worse[i].Failed++
				break
			}
		}
		if e := Decide(p, st, worse); e.Action != Blocklist && e.Action != Halt {
			t.Fatalf("%+v %+v: %s, but %s with one more failure", st, keys, d.Action, e.Action)
		}
	}
}

// A key counts for at most max(MaxFailuresPerKey, half its machines): a
// free-tier key's three machines for two, a single tenant's 60 for 30.
func TestKeyCap(t *testing.T) {
	p := DefaultPolicy
	for machines, want := range map[int]int{0: 2, 1: 2, 3: 2, 5: 2, 6: 3, 60: 30, 1001: 500} {
		if got := p.Cap(machines); got != want {
			t.Errorf("cap of %d machines: %d, want %d", machines, got, want)
		}
	}
	p.MaxFailuresPerKey = 4
	if p.Cap(3) != 4 {
		t.Errorf("MaxFailuresPerKey 4: cap %d", p.Cap(3))
	}
	tl := DefaultPolicy.Tally([]KeyCounts{{Key: "free", Failed: 3}, {Key: "big", Failed: 40, Healthy: 40, Lost: 100}, {Key: "c", Failed: 1, Unfinished: 2}})
	if tl != (Tally{Machines: 86, Failed: 44, Counted: 2 + 40 + 1, Healthy: 40, Unfinished: 2, Lost: 100}) {
		t.Errorf("tally %+v", tl)
	}
}

func TestOperate(t *testing.T) {
	for _, c := range []struct {
		from State
		op   Op
		want State
		ok   bool
	}{
		{Running, OpHalt, Halted, true},
		{Halted, OpHalt, Halted, false},
		{Complete, OpHalt, Complete, false},
		{Blocklisted, OpHalt, Blocklisted, false},
		{Halted, OpResume, Running, true},
		{Blocklisted, OpResume, Running, true},
		{Running, OpResume, Running, false},
		{Complete, OpResume, Complete, false},
		{Running, OpBlocklist, Blocklisted, true},
		{Halted, OpBlocklist, Blocklisted, true},
		{Complete, OpBlocklist, Blocklisted, true},
		{Blocklisted, OpBlocklist, Blocklisted, true},
		{Running, "explode", Running, false},
	} {
		got, err := Operate(c.from, c.op)
		if got != c.want || (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrState)) {
			t.Errorf("%s on %s: %s, %v; want %s (ok %v)", c.op, c.from, got, err, c.want, c.ok)
		}
	}
	if Halted.Offers() || Blocklisted.Offers() || !Running.Offers() || !Complete.Offers() {
		t.Error("only running and complete rollouts offer their patch")
	}
	if !Blocklisted.Reverts() || Running.Reverts() || Halted.Reverts() || Complete.Reverts() {
		t.Error("only a blocklisted rollout has machines revert its patch")
	}
}

func TestValidate(t *testing.T) {
	if err := DefaultPolicy.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]Policy{
		"shrinking stages":  {Stages: []float64{0.5, 0.2, 1}},
		"not ending at 1":   {Stages: []float64{0.5}},
		"no stages":         {},
		"checks backwards":  {Stages: []float64{1}, Checks: []time.Duration{time.Minute, time.Second}},
		"negative failures": {Stages: []float64{1}, MaxFailures: -1},
		"rate of 1":         {Stages: []float64{1}, MaxRate: 1},
		"negative per key":  {Stages: []float64{1}, MaxFailuresPerKey: -1},
		"negative minimum":  {Stages: []float64{1}, MinMachines: -1},
	} {
		if err := p.Validate(); !errors.Is(err, ErrBadPolicy) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// A report naming a check counts it (with those before it) once half its
// time has passed on the server's clock, which starts at the machine's
// first report, after the machine's own apply.
func TestNamedCheckCounts(t *testing.T) {
	p := DefaultPolicy
	t0 := time.Unix(0, 0)
	for _, c := range []struct {
		elapsed     time.Duration
		done, named int
		want        int
	}{
		{59 * time.Second, 0, -1, 0},
		{60 * time.Second, 0, -1, 1},
		{59 * time.Second, 0, 0, 1}, // "1m", 59 s after the server heard of the apply
		{14 * time.Minute, 1, 2, 3}, // "15m" a minute late in the server's eyes
		{7 * time.Minute, 1, 2, 2},  // "15m" after 7 minutes: too early; the 5m check counts by time
		{5 * time.Second, 0, 2, 0},  // a hasty agent rushes nothing
		{20 * time.Minute, 0, 0, 3}, // time alone passes later checks
		{2 * time.Minute, 3, 1, 3},  // never fewer than done
	} {
		if got := p.ChecksPassed(t0, t0.Add(c.elapsed), c.done, c.named); got != c.want {
			t.Errorf("ChecksPassed(+%s, done %d, named %d) = %d, want %d", c.elapsed, c.done, c.named, got, c.want)
		}
	}
}
