package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// onePolicy offers a patch to every eligible machine at once, so tests of
// eligibility do not depend on machines' ranks.
var onePolicy = rollout.Policy{Stages: []float64{1}, Checks: []time.Duration{time.Minute}, MaxFailures: 0}

// enroll makes n machines on one key and returns their clients.
func (e *env) enroll(t *testing.T, n int, group string) []*api.Client {
	t.Helper()
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	var key api.KeyResponse
	if err := admin.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: n, Group: group}, &key); err != nil {
		t.Fatal(err)
	}
	var out []*api.Client
	for range n {
		c := &api.Client{BaseURL: e.srv.URL}
		r, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "h"})
		if err != nil {
			t.Fatal(err)
		}
		c.Token = r.Token
		out = append(out, c)
	}
	return out
}

func checkIn(t *testing.T, c *api.Client, held ...api.PatchState) []api.Action {
	t.Helper()
	r, err := c.CheckIn(context.Background(), api.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID, AgentVersion: "t", Patches: held})
	if err != nil {
		t.Fatal(err)
	}
	return r.Actions
}

func TestMachineAPIAuthAndBadRequests(t *testing.T) {
	e := newEnv(t, func(s *Server) { s.Policy = onePolicy })
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	ms := e.enroll(t, 2, "")
	a, b := ms[0], ms[1]
	other := publish(t, e.repo, "stitch_other", "2222222222222222222222222222222222222222")
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: other}, nil); err != nil {
		t.Fatal(err)
	}
	checkIn(t, a)
	before, err := a.Self(ctx)
	if err != nil || before.KernelBuildID != simBuildID {
		t.Fatalf("self: %+v %v", before, err)
	}

	// Tokens: the admin token is no machine's, a machine's is no admin's.
	asAdmin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if _, err := asAdmin.CheckIn(ctx, api.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID}); !errors.Is(err, api.ErrUnauthorized) {
		t.Errorf("admin token checked in: %v", err)
	}
	for _, path := range []string{"/v1/admin/reports/patches", "/v1/admin/reports/machines", "/v1/admin/reports/cves", "/v1/admin/channels", "/metrics"} {
		if err := a.Do(ctx, "GET", path, nil, nil); !errors.Is(err, api.ErrUnauthorized) {
			t.Errorf("machine token read %s: %v", path, err)
		}
	}
	if err := a.Do(ctx, "POST", "/v1/admin/rollouts/"+other+"/blocklist", api.RolloutRequest{}, nil); !errors.Is(err, api.ErrUnauthorized) {
		t.Errorf("machine blocklisted a patch: %v", err)
	}
	if err := a.Do(ctx, "PUT", "/v1/admin/machines/"+before.ID+"/group", api.MachineGroupRequest{Group: "default"}, nil); !errors.Is(err, api.ErrUnauthorized) {
		t.Errorf("machine moved itself: %v", err)
	}
	// There is no path naming another machine: only /self.
	if err := b.Do(ctx, "GET", "/v1/machines/"+before.ID, nil, nil); !errors.Is(err, api.ErrBadRequest) {
		t.Errorf("machine read another: %v", err)
	}

	// Bad check-ins and health reports are refused and change nothing.
	for name, body := range map[string][]byte{
		"malformed":     []byte(`{"kernel_release": `),
		"unknown field": []byte(`{"kernel_release":"x","admin":true}`),
		"huge":          append([]byte(`{"kernel_release":"`), bytes.Repeat([]byte("a"), 1<<20)...),
		"bad build-id":  []byte(`{"kernel_release":"6.1","kernel_build_id":"XYZ"}`),
		"bad target":    []byte(`{"kernel_release":"6.1","kernel_build_id":"abcdef01","patches":[{"target":"../x","name":"a","state":"applied"}]}`),
		"duplicate": []byte(`{"kernel_release":"6.1","kernel_build_id":"abcdef01","patches":[` +
			`{"target":"6.1/a-0123456789abcdef.stitch","name":"a","state":"applied"},{"target":"6.1/a-0123456789abcdef.stitch","name":"a","state":"failed"}]}`),
	} {
		if c := e.call(t, "POST", api.PathCheckIn, a.Token, body, nil); c != 400 && c != 413 {
			t.Errorf("check-in %s: %d", name, c)
		}
	}
	for name, tc := range map[string]struct {
		h    api.Health
		code int
	}{
		"unknown target": {api.Health{Target: simRelease + "/stitch_x-0123456789abcdef.stitch", Name: "stitch_x", Check: contract.CheckApply, Healthy: true}, 404},
		"other kernel":   {api.Health{Target: other, Name: "stitch_other", Check: contract.CheckApply, Reason: contract.ReasonOops}, 409},
		"wrong name":     {api.Health{Target: other, Name: "stitch_x", Check: contract.CheckApply, Healthy: true}, 409},
		"no reason":      {api.Health{Target: other, Name: "stitch_other", Check: contract.CheckApply}, 400},
		"bad check":      {api.Health{Target: other, Name: "stitch_other", Check: "2m", Healthy: true}, 400},
	} {
		var se *api.StatusError
		if err := a.Health(ctx, tc.h); !errors.As(err, &se) || se.Code != tc.code {
			t.Errorf("health %s: %v, want %d", name, err, tc.code)
		}
	}
	if after, _ := a.Self(ctx); after.KernelBuildID != before.KernelBuildID || !after.LastCheckIn.Equal(before.LastCheckIn) {
		t.Errorf("refused requests changed the machine: %+v", after)
	}
	if rms, _ := e.st.RolloutMachines(ctx, other); len(rms) != 0 {
		t.Errorf("a machine on another kernel entered the rollout: %+v", rms)
	}

	// Admin input.
	for name, tc := range map[string]struct {
		method, path string
		body         any
		code         int
	}{
		"bad target":        {"POST", "/v1/admin/patches", api.PatchRequest{Target: "../x"}, 400},
		"unknown name":      {"POST", "/v1/admin/patches", api.PatchRequest{Target: "stitch_x"}, 404},
		"unpublished":       {"POST", "/v1/admin/patches", api.PatchRequest{Target: simRelease + "/stitch_x-0123456789abcdef.stitch"}, 404},
		"registered twice":  {"POST", "/v1/admin/patches", api.PatchRequest{Target: other}, 409},
		"unknown rollout":   {"POST", "/v1/admin/rollouts/" + simRelease + "/stitch_x-0123456789abcdef.stitch/halt", api.RolloutRequest{}, 404},
		"unknown operation": {"POST", "/v1/admin/rollouts/" + other + "/explode", api.RolloutRequest{}, 404},
		"resume running":    {"POST", "/v1/admin/rollouts/" + other + "/resume", api.RolloutRequest{}, 409},
		"group no channel":  {"PUT", "/v1/admin/groups/web", api.Group{Channel: "nope"}, 400},
		"bad channel name":  {"PUT", "/v1/admin/channels/Bad", api.Channel{}, 400},
		"negative delay":    {"PUT", "/v1/admin/channels/slow", api.Channel{DelaySeconds: -1}, 400},
		"unknown machine":   {"PUT", "/v1/admin/machines/m-nope/group", api.MachineGroupRequest{Group: "default"}, 404},
		"unknown group":     {"PUT", "/v1/admin/machines/" + before.ID + "/group", api.MachineGroupRequest{Group: "nope"}, 404},
		"key unknown group": {"POST", "/v1/admin/keys", api.KeyRequest{Group: "nope"}, 400},
	} {
		var se *api.StatusError
		if err := admin.Do(ctx, tc.method, tc.path, tc.body, nil); !errors.As(err, &se) || se.Code != tc.code {
			t.Errorf("%s: %v, want %d", name, err, tc.code)
		}
	}
	var reps []api.PatchReport
	admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &reps)
	if len(reps) != 1 || reps[0].State != "running" {
		t.Errorf("refused admin requests changed the rollout: %+v", reps)
	}
}

