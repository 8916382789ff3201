package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/server/rollout"
)

// both runs a test on a fresh SQLite store and on the test PostgreSQL.
func both(t *testing.T, f func(t *testing.T, s *SQL)) {
	t.Run("sqlite", func(t *testing.T) {
		s, err := OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "fleet.db"))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		f(t, s)
	})
	t.Run("postgres", func(t *testing.T) {
		s := openPostgres(t)
		defer s.Close()
		f(t, s)
	})
}

func TestFleetCheckInsAndRollout(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.PutChannel(ctx, Channel{Name: "fast", Delay: time.Hour}); err != nil {
			t.Fatal(err)
		}
		if err := s.PutGroup(ctx, Group{Name: "web", Channel: "fast", Pin: now.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		if err := s.PutGroup(ctx, Group{Name: "x", Channel: "nope"}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("group on an unknown channel: %v", err)
		}
		if err := s.CreateKey(ctx, Key{ID: "k0", SecretHash: "h0", MaxMachines: 10, CreatedAt: now, Group: "nope"}); !errors.Is(err, ErrUnknownGroup) {
			t.Fatalf("key for an unknown group: %v", err)
		}
		if err := s.CreateKey(ctx, Key{ID: "k", SecretHash: "h", MaxMachines: 10, CreatedAt: now, Group: "web"}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Enroll(ctx, "h", Machine{ID: "m1", TokenHash: "t1", Hostname: "a"}, now); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Enroll(ctx, "h", Machine{ID: "m2", TokenHash: "t2", Hostname: "b", Group: "nope"}, now); !errors.Is(err, ErrGroupMismatch) {
			t.Fatalf("enroll into another group than the key's: %v", err)
		}
		ci := CheckIn{KernelRelease: "6.1.0", KernelBuildID: "abcdef01", AgentVersion: "1",
			Patches: []MachinePatch{{Target: "6.1.0/a-0123456789abcdef.stitch", Name: "a", State: "applied", Since: now}}}
		if err := s.CheckIn(ctx, "m1", ci, now); err != nil {
			t.Fatal(err)
		}
		if err := s.CheckIn(ctx, "m9", ci, now); !errors.Is(err, ErrNotFound) {
			t.Fatalf("unknown machine: %v", err)
		}
		m, err := s.MachineByToken(ctx, "t1")
		if err != nil || m.Group != "web" || m.Channel != "fast" || m.Delay != time.Hour || !m.Pin.Equal(now.Add(time.Hour)) || m.KernelBuildID != "abcdef01" || !m.LastCheckIn.Equal(now) {
			t.Fatalf("machine: %+v %v", m, err)
		}
		ci.Patches = nil
		s.CheckIn(ctx, "m1", ci, now)
		if ps, _ := s.MachinePatches(ctx, "m1"); len(ps) != 0 {
			t.Fatalf("a check-in did not replace the patches: %+v", ps)
		}

		p := Patch{Target: "6.1.0/a-0123456789abcdef.stitch", Name: "a", KernelRelease: "6.1.0", KernelBuildID: "abcdef01",
			CVEs: []string{"CVE-2024-1", "CVE-2024-2"}, RegisteredAt: now, UpdatedAt: now, State: "running", StageStarted: []time.Time{now}}
		if err := s.RegisterPatch(ctx, p); err != nil {
			t.Fatal(err)
		}
		if err := s.RegisterPatch(ctx, p); !errors.Is(err, ErrExists) {
			t.Fatalf("second registration: %v", err)
		}
		if ps, _ := s.PatchesForKernel(ctx, "6.1.0", "abcdef01"); len(ps) != 1 || len(ps[0].CVEs) != 2 {
			t.Fatalf("patches for kernel: %+v", ps)
		}
		err = s.Rollout(ctx, p.Target, func(tx RolloutTx, p *Patch) error {
			if err := tx.PutMachine(RolloutMachine{MachineID: "m1", AppliedAt: now, Checks: 3}); err != nil {
				return err
			}
			if err := tx.PutMachine(RolloutMachine{MachineID: "m1", AppliedAt: now, Checks: 1, Failed: true, Reason: "oops"}); err != nil {
				return err
			}
			c, err := tx.Counts(3, now)
			if err != nil || len(c) != 1 || c[0] != (rollout.KeyCounts{Key: "k", Failed: 1}) {
				t.Errorf("counts %+v %v", c, err)
			}
			p.State, p.Stage = "blocklisted", 2
			p.StageStarted = append(p.StageStarted, now.Add(time.Hour), now.Add(2*time.Hour))
			return tx.PutHealth(HealthReport{Target: p.Target, MachineID: "m1", Check: "1m", Reason: "oops", At: now})
		})
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := s.Patch(ctx, p.Target); got.State != "blocklisted" || got.Stage != 2 || len(got.StageStarted) != 3 || !got.StageStarted[2].Equal(now.Add(2*time.Hour)) {
			t.Fatalf("rollout not written back: %+v", got)
		}
		// A failing fn changes nothing.
		s.Rollout(ctx, p.Target, func(tx RolloutTx, p *Patch) error {
			p.State = "running"
			tx.PutMachine(RolloutMachine{MachineID: "m1"})
			return errors.New("no")
		})
		if got, _ := s.Patch(ctx, p.Target); got.State != "blocklisted" {
			t.Fatalf("failed rollout fn changed the patch: %+v", got)
		}
		if rm, _ := s.RolloutMachines(ctx, p.Target); len(rm) != 1 || !rm[0].Failed {
			t.Fatalf("rollout machines: %+v", rm)
		}
		if err := s.SetMachineGroup(ctx, "m1", DefaultGroup); err != nil {
			t.Fatal(err)
		}
		if err := s.SetMachineGroup(ctx, "m1", "nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("unknown group: %v", err)
		}
	})
}

// A rollout's counts come by enrollment key, each machine in one class:
// failed, healthy, unfinished while heard from (a check-in or a report on
// the patch) since the silence limit, lost when silent longer; offers are
// recorded once; the tolerated failures are kept with the patch.
func TestRolloutCountsByKeyAndOffers(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		for _, k := range []string{"free", "fleet"} {
			if err := s.CreateKey(ctx, Key{ID: k, SecretHash: "h-" + k, MaxMachines: 10, CreatedAt: t0}); err != nil {
				t.Fatal(err)
			}
		}
		// machine → key, last check-in, checks, failed, last report
		type row struct {
			key            string
			checkin        time.Time
			checks         int
			failed         bool
			report, offers time.Time
		}
		cut := t0.Add(2 * time.Hour) // silent before this: lost
		rows := map[string]row{
			"f1": {"free", t0, 0, true, t0, t0},                                      // failed
			"f2": {"free", t0, 3, true, t0, t0},                                      // failed after passing: still failed, once
			"f3": {"free", cut, 1, false, t0, t0},                                    // unfinished: checked in at the limit
			"h1": {"fleet", t0, 3, false, t0, t0},                                    // healthy, silent or not
			"u1": {"fleet", t0, 2, false, cut.Add(time.Minute), t0},                  // unfinished: reported lately
			"l1": {"fleet", t0, 1, false, cut.Add(-time.Second), t0},                 // lost: silent since before the limit
			"l2": {"fleet", cut.Add(-time.Minute), 0, false, t0, cut.Add(time.Hour)}, // lost: an offer is not a sign of life
		}
		p := Patch{Target: "6.1.0/a-0123456789abcdef.stitch", Name: "a", KernelRelease: "6.1.0", KernelBuildID: "abcdef01", RegisteredAt: t0, UpdatedAt: t0, State: "running"}
		if err := s.RegisterPatch(ctx, p); err != nil {
			t.Fatal(err)
		}
		for id, r := range rows {
			if _, err := s.Enroll(ctx, "h-"+r.key, Machine{ID: id, TokenHash: "t-" + id, Hostname: id}, t0); err != nil {
				t.Fatal(err)
			}
			if err := s.CheckIn(ctx, id, CheckIn{KernelRelease: "6.1.0", KernelBuildID: "abcdef01"}, r.checkin); err != nil {
				t.Fatal(err)
			}
			if err := s.RecordOffers(ctx, id, []string{p.Target}, r.offers); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.RecordOffers(ctx, "f1", []string{p.Target}, t0.Add(time.Hour)); err != nil {
			t.Fatalf("offered twice: %v", err)
		}
		err := s.Rollout(ctx, p.Target, func(tx RolloutTx, p *Patch) error {
			for id, r := range rows {
				if ok, err := tx.Offered(id); err != nil || !ok {
					t.Errorf("%s: offered %v %v", id, ok, err)
				}
				if err := tx.PutMachine(RolloutMachine{MachineID: id, AppliedAt: t0, Checks: r.checks, Failed: r.failed, LastReport: r.report}); err != nil {
					return err
				}
			}
			if ok, err := tx.Offered("nobody"); err != nil || ok {
				t.Errorf("a machine never offered: %v %v", ok, err)
			}
			c, err := tx.Counts(3, cut)
			want := []rollout.KeyCounts{{Key: "fleet", Healthy: 1, Unfinished: 1, Lost: 2}, {Key: "free", Failed: 2, Unfinished: 1}}
			if err != nil || fmt.Sprint(c) != fmt.Sprint(want) {
				t.Errorf("counts %+v %v, want %+v", c, err, want)
			}
			p.Tolerated = 2
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := s.Patch(ctx, p.Target); err != nil || got.Tolerated != 2 {
			t.Fatalf("tolerated not kept: %+v %v", got, err)
		}
		c, err := s.RolloutCounts(ctx, p.Target, 3, cut.Add(-time.Hour))
		if want := []rollout.KeyCounts{{Key: "fleet", Healthy: 1, Unfinished: 3}, {Key: "free", Failed: 2, Unfinished: 1}}; err != nil || fmt.Sprint(c) != fmt.Sprint(want) {
			t.Errorf("counts an hour earlier %+v %v, want %+v", c, err, want)
		}
		rms, err := s.RolloutMachines(ctx, p.Target)
		if err != nil || len(rms) != len(rows) || !rms[0].LastReport.Equal(rows[rms[0].MachineID].report) {
			t.Fatalf("rollout machines %+v %v", rms, err)
		}
		if c, err := s.RolloutCounts(ctx, "6.1.0/none-0123456789abcdef.stitch", 3, cut); err != nil || len(c) != 0 {
			t.Errorf("counts of an unknown patch: %+v %v", c, err)
		}
		if err := s.RecordOffers(ctx, "nobody", []string{p.Target}, t0); err == nil {
			t.Error("an offer to an unknown machine was recorded")
		}
	})
}

// Replicas starting together on one PostgreSQL database must not apply a
// migration twice: the advisory lock makes them take turns.
func TestConcurrentMigrationsPostgres(t *testing.T) {
	openPostgres(t).Close()
	ctx := context.Background()
	s, _ := OpenPostgres(ctx, postgresDSN(t))
	if err := s.dropAll(ctx); err != nil {
		t.Fatal(err)
	}
	s.Close()
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := OpenPostgres(ctx, postgresDSN(t))
			if err == nil {
				s.Close()
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("replica %d: %v", i, err)
		}
	}
}

// A database from before migration 0004 keeps its rollouts going: a
// machine already in a rollout counts as offered the patch, and its
// apply as its latest report.
func TestMigrationKeepsRolloutsOfBefore(t *testing.T) {
	ctx := context.Background()
	test := func(t *testing.T, s *SQL, reopen func() *SQL) {
		// Back to the schema of migration 0003, then a rollout in it.
		for _, q := range []string{`DROP TABLE patch_offers`, `ALTER TABLE rollout_machines DROP COLUMN last_report`, `ALTER TABLE patches DROP COLUMN tolerated`,
			`DELETE FROM schema_migrations WHERE version = 'migrations/0004_rollout_trust.sql'`} {
			if _, err := s.db.ExecContext(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		for _, q := range []string{
			`INSERT INTO enrollment_keys (id, secret_hash, max_machines, created_at) VALUES ('k', 'h', 3, 1)`,
			`INSERT INTO machines (id, key_id, token_hash, hostname, enrolled_at) VALUES ('m1', 'k', 't', 'a', 1)`,
			`INSERT INTO patches (target, name, kernel_release, kernel_build_id, registered_at, state, updated_at) VALUES ('6.1/a-0123456789abcdef.stitch', 'a', '6.1', 'ab', 1, 'running', 1)`,
			fmt.Sprintf(`INSERT INTO rollout_machines (target, machine_id, applied_at, checks) VALUES ('6.1/a-0123456789abcdef.stitch', 'm1', %d, 1)`, t0.Unix()),
		} {
			if _, err := s.db.ExecContext(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		s.Close()
		s = reopen()
		defer s.Close()
		err := s.Rollout(ctx, "6.1/a-0123456789abcdef.stitch", func(tx RolloutTx, p *Patch) error {
			ok, err := tx.Offered("m1")
			m, _, merr := tx.Machine("m1")
			if err != nil || merr != nil || !ok || !m.LastReport.Equal(t0) || p.Tolerated != 0 {
				t.Errorf("after migrating: offered %v %v, machine %+v %v, patch %+v", ok, err, m, merr, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Run("sqlite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "fleet.db")
		open := func() *SQL {
			s, err := OpenSQLite(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		test(t, open(), open)
	})
	t.Run("postgres", func(t *testing.T) {
		test(t, openPostgres(t), func() *SQL {
			s, err := OpenPostgres(ctx, postgresDSN(t))
			if err != nil {
				t.Fatal(err)
			}
			return s
		})
	})
}

// FleetMachines carries what Machines has in the fields fleet-wide
// figures use, the group's channel rules included, and AppliedTargets
// only what machines report applied.
func TestFleetMachinesAndAppliedTargets(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		must(s.PutChannel(ctx, Channel{Name: "slow", Delay: 48 * time.Hour, Cutoff: now.Add(-time.Hour)}))
		must(s.PutGroup(ctx, Group{Name: "db", Channel: "slow", Pin: now.Add(-2 * time.Hour)}))
		must(s.CreateKey(ctx, Key{ID: "k1", SecretHash: "h1", MaxMachines: 10, CreatedAt: now, Group: "db"}))
		must(s.CreateKey(ctx, Key{ID: "k2", SecretHash: "h2", MaxMachines: 10, CreatedAt: now}))
		for i, key := range []string{"h1", "h1", "h2"} {
			_, err := s.Enroll(ctx, key, Machine{ID: fmt.Sprintf("m%d", i), TokenHash: fmt.Sprintf("t%d", i), Hostname: "host"}, now)
			must(err)
		}
		must(s.CheckIn(ctx, "m0", CheckIn{KernelRelease: "6.1.0", KernelBuildID: "ab", Patches: []MachinePatch{
			{Target: "a", Name: "a", State: "applied", Since: now}, {Target: "b", Name: "b", State: "failed", Since: now}}}, now))
		must(s.CheckIn(ctx, "m2", CheckIn{KernelRelease: "6.12.0", KernelBuildID: "cd", Unsupported: "no livepatch", Patches: []MachinePatch{
			{Target: "c", Name: "c", State: "applied", Since: now}}}, now.Add(time.Minute)))

		full, err := s.Machines(ctx)
		must(err)
		lean, err := s.FleetMachines(ctx)
		must(err)
		if len(full) != 3 || len(lean) != len(full) {
			t.Fatalf("Machines has %d, FleetMachines %d, want 3", len(full), len(lean))
		}
		slices.SortFunc(lean, func(a, b Machine) int { return strings.Compare(a.ID, b.ID) }) // in no order
		for i, m := range full {
			want := Machine{ID: m.ID, Group: m.Group, KernelRelease: m.KernelRelease, KernelBuildID: m.KernelBuildID, Unsupported: m.Unsupported,
				LastCheckIn: m.LastCheckIn, Channel: m.Channel, Delay: m.Delay, Cutoff: m.Cutoff, Pin: m.Pin}
			if lean[i] != want {
				t.Errorf("FleetMachines[%d] = %+v, want %+v", i, lean[i], want)
			}
		}
		if m := lean[0]; m.Channel != "slow" || m.Delay != 48*time.Hour || !m.Cutoff.Equal(now.Add(-time.Hour)) || !m.Pin.Equal(now.Add(-2*time.Hour)) {
			t.Errorf("m0's rules = %+v, want channel slow's and group db's", m)
		}
		applied, err := s.AppliedTargets(ctx)
		must(err)
		if len(applied) != 2 || !applied["m0"]["a"] || applied["m0"]["b"] || !applied["m2"]["c"] {
			t.Errorf("AppliedTargets = %v, want m0: a, m2: c", applied)
		}
	})
}
