package store

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"
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
			c, err := tx.Counts(3)
			if err != nil || c != (RolloutCounts{Machines: 1, Failed: 1, Unfinished: 0}) {
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
