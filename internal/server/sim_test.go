package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// fakeClock is the server's and the agents' time in a simulation.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

const (
	simRelease = "6.1.0-54-amd64"
	simBuildID = "887cd47f03581c5baf735611814b0308637cd7f2"
)

// simAgent plays an agent: it checks in when told to, applies and reverts
// what it is ordered to, and reports health at 1, 5 and 15 minutes. A
// fake one reports a failure of every patch it is offered, again every
// minute; a silent one goes away for good right after its first apply
// (rebooted into another kernel, decommissioned).
type simAgent struct {
	c       *api.Client
	id      string
	buildID string
	next    time.Time
	held    map[string]*heldPatch // by target

	fake, silent, gone bool
}

type heldPatch struct {
	name, state string
	since       time.Time
	sent        int // health checks sent after the apply
}

// simFleet is the simulation: agents, what they were ordered, and which
// of them break which patch.
type simFleet struct {
	clk    *fakeClock
	tick   func(context.Context) error // the server's rollout clock
	agents []*simAgent
	breaks func(a *simAgent, target string) bool

	mu       sync.Mutex
	received map[string][]string // target → machines ordered to apply it
	reverted map[string][]string
}

// simChecks is the schedule the simulated server runs (the default
// policy's), which its agents follow.
var simChecks = contract.DefaultSchedule

func (f *simFleet) step(ctx context.Context, a *simAgent) error {
	if a.gone {
		return nil
	}
	now := f.clk.Now()
	for target, h := range a.held {
		if a.fake {
			// Over and over: a failure counts once per machine, and past
			// its report limit the server does not even read it.
			if err := a.c.Health(ctx, api.Health{Target: target, Name: h.name, Check: simChecks[0].Name, Reason: contract.ReasonOops}); err != nil && !errors.Is(err, api.ErrRateLimited) {
				return fmt.Errorf("%s: fake failure report: %w", a.id, err)
			}
			continue
		}
		for h.state == contract.StateApplied && h.sent < len(simChecks) && now.Sub(h.since) >= simChecks[h.sent].After {
			if err := a.c.Health(ctx, api.Health{Target: target, Name: h.name, Check: simChecks[h.sent].Name, Healthy: true}); err != nil {
				return fmt.Errorf("%s: health %s: %w", a.id, simChecks[h.sent].Name, err)
			}
			h.sent++
		}
	}
	if now.Before(a.next) {
		return nil
	}
	ci := api.CheckIn{KernelRelease: simRelease, KernelBuildID: a.buildID, AgentVersion: "sim"}
	for target, h := range a.held {
		ci.Patches = append(ci.Patches, api.PatchState{Target: target, Name: h.name, State: h.state, Since: h.since})
	}
	resp, err := a.c.CheckIn(ctx, ci)
	if err != nil {
		return fmt.Errorf("%s: check-in: %w", a.id, err)
	}
	a.next = now.Add(time.Duration(resp.NextCheckinSeconds) * time.Second)
	for _, act := range resp.Actions {
		f.mu.Lock()
		if act.Op == api.OpApply {
			f.received[act.Target] = append(f.received[act.Target], a.id)
		} else {
			f.reverted[act.Target] = append(f.reverted[act.Target], a.id)
		}
		f.mu.Unlock()
		switch {
		case act.Op == api.OpRevert:
			a.held[act.Target].state, a.held[act.Target].since = contract.StateReverted, now
		case a.fake || f.breaks(a, act.Target):
			a.held[act.Target] = &heldPatch{name: act.Name, state: contract.StateFailed, since: now}
			if err := a.c.Health(ctx, api.Health{Target: act.Target, Name: act.Name, Check: contract.CheckApply, Reason: contract.ReasonKernelWarning, Detail: "WARNING: at fs/proc/base.c"}); err != nil {
				return fmt.Errorf("%s: failure report: %w", a.id, err)
			}
		default:
			a.held[act.Target] = &heldPatch{name: act.Name, state: contract.StateApplied, since: now}
			if err := a.c.Health(ctx, api.Health{Target: act.Target, Name: act.Name, Check: contract.CheckApply, Healthy: true}); err != nil {
				return fmt.Errorf("%s: apply report: %w", a.id, err)
			}
			a.gone = a.silent
		}
	}
	return nil
}