func TestChannelsDelayCutoffAndPin(t *testing.T) {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	e := newEnv(t, func(s *Server) { s.Now, s.Policy = clk.Now, onePolicy })
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	t0 := clk.Now()
	for _, g := range []api.Group{{Name: "canaries", Channel: "canary"}, {Name: "pinned", Channel: "canary", Pin: t0.Add(-time.Hour)}, {Name: "slow", Channel: "stable"}} {
		if err := admin.Do(ctx, "PUT", "/v1/admin/groups/"+g.Name, g, nil); err != nil {
			t.Fatal(err)
		}
	}
	canary, main, pinned, slow := e.enroll(t, 1, "canaries")[0], e.enroll(t, 1, "")[0], e.enroll(t, 1, "pinned")[0], e.enroll(t, 1, "slow")[0]
	target := publish(t, e.repo, "stitch_fix", simBuildID, "CVE-2026-3000")
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	offered := func(c *api.Client) bool { return len(checkIn(t, c)) == 1 }
	if !offered(canary) || offered(main) || offered(pinned) || offered(slow) {
		t.Fatal("at once: only the canary channel (no delay) may get the patch")
	}
	// The report says why the others are not pending: main and
	// stable wait for their delays (main's is first, a day on), the
	// pinned group never gets it.
	var reps []api.PatchReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &reps); err != nil {
		t.Fatal(err)
	}
	if r := reps[0]; r.Pending != 1 || r.Waiting != 2 || !r.WaitingUntil.Equal(t0.Add(24*time.Hour)) || r.Held != 1 {
		t.Errorf("report: pending %d, waiting %d until %v, held %d; want 1 (the canary), 2 until %v, 1", r.Pending, r.Waiting, r.WaitingUntil, r.Held, t0.Add(24*time.Hour))
	}
	clk.Add(25 * time.Hour)
	if !offered(main) || offered(pinned) || offered(slow) {
		t.Fatal("after a day: main (1 day delay) gets it; the pinned group and stable (7 days) do not")
	}
	// A cutoff before the patch's registration holds stable back for good.
	if err := admin.Do(ctx, "PUT", "/v1/admin/channels/stable", api.Channel{DelaySeconds: 7 * 86400, Cutoff: t0.Add(-time.Minute)}, nil); err != nil {
		t.Fatal(err)
	}
	clk.Add(8 * 24 * time.Hour)
	if offered(slow) {
		t.Fatal("stable got a patch registered after its cutoff")
	}
	// Moving the machine to the canary group makes it eligible.
	self, _ := slow.Self(ctx)
	if err := admin.Do(ctx, "PUT", "/v1/admin/machines/"+self.ID+"/group", api.MachineGroupRequest{Group: "canaries"}, nil); err != nil {
		t.Fatal(err)
	}
	if !offered(slow) {
		t.Fatal("a machine moved to the canary group was not offered the patch")
	}
}

