package server

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
)

// allAtOnce is the default policy in one stage: every eligible machine is
// offered a patch at once, so tests do not depend on machines' ranks.
var allAtOnce = rollout.Policy{Stages: []float64{1}, Checks: rollout.DefaultPolicy.Checks,
	MaxFailures: rollout.DefaultPolicy.MaxFailures, MaxRate: rollout.DefaultPolicy.MaxRate}

// trustEnv is a server on SQLite with a fake clock and the canary channel
// for the default group.
type trustEnv struct {
	*env
	clk   *fakeClock
	admin *api.Client
}

func newTrustEnv(t *testing.T, pol rollout.Policy) *trustEnv {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	e := newEnv(t, func(s *Server) { s.Now, s.Policy, s.CheckInEvery = clk.Now, pol, 10*time.Minute })
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if err := admin.Do(context.Background(), "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	return &trustEnv{env: e, clk: clk, admin: admin}
}

// start publishes and registers a patch for the simulated kernel.
func (e *trustEnv) start(t *testing.T, name string) string {
	t.Helper()
	target := publish(t, e.repo, name, simBuildID)
	if err := e.admin.Do(context.Background(), "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	return target
}

func (e *trustEnv) report(t *testing.T, target string) api.PatchReport {
	t.Helper()
	var rs []api.PatchReport
	if err := e.admin.Do(context.Background(), "GET", "/v1/admin/reports/patches", nil, &rs); err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if r.Target == target {
			return r
		}
	}
	t.Fatalf("no report of %s", target)
	return api.PatchReport{}
}

// offered checks in and says whether the machine was told to apply target.
func offeredTo(t *testing.T, c *api.Client, target string, held ...api.PatchState) bool {
	t.Helper()
	for _, a := range checkIn(t, c, held...) {
		if a.Target == target && a.Op == api.OpApply {
			return true
		}
	}
	return false
}

func health(t *testing.T, c *api.Client, target, name, check, reason string) {
	t.Helper()
	h := api.Health{Target: target, Name: name, Check: check, Healthy: reason == "", Reason: reason}
	if err := c.Health(context.Background(), h); err != nil {
		t.Fatalf("health %s %s: %v", check, reason, err)
	}
}

// Issue 12, finding 1: a few enrolled machines could blocklist any patch
// for the whole fleet. One failure among 21 machines blocklisted a patch
// (the rate, 4.8%, counted alone); three machines on a free-tier key did
// (three failures, over and over, counted alone); and a machine could
// report on a patch it was never offered. On the old server every one of
// these blocklisted the patch or was accepted.
func TestIssue12FewMachinesCannotBlocklist(t *testing.T) {
	e := newTrustEnv(t, allAtOnce)
	ctx := context.Background()
	fleet, free := e.enroll(t, 21, ""), e.enroll(t, 3, "")

	// One failure among 21.
	one := e.start(t, "stitch_one")
	for i, c := range fleet {
		if !offeredTo(t, c, one) {
			t.Fatalf("machine %d not offered the patch", i)
		}
		reason := ""
		if i == len(fleet)-1 { // after 20 healthy reports
			reason = contract.ReasonKernelWarning
		}
		health(t, c, one, "stitch_one", contract.CheckApply, reason)
	}
	if r := e.report(t, one); r.State != "running" || r.Failed != 1 {
		t.Fatalf("one failure among 21 machines: %+v, want running", r)
	}

	// Three fake reporters on a free-tier key, among 21 healthy machines.
	fake := e.start(t, "stitch_fake")
	held := api.PatchState{Target: fake, Name: "stitch_fake", State: contract.StateApplied, Since: e.clk.Now()}
	for _, c := range fleet {
		offeredTo(t, c, fake)
		health(t, c, fake, "stitch_fake", contract.CheckApply, "")
	}
	for _, c := range free {
		offeredTo(t, c, fake)
		for _, check := range []string{contract.CheckApply, contract.DefaultSchedule[0].Name, contract.CheckBoot} { // once per machine
			health(t, c, fake, "stitch_fake", check, contract.ReasonOops)
		}
	}
	if r := e.report(t, fake); r.State != "running" || r.Failed != 3 || r.Counted != 2 {
		t.Fatalf("three machines on a free-tier key: %+v, want running with 3 failed, 2 counted", r)
	}
	heldOne := api.PatchState{Target: one, Name: "stitch_one", State: contract.StateApplied, Since: e.clk.Now()}
	if acts := checkIn(t, fleet[1], held, heldOne); len(acts) != 0 {
		t.Fatalf("a machine that has the patches was ordered %+v", acts)
	}

	// A patch registered after the machines' last check-in: none of them
	// was offered it yet, so none may report on it, though each is within
	// its stage.
	late := e.start(t, "stitch_late")
	for _, c := range free {
		var se *api.StatusError
		if err := c.Health(ctx, api.Health{Target: late, Name: "stitch_late", Check: contract.CheckApply, Reason: contract.ReasonOops}); !errors.As(err, &se) || se.Code != 409 {
			t.Fatalf("a report on a patch never offered: %v, want 409", err)
		}
	}
	if r := e.report(t, late); r.State != "running" || r.Failed != 0 || r.Applied != 0 {
		t.Fatalf("refused reports entered the rollout: %+v", r)
	}
}

// The other side of finding 1: real breakage still stops a patch. Failures
// from several keys over the count but among too few machines to judge a
// rate halt the rollout for an operator, with the reason; one more failure
// with enough machines blocklists it from halted, and machines revert;
// halting does not undo a blocklisting.
func TestRealFailuresHaltThenBlocklist(t *testing.T) {
	e := newTrustEnv(t, allAtOnce)
	ctx := context.Background()
	var ms []*api.Client
	for range 4 {
		ms = append(ms, e.enroll(t, 3, "")...) // four free-tier keys
	}
	target := e.start(t, "stitch_bad")
	for _, c := range ms {
		if !offeredTo(t, c, target) {
			t.Fatal("not offered")
		}
	}
	// Three failures, one per key, among the first seven reports.
	for i, c := range ms[:9] {
		reason := ""
		if i%3 == 0 {
			reason = contract.ReasonOops
		}
		health(t, c, target, "stitch_bad", contract.CheckApply, reason)
	}
	r := e.report(t, target)
	if r.State != "halted" || !strings.Contains(r.Reason, "3 of 7 machines failed at stage 0") || !strings.Contains(r.Reason, "halted for an operator") {
		t.Fatalf("three failures among seven machines: %+v, want halted with the reason", r)
	}
	held := api.PatchState{Target: target, Name: "stitch_bad", State: contract.StateApplied, Since: e.clk.Now()}
	if acts := checkIn(t, ms[1], held); len(acts) != 0 {
		t.Fatalf("halted: machines keep the patch, got %+v", acts)
	}
	// Machines offered it before the halt still report: one more failure
	// among twelve is over both thresholds.
	for _, c := range ms[9:] {
		health(t, c, target, "stitch_bad", contract.CheckApply, "")
	}
	health(t, ms[1], target, "stitch_bad", contract.CheckBoot, contract.ReasonCrashLoop)
	if r := e.report(t, target); r.State != "blocklisted" || r.Failed != 4 || !strings.Contains(r.Reason, "blocklisted") {
		t.Fatalf("after a fourth failure among 12: %+v, want blocklisted", r)
	}
	if acts := checkIn(t, ms[2], held); len(acts) != 1 || acts[0].Op != api.OpRevert {
		t.Fatalf("blocklisted: want a revert order, got %+v", acts)
	}
	var se *api.StatusError
	if err := e.admin.Do(ctx, "POST", "/v1/admin/rollouts/"+target+"/halt", api.RolloutRequest{}, nil); !errors.As(err, &se) || se.Code != 409 {
		t.Fatalf("halting a blocklisted rollout: %v, want 409", err)
	}
	health(t, ms[4], target, "stitch_bad", contract.CheckBoot, contract.ReasonOops)
	e.clk.Add(time.Hour)
	e.s.Tick(ctx)
	if r := e.report(t, target); r.State != "blocklisted" {
		t.Fatalf("a blocklisted rollout became %s", r.State)
	}
}

// Resuming a halted rollout accepts the failures counted so far: it goes
// on (the next tick does not halt it again), and new failures past the
// count halt it once more.
func TestResumeToleratesTheFailuresSoFar(t *testing.T) {
	pol := allAtOnce
	pol.Stages = []float64{0.999, 1} // a stage to advance past
	e := newTrustEnv(t, pol)
	ctx := context.Background()
	var ms []*api.Client
	for range 9 {
		ms = append(ms, e.enroll(t, 1, "")...) // a key each
	}
	target := e.start(t, "stitch_fix")
	var in []*api.Client
	for _, c := range ms {
		if offeredTo(t, c, target) {
			in = append(in, c)
		}
	}
	if len(in) < 7 {
		t.Skipf("only %d of 9 machines ranked within 99.9%%", len(in))
	}
	for i, c := range in {
		reason := ""
		if i < 3 {
			reason = contract.ReasonOops
		}
		health(t, c, target, "stitch_fix", contract.CheckApply, reason)
	}
	if r := e.report(t, target); r.State != "halted" {
		t.Fatalf("%+v, want halted", r)
	}
	if err := e.admin.Do(ctx, "POST", "/v1/admin/rollouts/"+target+"/resume", api.RolloutRequest{}, nil); err != nil {
		t.Fatal(err)
	}
	e.clk.Add(20 * time.Minute)
	for _, c := range in[3:] {
		health(t, c, target, "stitch_fix", contract.DefaultSchedule[2].Name, "")
	}
	if err := e.s.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if r := e.report(t, target); r.State != "running" || r.Stage != 1 || r.Reason != "" {
		t.Fatalf("after resuming: %+v, want running at stage 1", r)
	}
	for _, c := range in[3:6] {
		health(t, c, target, "stitch_fix", contract.CheckBoot, contract.ReasonOops)
	}
	if r := e.report(t, target); r.State != "halted" || !strings.Contains(r.Reason, "3 tolerated by an operator") {
		t.Fatalf("three more failures: %+v, want halted again", r)
	}
}

// Issue 12, finding 2: a machine that reported its apply and was never
// heard from again (rebooted into another kernel, decommissioned) kept a
// patch at stage 0 forever, and resuming did not help. Now, silent for
// more than two check-in intervals, it is lost: it leaves the stage's
// unfinished machines, the rollout moves on and completes, and the
// report counts it as lost. Before that it holds the stage, as a machine
// still working through its checks should.
func TestIssue12SilentMachineDoesNotStallARollout(t *testing.T) {
	pol := allAtOnce
	pol.Stages = []float64{0.5, 1}
	e := newTrustEnv(t, pol)
	ctx := context.Background()
	ms := e.enroll(t, 20, "")
	target := e.start(t, "stitch_fix")
	held := map[*api.Client]time.Time{}
	var silent *api.Client
	for _, c := range ms {
		if !offeredTo(t, c, target) {
			continue
		}
		health(t, c, target, "stitch_fix", contract.CheckApply, "")
		if silent == nil {
			silent = c // reports its apply, and nothing more
			continue
		}
		held[c] = e.clk.Now()
	}
	if silent == nil || len(held) == 0 {
		t.Fatalf("%d machines in the first stage, want 2 or more", len(held))
	}
	// The others check in every interval and pass every check.
	advanced := time.Duration(0)
	for elapsed := time.Minute; elapsed <= 3*time.Hour; elapsed += time.Minute {
		e.clk.Add(time.Minute)
		for _, c := range ms {
			if c == silent || elapsed%(10*time.Minute) != 0 {
				continue
			}
			since, ok := held[c]
			if !ok {
				if offeredTo(t, c, target) {
					health(t, c, target, "stitch_fix", contract.CheckApply, "")
					held[c] = e.clk.Now()
				}
				continue
			}
			checkIn(t, c, api.PatchState{Target: target, Name: "stitch_fix", State: contract.StateApplied, Since: since})
			if e.clk.Now().Sub(since) >= 15*time.Minute {
				health(t, c, target, "stitch_fix", contract.DefaultSchedule[2].Name, "")
			}
		}
		if err := e.s.Tick(ctx); err != nil {
			t.Fatal(err)
		}
		r := e.report(t, target)
		if r.Stage == 1 && advanced == 0 {
			advanced = elapsed
		}
		if r.State == "complete" {
			break
		}
	}
	r := e.report(t, target)
	if r.State != "complete" || r.Lost != 1 || r.Healthy != 19 {
		t.Fatalf("with a silent machine: %+v, want complete with it lost", r)
	}
	// Two intervals of silence (20 minutes after its apply), not sooner.
	if advanced <= 20*time.Minute {
		t.Fatalf("advanced after %s, before the silent machine was lost", advanced)
	}
	// Heard from again, it is no longer lost.
	health(t, silent, target, "stitch_fix", contract.DefaultSchedule[2].Name, "")
	if r := e.report(t, target); r.Lost != 0 || r.Healthy != 20 {
		t.Fatalf("the machine came back: %+v", r)
	}
}