// run advances the clock a minute at a time for at most d, every agent
// acting concurrently each minute, until done says so.
func (f *simFleet) run(ctx context.Context, t *testing.T, d time.Duration, done func() bool) {
	for elapsed := time.Duration(0); elapsed < d; elapsed += time.Minute {
		f.clk.Add(time.Minute)
		work := make(chan *simAgent)
		errs := make(chan error, len(f.agents))
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for a := range work {
					if err := f.step(ctx, a); err != nil {
						errs <- err
					}
				}
			}()
		}
		for _, a := range f.agents {
			work <- a
		}
		close(work)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if err := f.tick(ctx); err != nil {
			t.Fatal(err)
		}
		if elapsed%(10*time.Minute) == 0 && done() {
			return
		}
	}
	t.Fatalf("simulation did not settle in %s", d)
}

func publish(t testing.TB, repo *bundle.Repo, name, buildID string, cves ...string) string {
	t.Helper()
	data, err := bundle.Pack(testManifest(name, simRelease, buildID, cves...), testutils.StandInModule(t, name, simRelease, buildID))
	if err != nil {
		t.Fatal(err)
	}
	target, err := repo.Publish(data)
	if err != nil {
		t.Fatal(err)
	}
	return target
}

// TestRolloutSimulation enrolls thousands of in-process agents against the
// real server over loopback HTTP and rolls out two patches at once to the
// machines on one kernel (a tenth run another build): a good one that must
// reach every machine, and a bad one that a third of the machines ranked
// in the 10% stage break. The bad patch must be blocklisted at or before
// that stage by the server itself, nobody ranked beyond 10% may ever be
// offered it, and every machine that applied it must be told to revert.
// The fleet enrolls under one big key (a single tenant) or under keys of
// 20 machines. Besides, three fake reporters on a free-tier key report a
// failure of every patch they are offered, over and over (and of patches
// they were not offered, refused): they count for two failures, so the
// good patch is neither halted nor blocklisted, and completes. And one
// machine goes silent right after applying the good patch at its first
// stage: it is reported lost and holds nothing up.
//
// The bad patch's third failure must come with at least 10 machines in
// the rollout for its rate to be judged: the 1% stage of 1800 machines
// gives that. Smaller runs (-short, and 500 agents on PostgreSQL) may halt
// it instead, for too few machines, at or before 10% all the same.
//
// On PostgreSQL the same runs with 500 agents (to keep CI's time modest)
// against two server replicas sharing the database, half of the agents on
// each and both running the rollout clock: every decision must still be
// taken once.
func TestRolloutSimulation(t *testing.T) {
	n := 2000
	if testing.Short() {
		n = 300
	}
	sqlite := func(t *testing.T) store.Store {
		st, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "fleet.db"))
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	t.Run("sqlite one key", func(t *testing.T) { simulate(t, sqlite(t), n, 1, 0) })
	t.Run("sqlite keys of 20", func(t *testing.T) { simulate(t, sqlite(t), n, 1, 20) })
	t.Run("postgres", func(t *testing.T) { simulate(t, postgresStore(t, "server_sim"), min(n, 500), 2, 20) })
}