func TestOperatorHaltResumeBlocklist(t *testing.T) {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	e := newEnv(t, func(s *Server) { s.Now, s.Policy = clk.Now, onePolicy })
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	ms := e.enroll(t, 2, "")
	admin.Do(ctx, "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil)
	target := publish(t, e.repo, "stitch_fix", simBuildID, "CVE-2026-4242")
	// The patch is named by its NAME alone, by RELEASE/NAME, or whole.
	var reg api.PatchReport
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: "stitch_fix"}, &reg); err != nil || reg.Target != target {
		t.Fatalf("register stitch_fix: %v, %s; want %s", err, reg.Target, target)
	}
	names := map[string]string{"halt": "stitch_fix", "resume": simRelease + "/stitch_fix", "blocklist": target}
	op := func(name string) {
		t.Helper()
		if err := admin.Do(ctx, "POST", "/v1/admin/rollouts/"+names[name]+"/"+name, api.RolloutRequest{Reason: "test"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Names that fit no target, or several, are refused with the reason.
	publish(t, e.repo, "stitch_fix", "ab"+simBuildID[2:]) // another build: two targets named stitch_fix
	for _, c := range []struct {
		method, path string
		body         any
		code         int
		want         string
	}{
		{"POST", "/v1/admin/patches", api.PatchRequest{Target: "stitch_fix"}, http.StatusConflict, "names 2 targets"},
		{"POST", "/v1/admin/patches", api.PatchRequest{Target: "stitch_nope"}, http.StatusNotFound, "no target published"},
		{"POST", "/v1/admin/rollouts/stitch_nope/halt", api.RolloutRequest{}, http.StatusNotFound, "no target registered"},
	} {
		err := admin.Do(ctx, c.method, c.path, c.body, nil)
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code != c.code || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s %s %+v: %v; want %d, %q", c.method, c.path, c.body, err, c.code, c.want)
		}
	}
	if acts := checkIn(t, ms[0]); len(acts) != 1 || acts[0].Op != api.OpApply {
		t.Fatalf("actions %+v", acts)
	}
	if err := ms[0].Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.CheckApply, Healthy: true}); err != nil {
		t.Fatal(err)
	}
	held := api.PatchState{Target: target, Name: "stitch_fix", State: contract.StateApplied, Since: clk.Now()}
	op("halt")
	if acts := checkIn(t, ms[1]); len(acts) != 0 {
		t.Fatalf("halted rollout offered: %+v", acts)
	}
	if acts := checkIn(t, ms[0], held); len(acts) != 0 {
		t.Fatalf("halted rollout: a machine that has it must keep it: %+v", acts)
	}
	op("resume")
	if acts := checkIn(t, ms[1]); len(acts) != 1 {
		t.Fatalf("resumed rollout not offered: %+v", acts)
	}
	op("blocklist")
	if acts := checkIn(t, ms[0], held); len(acts) != 1 || acts[0].Op != api.OpRevert {
		t.Fatalf("blocklisted: the machine that applied it must revert: %+v", acts)
	}
	if acts := checkIn(t, ms[1]); len(acts) != 0 {
		t.Fatalf("blocklisted patch offered: %+v", acts)
	}
	// The machines report and the CVE report agree after a blocklist:
	// nothing is missing, and the machines are exposed to its CVE.
	var reps []api.MachineReport
	var cves []api.CVEReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/machines", nil, &reps); err != nil {
		t.Fatal(err)
	}
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/cves", nil, &cves); err != nil {
		t.Fatal(err)
	}
	exposed := 0
	for _, r := range reps {
		if len(r.Missing) != 0 {
			t.Errorf("machine %s misses %v after the blocklist", r.ID, r.Missing)
		}
		exposed += len(r.ExposedCVEs)
	}
	if len(cves) != 1 || exposed != len(cves[0].Exposed) || exposed == 0 {
		t.Errorf("after the blocklist: machines report %d exposures, CVE report %+v", exposed, cves)
	}
}

