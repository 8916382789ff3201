package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The fixes of the levels of the tests' stream "mem", as
// internal/build/testdata/levels/stream has them: level 1 carries A,
// level 2 A and B, level 3 withdraws A and adds C.
var (
	fixA = contract.Fix{Name: "meminfo_a.patch", CVEs: []string{"CVE-2026-1001"}, Files: []string{"fs/proc/meminfo.c"}}
	fixB = contract.Fix{Name: "meminfo_b.patch", CVEs: []string{"CVE-2026-1002"}, Files: []string{"fs/proc/meminfo.c"}, Upstream: "0123456789abcdef0123456789abcdef01234567"}
	fixC = contract.Fix{Name: "binfmt_misc.patch", CVEs: []string{"CVE-2026-1003"}, Files: []string{"fs/binfmt_misc.c"}}
)

// publishLevel publishes level n of stream for the kernel (release,
// buildID), carrying fixes and withdrawing withdrawn, as stitch build
// --stream writes its manifest: replace set, the level, the level's name.
func publishLevel(t *testing.T, repo *bundle.Repo, release, buildID, stream string, n int, withdrawn []string, fixes ...contract.Fix) string {
	t.Helper()
	name := contract.LevelName(stream, n)
	m := testManifest(name, release, buildID)
	m.Replace = true
	m.Level = &contract.Level{Stream: stream, Number: n, Supersedes: n - 1, Withdrawn: withdrawn}
	for _, f := range fixes {
		sum := sha256.Sum256([]byte(f.Name + "@" + release))
		f.Hash = hex.EncodeToString(sum[:])
		m.Fixes = append(m.Fixes, f)
		for _, c := range f.CVEs {
			if !strings.Contains(strings.Join(m.CVEs, " "), c) {
				m.CVEs = append(m.CVEs, c)
			}
		}
	}
	// The ballast makes each build's module (and so its target) its own.
	var ballast strings.Builder
	for _, f := range fixes {
		ballast.WriteString(f.Name)
	}
	data, err := bundle.Pack(m, testutils.StandInModule(t, name, release, buildID+ballast.String()))
	if err != nil {
		t.Fatal(err)
	}
	target, err := repo.Publish(data)
	if err != nil {
		t.Fatal(err)
	}
	return target
}