// simulate runs n agents against replicas servers on st, enrolled under
// keys of keySize machines (0: one key for all).
func simulate(t *testing.T, st store.Store, n, replicas, keySize int) {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	e := newEnvOn(t, st, func(s *Server) { s.Now, s.CheckInEvery = clk.Now, 10*time.Minute })
	servers := []*Server{e.s}
	urls := []string{e.srv.URL}
	for range replicas - 1 {
		s := &Server{Store: st, Repo: e.repo, AdminToken: e.admin, Now: clk.Now, CheckInEvery: 10 * time.Minute, Log: e.s.Log}
		hs := httptest.NewServer(s.Handler())
		t.Cleanup(hs.Close)
		servers, urls = append(servers, s), append(urls, hs.URL)
	}
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if err := admin.Do(ctx, "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	newKey := func(max int) string {
		var key api.KeyResponse
		if err := admin.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: max}, &key); err != nil {
			t.Fatal(err)
		}
		return key.Key
	}
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	f := &simFleet{clk: clk, received: map[string][]string{}, reverted: map[string][]string{}, tick: func(ctx context.Context) error {
		// All replicas at once: the row lock must let one of them decide.
		errs := make(chan error, len(servers))
		for _, s := range servers {
			go func() { errs <- s.Tick(ctx) }()
		}
		var err error
		for range servers {
			err = errors.Join(err, <-errs)
		}
		return err
	}}
	var key string
	enroll := func(i int, key string) *simAgent {
		a := &simAgent{buildID: simBuildID, held: map[string]*heldPatch{},
			next: clk.Now().Add(time.Duration(i%10) * time.Minute)} // spread the check-ins
		a.c = &api.Client{BaseURL: urls[i%len(urls)], HTTP: hc}
		r, err := a.c.Enroll(ctx, api.EnrollRequest{Key: key, Hostname: fmt.Sprintf("host%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		a.id, a.c.Token = r.MachineID, r.Token
		f.agents = append(f.agents, a)
		return a
	}
	for i := range n {
		switch {
		case keySize == 0 && i == 0:
			key = newKey(n)
		case keySize > 0 && i%keySize == 0:
			key = newKey(keySize)
		}
		if a := enroll(i, key); i%10 == 9 {
			a.buildID = "1111111111111111111111111111111111111111"
		}
	}
	free := newKey(0) // the free tier: three machines
	var fakes []*simAgent
	for i := range FreeTierMachines {
		a := enroll(n+i, free)
		a.fake = true
		fakes = append(fakes, a)
	}
	good := publish(t, e.repo, "stitch_good", simBuildID, "CVE-2026-1000")
	bad := publish(t, e.repo, "stitch_bad", simBuildID, "CVE-2026-2000")
	for _, target := range []string{good, bad} {
		if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
			t.Fatal(err)
		}
	}
	pol := rollout.DefaultPolicy
	f.breaks = func(a *simAgent, target string) bool {
		r := rollout.Rank(target, a.id)
		return target == bad && r >= pol.Stages[0] && r < pol.Stages[1] && a.id[len(a.id)-1]%3 == 0
	}
	onKernel := 0
	for _, a := range f.agents {
		if a.buildID == simBuildID {
			onKernel++
		}
	}
	// The silent machine: one of the good patch's first stage, where it
	// can hold the most up. Not one of the only few there, though, lest
	// the fakes be all that is left of the stage.
	var silent *simAgent
	var first []*simAgent
	for _, a := range f.agents {
		if r := rollout.Rank(good, a.id); a.buildID == simBuildID && !a.fake && r < pol.Stages[0] {
			first = append(first, a)
		}
	}
	if len(first) >= 3 {
		silent = first[0]
	} else {
		for _, a := range f.agents {
			if r := rollout.Rank(good, a.id); a.buildID == simBuildID && !a.fake && r >= pol.Stages[0] && r < pol.Stages[1] {
				silent = a
				break
			}
		}
	}
	silent.silent = true

	// Before they are offered anything, the fakes' failure reports are
	// refused: only a machine the server offered a patch may report on it.
	fakeReports := func(want int) {
		t.Helper()
		for _, a := range fakes {
			for _, target := range []string{good, bad} {
				if a.held[target] != nil {
					continue
				}
				name := map[string]string{good: "stitch_good", bad: "stitch_bad"}[target]
				var se *api.StatusError
				if err := a.c.Health(ctx, api.Health{Target: target, Name: name, Check: contract.CheckApply, Reason: contract.ReasonOops}); !errors.As(err, &se) || se.Code != want {
					t.Fatalf("fake %s reported on %s, never offered it: %v, want %d", a.id, target, err, want)
				}
			}
		}
	}
	fakeReports(http.StatusConflict)

	reports := func() map[string]api.PatchReport {
		var rs []api.PatchReport
		if err := admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &rs); err != nil {
			t.Fatal(err)
		}
		out := map[string]api.PatchReport{}
		for _, r := range rs {
			out[r.Target] = r
		}
		return out
	}
	strict := n >= 1000 // enough machines at 1% for the bad patch's rate to be judged
	start := time.Now()
	f.run(ctx, t, 8*time.Hour, func() bool {
		rs := reports()
		f.mu.Lock()
		defer f.mu.Unlock()
		badDone := rs[bad].State == "blocklisted" && len(f.reverted[bad]) == rs[bad].Applied-rs[bad].Lost ||
			!strict && rs[bad].State == "halted"
		return rs[good].State == "complete" && len(f.received[good]) == onKernel && badDone
	})
	t.Logf("%d agents settled after %s of simulated time in %s", n, clk.Now().Sub(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)), time.Since(start).Round(time.Millisecond))
	fakeReports(http.StatusConflict)

	rs := reports()
	// The good patch: everyone on its kernel got it; the fakes' three
	// failures count for two, below the threshold; the silent machine is
	// lost, not unfinished.
	if g := rs[good]; g.State != "complete" || g.Stage != len(pol.Stages)-1 || g.Healthy != onKernel-4 || g.Failed != 3 || g.Counted != 2 ||
		g.Lost != 1 || g.Applied != onKernel-3 || g.Pending != 0 || g.Eligible != onKernel {
		t.Errorf("good patch: %+v, want complete on all %d machines but the 3 fakes (failed, 2 counted) and the silent one (lost)", g, onKernel)
	}
	b := rs[bad]
	switch {
	case b.Stage > 1 || b.Failed == 0:
		t.Errorf("bad patch: %+v, want stopped at or before stage 1 (10%%)", b)
	case b.State == "blocklisted":
	case !strict && b.State == "halted":
		// A small fleet's first stages hold too few machines to judge a
		// rate (or only failed ones): an operator decides.
	default:
		t.Errorf("bad patch: %+v, want blocklisted (or, with fewer than 1000 agents, halted for an operator)", b)
	}
	t.Logf("bad patch: %s at stage %d: %s", b.State, b.Stage, b.Reason)
	byID := map[string]*simAgent{}
	for _, a := range f.agents {
		byID[a.id] = a
	}
	for _, id := range f.received[bad] {
		if r := rollout.Rank(bad, id); r >= pol.Stages[1] {
			t.Errorf("machine %s ranked %.3f, beyond the 10%% stage, was offered the bad patch", id, r)
		}
		if byID[id].buildID != simBuildID {
			t.Errorf("machine %s on another kernel was offered the bad patch", id)
		}
	}
	for _, a := range f.agents {
		if h := a.held[bad]; b.State == "blocklisted" && h != nil && h.state == contract.StateApplied && !a.silent {
			t.Errorf("machine %s still runs the blocklisted patch", a.id)
		}
		if h := a.held[good]; a.buildID == simBuildID && !a.fake && (h == nil || h.state != contract.StateApplied) {
			t.Errorf("machine %s lacks the good patch", a.id)
		}
	}
	if len(f.received[bad]) == 0 || len(f.received[bad]) > onKernel/5 {
		t.Errorf("%d machines got the bad patch", len(f.received[bad]))
	}

	// The CVE report: the good fix is everywhere on its kernel but on the
	// fakes (failed) and the silent machine (it never checked in again to
	// say it applied it); the bad one's CVE stays exposed on every machine
	// of that kernel once it is blocklisted (halted, the machines that
	// have it keep it).
	holdsBad := 0
	for _, a := range f.agents {
		if h := a.held[bad]; h != nil && h.state == contract.StateApplied && !a.silent {
			holdsBad++
		}
	}
	var cves []api.CVEReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/cves", nil, &cves); err != nil {
		t.Fatal(err)
	}
	for _, c := range cves {
		switch {
		case c.CVE == "CVE-2026-1000" && (c.Fixed != onKernel-4 || len(c.Exposed) != 4),
			c.CVE == "CVE-2026-2000" && b.State == "blocklisted" && (c.Fixed != 0 || len(c.Exposed) != onKernel),
			c.CVE == "CVE-2026-2000" && (c.Fixed > holdsBad || c.Fixed+len(c.Exposed) != onKernel):
			t.Errorf("cve report: %s fixed on %d, exposed on %d of %d", c.CVE, c.Fixed, len(c.Exposed), onKernel)
		}
	}
	var mr []api.MachineReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/machines", nil, &mr); err != nil {
		t.Fatal(err)
	}
	if len(mr) != len(f.agents) {
		t.Fatalf("machine report: %d machines, want %d", len(mr), len(f.agents))
	}
	for _, m := range mr {
		a := byID[m.ID]
		if m.KernelBuildID != simBuildID || a.fake || a.silent || a.held[bad] != nil && a.held[bad].state == contract.StateApplied {
			continue
		}
		if len(m.FixedCVEs) != 1 || m.FixedCVEs[0] != "CVE-2026-1000" {
			t.Errorf("machine %s: fixed %v", m.ID, m.FixedCVEs)
			break
		}
	}
	// Each replica counts its own events; together, each decision once.
	var body string
	for _, u := range urls {
		req, _ := http.NewRequest("GET", u+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+e.admin)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body += string(b)
	}
	for _, want := range []string{`stitch_rollouts{state="` + b.State + `"} 1`, `stitch_rollouts{state="complete"} 1`,
		`stitch_http_request_duration_seconds_bucket{route="POST /v1/machines/self/checkin",le="+Inf"}`, `stitch_health_reports_total{result="unhealthy"}`} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	events := map[string]int{}
	for _, line := range strings.Split(body, "\n") {
		var ev string
		var n int
		if _, err := fmt.Sscanf(line, "stitch_rollout_events_total{event=%q} %d", &ev, &n); err == nil {
			events[ev] += n
		}
	}
	// The bad patch may be halted first (its third failure among fewer
	// than 10 machines), then blocklisted by the reports of machines that
	// had it already; each once.
	if events[b.State] != 1 || events["halted"] > 1 || events["blocklisted"] > 1 || events["completed"] != 1 || events["advanced"] != 3+b.Stage {
		t.Errorf("rollout events over %d replicas: %v, want the bad patch %s once (halted at most once before), the good one advanced 3 times and completed once, the bad one advanced %d times",
			replicas, events, b.State, b.Stage)
	}
}