// A free-tier fleet of 3 machines: the 1% and 10% stages usually hold
// nobody, and the rollout must still reach all three, one stage per
// check-in interval, and complete once they passed their checks; and it
// can still be blocklisted after that.
func TestSmallFleetIsNotStuck(t *testing.T) {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	e := newEnv(t, func(s *Server) { s.Now = clk.Now })
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	admin.Do(ctx, "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil)
	ms := e.enroll(t, 3, "")
	target := publish(t, e.repo, "stitch_fix", simBuildID)
	admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil)
	held := map[int]time.Time{}
	for hour := 0; hour < 12; hour++ {
		for i, c := range ms {
			if since, ok := held[i]; ok {
				checkIn(t, c, api.PatchState{Target: target, Name: "stitch_fix", State: contract.StateApplied, Since: since})
				if err := c.Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.DefaultSchedule[2].Name, Healthy: true}); err != nil {
					t.Fatal(err)
				}
			} else if acts := checkIn(t, c); len(acts) == 1 {
				held[i] = clk.Now()
				c.Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.CheckApply, Healthy: true})
			}
		}
		clk.Add(30 * time.Minute)
		e.s.Tick(ctx)
		clk.Add(30 * time.Minute)
		e.s.Tick(ctx)
	}
	var reps []api.PatchReport
	admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &reps)
	if len(held) != 3 || reps[0].State != "complete" || reps[0].Healthy != 3 {
		t.Fatalf("%d of 3 machines got the patch; rollout %+v", len(held), reps[0])
	}
	// Three machines on one free-tier key count for two failures: when all
	// three oops a day later, the complete rollout is neither halted nor
	// blocklisted by them (issue 12, finding 1); the report shows the
	// failures, and the operator's blocklist has everyone revert.
	clk.Add(24 * time.Hour)
	for _, c := range ms {
		for range 2 { // a failure counts once per machine
			if err := c.Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.CheckBoot, Reason: contract.ReasonOops}); err != nil {
				t.Fatal(err)
			}
		}
	}
	clk.Add(2 * time.Hour)
	e.s.Tick(ctx)
	admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &reps)
	if reps[0].State != "complete" || reps[0].Failed != 3 || reps[0].Counted != 2 {
		t.Fatalf("three machines of one free-tier key stopped the rollout: %+v", reps[0])
	}
	held0 := api.PatchState{Target: target, Name: "stitch_fix", State: contract.StateApplied, Since: held[0]}
	if acts := checkIn(t, ms[0], held0); len(acts) != 0 {
		t.Fatalf("revert ordered without a blocklist: %+v", acts)
	}
	if err := admin.Do(ctx, "POST", "/v1/admin/rollouts/"+target+"/blocklist", api.RolloutRequest{Reason: "three oops"}, nil); err != nil {
		t.Fatal(err)
	}
	if acts := checkIn(t, ms[0], held0); len(acts) != 1 || acts[0].Op != api.OpRevert {
		t.Fatalf("after the operator's blocklist: %+v, want a revert order", acts)
	}
}