// held is a level (or patch) as a machine reports it.
func held(target, name, state string) api.PatchState {
	return api.PatchState{Target: target, Name: name, State: state, Since: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
}

// ops sums up a check-in's orders as "op name level" strings.
func ops(acts []api.Action) []string {
	var out []string
	for _, a := range acts {
		s := a.Op + " " + a.Name
		if a.Level != nil {
			s += " " + a.Level.Stream + "/" + strconv.Itoa(a.Level.Number)
		}
		out = append(out, s)
	}
	return out
}

// TestPatchLevels: levels 1 to 3 of a stream registered and rolled out
// (each its own rollout), machines offered only the newest level with its
// Level, a blocklisted level 3 reverted and level 2 offered in its place,
// the level distribution and each level's fixes and CVEs in the reports,
// a second target for a level refused, and levels machines report without
// having been offered them not counted. On SQLite and PostgreSQL.
func TestPatchLevels(t *testing.T) {
	env := func(t *testing.T, st store.Store) *env {
		return newEnvOn(t, st, func(s *Server) { s.Policy = onePolicy })
	}
	t.Run("sqlite", func(t *testing.T) { testPatchLevels(t, newEnv(t, func(s *Server) { s.Policy = onePolicy })) })
	t.Run("postgres", func(t *testing.T) { testPatchLevels(t, env(t, postgresStore(t, "stitch_levels"))) })
}

func testPatchLevels(t *testing.T, e *env) {
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if err := admin.Do(ctx, "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	l1 := publishLevel(t, e.repo, simRelease, simBuildID, "mem", 1, nil, fixA)
	l2 := publishLevel(t, e.repo, simRelease, simBuildID, "mem", 2, nil, fixA, fixB)
	l3 := publishLevel(t, e.repo, simRelease, simBuildID, "mem", 3, []string{fixA.Name}, fixB, fixC)
	start := func(target string) api.PatchReport {
		t.Helper()
		var rep api.PatchReport
		if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, &rep); err != nil {
			t.Fatalf("register %s: %v", target, err)
		}
		return rep
	}
	if rep := start(l1); rep.Level == nil || rep.Level.Stream != "mem" || rep.Level.Number != 1 || rep.State != "running" {
		t.Fatalf("level 1 registered as %+v", rep)
	}
	ms := e.enroll(t, 4, "")
	m0, m1, m2, m3 := ms[0], ms[1], ms[2], ms[3]
	want := func(who string, acts []api.Action, orders ...string) {
		t.Helper()
		if got := ops(acts); !reflect.DeepEqual(got, orders) {
			t.Fatalf("%s: orders %q, want %q", who, got, orders)
		}
		for _, a := range acts {
			if a.Level == nil || a.Target == "" {
				t.Fatalf("%s: an order of a level without its level: %+v", who, a)
			}
		}
	}
	want("m0 on nothing, level 1 out", checkIn(t, m0), "apply mem_l1 mem/1")
	if err := m0.Health(ctx, api.Health{Target: l1, Name: "mem_l1", Check: contract.CheckApply, Healthy: true}); err != nil {
		t.Fatal(err)
	}
	want("m0 on level 1", checkIn(t, m0, held(l1, "mem_l1", contract.StateApplied)))

	// Levels 2 and 3 out: only the newest is offered, to a machine on
	// level 1 as to one on none.
	if rep := start(l2); rep.Level.Number != 2 || rep.Level.Supersedes != 1 {
		t.Fatalf("level 2 registered as %+v", rep.Level)
	}
	if rep := start(l3); rep.Level.Number != 3 || !reflect.DeepEqual(rep.Level.Withdrawn, []string{fixA.Name}) {
		t.Fatalf("level 3 registered as %+v", rep.Level)
	}
	want("m0 on level 1", checkIn(t, m0, held(l1, "mem_l1", contract.StateApplied)), "apply mem_l3 mem/3")
	want("m2 on nothing", checkIn(t, m2), "apply mem_l3 mem/3")
	want("m3 on nothing", checkIn(t, m3), "apply mem_l3 mem/3")
	for _, c := range []*api.Client{m0, m2} {
		if err := c.Health(ctx, api.Health{Target: l3, Name: "mem_l3", Check: contract.CheckApply, Healthy: true}); err != nil {
			t.Fatal(err)
		}
	}
	onL3 := []api.PatchState{held(l1, "mem_l1", contract.StateReverted), held(l3, "mem_l3", contract.StateApplied)}
	want("m0 on level 3", checkIn(t, m0, onL3...))
	want("m2 on level 3", checkIn(t, m2, held(l3, "mem_l3", contract.StateApplied)))
	// m3 does not take it (loading is off there): it runs no level, and
	// is offered the level again.
	want("m3 with the offer pending", checkIn(t, m3), "apply mem_l3 mem/3")

	// m1 was offered nothing but says it runs level 2: that counts
	// nowhere, and it may not report on it.
	var se *api.StatusError
	if err := m1.Health(ctx, api.Health{Target: l2, Name: "mem_l2", Check: contract.CheckApply, Reason: contract.ReasonOops}); !errors.As(err, &se) || se.Code != 409 {
		t.Fatalf("a report on a level never offered: %v, want 409", err)
	}
	// Its check-in still gets it the newest level: it says it runs 2,
	// below 3.
	want("m1 claiming level 2", checkIn(t, m1, held(l2, "mem_l2", contract.StateApplied)), "apply mem_l3 mem/3")

	// The level report: two machines run level 3, none level 1 or 2 (m1's
	// claim does not count), two run none; what each level carries.
	lv, err := admin.Levels(ctx)
	if err != nil || len(lv) != 1 || len(lv[0].Streams) != 1 {
		t.Fatalf("levels report: %+v %v", lv, err)
	}
	if k := lv[0]; k.Release != simRelease || k.BuildID != simBuildID || k.Machines != 4 || k.Streams[0].Stream != "mem" || k.Streams[0].NoLevel != 2 {
		t.Fatalf("kernel %+v", k)
	}
	type row struct {
		n, machines int
		state       string
		cves        string
		fixes       string
		withdrawn   string
	}
	rows := func() []row {
		t.Helper()
		lv, err := admin.Levels(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []row
		for _, l := range lv[0].Streams[0].Levels {
			var fixes []string
			for _, f := range l.Fixes {
				fixes = append(fixes, f.Name)
			}
			out = append(out, row{l.Number, l.Machines, l.State, strings.Join(l.CVEs, " "), strings.Join(fixes, " "), strings.Join(l.Withdrawn, " ")})
		}
		return out
	}
	if got, w := rows(), []row{
		{1, 0, "running", "CVE-2026-1001", "meminfo_a.patch", ""},
		{2, 0, "running", "CVE-2026-1001 CVE-2026-1002", "meminfo_a.patch meminfo_b.patch", ""},
		{3, 2, "running", "CVE-2026-1002 CVE-2026-1003", "meminfo_b.patch binfmt_misc.patch", "meminfo_a.patch"},
	}; !reflect.DeepEqual(got, w) {
		t.Fatalf("levels:\n got %+v\nwant %+v", got, w)
	}
	if f := lv[0].Streams[0].Levels[1].Fixes[1]; f.Upstream != fixB.Upstream || !reflect.DeepEqual(f.CVEs, fixB.CVEs) {
		t.Fatalf("level 2's fix B: %+v", f)
	}
	// Machine reports: m0 runs level 3 and misses nothing of the stream;
	// m1 (its claim not counted) misses level 3 only, not 1 and 2.
	machines := func() map[string]api.MachineReport {
		t.Helper()
		var rs []api.MachineReport
		if err := admin.Do(ctx, "GET", "/v1/admin/reports/machines", nil, &rs); err != nil {
			t.Fatal(err)
		}
		out := map[string]api.MachineReport{}
		for _, r := range rs {
			out[r.ID] = r
		}
		return out
	}
	id := func(c *api.Client) string {
		v, err := c.Self(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return v.ID
	}
	mr := machines()
	if r := mr[id(m0)]; !reflect.DeepEqual(r.Levels, []api.MachineLevel{{Stream: "mem", Number: 3, Target: l3, State: "running"}}) || len(r.Missing) != 0 || r.Level != 3 {
		t.Fatalf("m0's report: levels %+v, missing %v, level %d (want 3, as its status says)", r.Levels, r.Missing, r.Level)
	}
	if r := mr[id(m1)]; len(r.Levels) != 0 || !reflect.DeepEqual(r.Missing, []string{l3}) || r.Level != len(r.Applied) {
		t.Fatalf("m1's report: levels %+v, missing %v, level %d with %d applied", r.Levels, r.Missing, r.Level, len(r.Applied))
	}

	// A second build of level 3 is refused, naming the first; the level
	// of another kernel is not the same level.
	again := publishLevel(t, e.repo, simRelease, simBuildID, "mem", 3, []string{fixA.Name}, fixC)
	var refusal api.Error
	if c := e.call(t, "POST", "/v1/admin/patches", e.admin, js(api.PatchRequest{Target: again}), &refusal); c != 400 || !strings.Contains(refusal.Error, l3) || !strings.Contains(refusal.Error, "--level 4") {
		t.Fatalf("a second level 3: %d %q", c, refusal.Error)
	}
	otherKernel := publishLevel(t, e.repo, "6.1.0-57-amd64", "5757575757575757575757575757575757575757", "mem", 3, []string{fixA.Name}, fixB, fixC)
	start(otherKernel)
	var reps []api.PatchReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &reps); err != nil || len(reps) != 4 {
		t.Fatalf("%d rollouts (%v), want 4: one per kernel and level", len(reps), err)
	}
	// Pending: m1 and m3 are offered level 3, not the older levels.
	pending := map[string]int{}
	for _, r := range reps {
		pending[r.Target] = r.Pending
	}
	if pending[l1] != 0 || pending[l2] != 0 || pending[l3] != 2 {
		t.Fatalf("pending %v, want level 3's two only", pending)
	}

	// Level 3 blocklisted: its machines revert it and are offered level 2
	// (never offered to them before: it reaches them), not level 1; a
	// machine on no level is offered level 2 only.
	if err := admin.Do(ctx, "POST", "/v1/admin/rollouts/"+l3+"/blocklist", api.RolloutRequest{Reason: "test"}, nil); err != nil {
		t.Fatal(err)
	}
	want("m0 on blocklisted level 3", checkIn(t, m0, onL3...), "revert mem_l3 mem/3", "apply mem_l2 mem/2")
	want("m2 on blocklisted level 3", checkIn(t, m2, held(l3, "mem_l3", contract.StateApplied)), "revert mem_l3 mem/3", "apply mem_l2 mem/2")
	want("m3 on nothing", checkIn(t, m3), "apply mem_l2 mem/2")
	// m0 falls back to level 2 (loaded in place: 3 is gone); m2 reverted
	// 3 but runs nothing yet: it is offered level 2 still.
	onL2 := []api.PatchState{held(l1, "mem_l1", contract.StateReverted), held(l2, "mem_l2", contract.StateApplied), held(l3, "mem_l3", contract.StateReverted)}
	want("m0 on level 2", checkIn(t, m0, onL2...))
	want("m2 after reverting 3", checkIn(t, m2, held(l3, "mem_l3", contract.StateReverted)), "apply mem_l2 mem/2")
	if got := rows(); got[1].machines != 1 || got[2].machines != 0 || got[2].state != "blocklisted" {
		t.Fatalf("after the fallback: %+v", got)
	}
	if r := machines()[id(m0)]; !reflect.DeepEqual(r.Levels, []api.MachineLevel{{Stream: "mem", Number: 2, Target: l2, State: "running"}}) || len(r.Missing) != 0 {
		t.Fatalf("m0 on level 2: levels %+v, missing %v", r.Levels, r.Missing)
	}
	// A machine that failed level 2 is sent back further, to level 1.
	want("m2 that failed level 2", checkIn(t, m2, held(l3, "mem_l3", contract.StateReverted), held(l2, "mem_l2", contract.StateFailed)), "apply mem_l1 mem/1")
}

// levelOrders over a stream of four levels, as pure logic: the newest
// level that reaches the machine, the fallback from a blocklisted level
// (to one the rollout has not reached yet but the machine was offered
// before, past a blocklisted and a halted one), never a flood of old
// levels.
func TestLevelOrders(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	s := &Server{Now: func() time.Time { return t0.Add(time.Hour) }, Policy: rollout.Policy{Stages: []float64{0.5, 1}, Checks: []time.Duration{time.Minute}}}
	m := store.Machine{ID: "m-1", KernelRelease: simRelease, KernelBuildID: simBuildID}
	level := func(n int, state string, stage int) store.Patch {
		target := simRelease + "/mem_l" + string(rune('0'+n)) + "-0123456789abcdef.stitch"
		return store.Patch{Target: target, Name: contract.LevelName("mem", n), KernelRelease: simRelease, KernelBuildID: simBuildID,
			RegisteredAt: t0, State: state, Stage: stage, StageStarted: []time.Time{t0, t0}[:stage+1], Level: &contract.Level{Stream: "mem", Number: n, Supersedes: n - 1}}
	}
	// A level whose first stage (half the machines) does not reach m.
	unreached := func(n int) store.Patch {
		for i := 0; ; i++ {
			p := level(n, "running", 0)
			p.Target = simRelease + "/mem_l" + string(rune('0'+n)) + "-" + hex.EncodeToString([]byte{byte(i), 1, 2, 3, 4, 5, 6, 7}) + ".stitch"
			if !s.offered(p, m) {
				return p
			}
		}
	}
	l1, l2, l3, l4 := level(1, "complete", 1), unreached(2), level(3, "halted", 1), level(4, "blocklisted", 1)
	levels := []store.Patch{l1, l2, l3, l4}
	for name, tc := range map[string]struct {
		reported map[string]string
		before   []string
		want     []string
	}{
		"on nothing: the newest reaching level, 1 (2 does not reach, 3 halted, 4 blocklisted)": {nil, nil, []string{"apply mem_l1"}},
		"on 1: nothing newer reaches it":                                    {map[string]string{l1.Target: contract.StateApplied}, nil, nil},
		"on blocklisted 4, offered 2 before: back to 2":                     {map[string]string{l4.Target: contract.StateApplied, l2.Target: contract.StateReverted}, []string{l2.Target, l4.Target}, []string{"revert mem_l4", "apply mem_l2"}},
		"on blocklisted 4, never offered 2: back to 1":                      {map[string]string{l4.Target: contract.StateApplied}, []string{l4.Target}, []string{"revert mem_l4", "apply mem_l1"}},
		"on blocklisted 4, 1 failed, 2 unreached: reverted, no fallback":    {map[string]string{l4.Target: contract.StateApplied, l1.Target: contract.StateFailed}, []string{l1.Target, l4.Target}, []string{"revert mem_l4"}},
		"reverted 4, runs nothing, never offered 2: back to 1, once":        {map[string]string{l4.Target: contract.StateReverted}, []string{l4.Target}, []string{"apply mem_l1"}},
		"reverted blocklisted 4, runs nothing, offered 2 before: back to 2": {map[string]string{l4.Target: contract.StateReverted}, []string{l2.Target, l4.Target}, []string{"apply mem_l2"}},
		"on 2, 4 reverted: 2 is good, nothing":                              {map[string]string{l4.Target: contract.StateReverted, l2.Target: contract.StateApplied}, []string{l2.Target, l4.Target}, nil},
		"reported 1 reverted (its own choice), runs nothing: not pressed":   {map[string]string{l1.Target: contract.StateReverted}, []string{l1.Target}, nil},
	} {
		t.Run(name, func(t *testing.T) {
			acts, offers, err := s.levelOrders(levels, tc.reported, m, func() (map[string]bool, error) {
				set := map[string]bool{}
				for _, b := range tc.before {
					set[b] = true
				}
				return set, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, a := range acts {
				got = append(got, a.Op+" "+a.Name)
				if a.Op == api.OpApply && !strings.Contains(strings.Join(offers, " "), a.Target) {
					t.Errorf("offer of %s not recorded", a.Target)
				}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("orders %q, want %q", got, tc.want)
			}
		})
	}
}

// Offers stay bounded however many levels a stream has: one level to a
// machine on none, the newest; two (the newest and the fallback) and a
// revert to a machine on a blocklisted level.
func TestLevelOffersStayBounded(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	s := &Server{Now: func() time.Time { return t0.Add(time.Hour) }, Policy: onePolicy}
	m := store.Machine{ID: "m-1", KernelRelease: simRelease, KernelBuildID: simBuildID}
	var levels []store.Patch
	for n := 1; n <= 200; n++ {
		levels = append(levels, store.Patch{Target: simRelease + "/mem_l" + strconv.Itoa(n) + "-0123456789abcdef.stitch", Name: contract.LevelName("mem", n),
			KernelRelease: simRelease, KernelBuildID: simBuildID, RegisteredAt: t0, State: "complete", StageStarted: []time.Time{t0},
			Level: &contract.Level{Stream: "mem", Number: n, Supersedes: n - 1}})
	}
	none := func() (map[string]bool, error) { return nil, nil }
	acts, _, err := s.levelOrders(levels, nil, m, none)
	if err != nil || len(acts) != 1 || acts[0].Level.Number != 200 {
		t.Fatalf("on no level: %d orders (%v), want level 200 only", len(acts), err)
	}
	levels[149].State = "blocklisted"
	levels[199].State = "blocklisted"
	acts, _, err = s.levelOrders(levels, map[string]string{levels[149].Target: contract.StateApplied}, m, none)
	if got := ops(acts); err != nil || !reflect.DeepEqual(got, []string{"revert mem_l150 mem/150", "apply mem_l199 mem/199", "apply mem_l149 mem/149"}) {
		t.Fatalf("on blocklisted 150: %q (%v)", got, err)
	}
}