// A channel with a deploy delay replays the rollout's stages that much
// later: a day after the canary channel reached a stage, the main channel
// reaches it too, not everything at once.
func TestDelayedChannelFollowsTheStages(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	now := t0
	s := &Server{Now: func() time.Time { return now }}
	p := store.Patch{Target: simRelease + "/stitch_fix-0123456789abcdef.stitch", KernelRelease: simRelease, KernelBuildID: simBuildID,
		RegisteredAt: t0, State: string(rollout.Running), Stage: 3,
		StageStarted: []time.Time{t0, t0.Add(time.Hour), t0.Add(2 * time.Hour), t0.Add(3 * time.Hour)}}
	machine := func(lo, hi float64) store.Machine {
		for i := 0; ; i++ {
			id := fmt.Sprintf("m-%d", i)
			if r := rollout.Rank(p.Target, id); r >= lo && r < hi {
				return store.Machine{ID: id, KernelRelease: simRelease, KernelBuildID: simBuildID, Delay: 24 * time.Hour}
			}
		}
	}
	first, second, last := machine(0, 0.01), machine(0.01, 0.10), machine(0.5, 1)
	now = t0.Add(4 * time.Hour) // the canary channel is at 100%
	if s.offered(p, first) {
		t.Fatal("offered before the channel's delay")
	}
	now = t0.Add(24*time.Hour + 30*time.Minute)
	if !s.offered(p, first) || s.offered(p, second) || s.offered(p, last) {
		t.Fatal("a day later the main channel must be at the first stage only")
	}
	now = t0.Add(25*time.Hour + time.Minute)
	if !s.offered(p, second) || s.offered(p, last) {
		t.Fatal("a day and an hour later the main channel must be at the second stage")
	}
	now = t0.Add(27 * time.Hour)
	if !s.offered(p, last) {
		t.Fatal("a day and three hours later the main channel must be at 100%")
	}
}
