package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/server/rollout"
)

// A machine joins its key's group, whatever it asks for: three machines
// on a free-tier key cannot make themselves canaries (issue 12, finding 1).
func TestEnrollGroupIsTheKeys(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.PutGroup(ctx, Group{Name: "canaries", Channel: "canary"}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateKey(ctx, Key{ID: "free", SecretHash: "h", MaxMachines: 3, CreatedAt: now}); err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			m := Machine{ID: fmt.Sprint("m", i), TokenHash: fmt.Sprint("t", i), Hostname: "h", Group: "canaries"}
			if _, err := s.Enroll(ctx, "h", m, now); !errors.Is(err, ErrGroupMismatch) {
				t.Fatalf("machine %d joined canaries on a default-group key: %v", i, err)
			}
		}
		if n, _ := s.CountMachines(ctx, "free"); n != 0 {
			t.Fatalf("%d machines enrolled by refused requests", n)
		}
		// Naming the key's own group, or none, enrolls into it.
		if _, err := s.Enroll(ctx, "h", Machine{ID: "a", TokenHash: "ta", Hostname: "h", Group: DefaultGroup}, now); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Enroll(ctx, "h", Machine{ID: "b", TokenHash: "tb", Hostname: "h"}, now); err != nil {
			t.Fatal(err)
		}
		for _, tok := range []string{"ta", "tb"} {
			if m, err := s.MachineByToken(ctx, tok); err != nil || m.Group != DefaultGroup {
				t.Fatalf("machine %+v %v, want group %s", m, err, DefaultGroup)
			}
		}
	})
}

// Keys are listed and revoked, machines deleted (their tokens and reports
// gone at once), and a host enrolling again keeps its one record
// (finding 7).
func TestRevocationAndReEnrollment(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.CreateKey(ctx, Key{ID: "k1", SecretHash: "h1", MaxMachines: 2, CreatedAt: now, ExpiresAt: now.Add(48 * time.Hour)}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateKey(ctx, Key{ID: "k2", SecretHash: "h2", MaxMachines: 5, CreatedAt: now.Add(time.Second)}); err != nil {
			t.Fatal(err)
		}
		enroll := func(secret, id, token, host string) error {
			_, err := s.Enroll(ctx, secret, Machine{ID: id, TokenHash: token, Hostname: "host-" + id, HostID: host}, now)
			return err
		}
		for _, m := range [][4]string{{"h1", "a", "ta", "host-a"}, {"h1", "b", "tb", "host-b"}, {"h2", "c", "tc", ""}, {"h2", "d", "td", ""}} {
			if err := enroll(m[0], m[1], m[2], m[3]); err != nil {
				t.Fatal(err)
			}
		}

		// Re-enrolling host-a at the key's limit: the same record, a new
		// token, no other slot; the old token is dead.
		if err := enroll("h1", "a2", "ta2", "host-a"); err != nil {
			t.Fatalf("re-enrollment at the limit: %v", err)
		}
		if _, err := s.MachineByToken(ctx, "ta"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("the replaced token still works: %v", err)
		}
		if m, err := s.MachineByToken(ctx, "ta2"); err != nil || m.ID != "a" || m.HostID != "host-a" || m.Hostname != "host-a2" {
			t.Fatalf("re-enrolled machine: %+v %v, want record a with the new hostname", m, err)
		}
		if n, _ := s.CountMachines(ctx, "k1"); n != 2 {
			t.Fatalf("%d machines on k1 after a re-enrollment, want 2", n)
		}
		if err := enroll("h1", "e", "te", "host-e"); !errors.Is(err, ErrLimit) {
			t.Fatalf("a new host past the limit: %v", err)
		}
		// Without a host id (an older agent) every enrollment is new.
		if err := enroll("h2", "c2", "tc2", ""); err != nil {
			t.Fatal(err)
		}
		if n, _ := s.CountMachines(ctx, "k2"); n != 3 {
			t.Fatalf("%d machines on k2, want 3", n)
		}

		// Machine b in a rollout, with a failure, a health report and
		// reported patches; c beside it.
		target := "6.1.0/a-0123456789abcdef.stitch"
		if err := s.RegisterPatch(ctx, Patch{Target: target, Name: "a", KernelRelease: "6.1.0", KernelBuildID: "abcdef01", RegisteredAt: now, UpdatedAt: now, State: "running"}); err != nil {
			t.Fatal(err)
		}
		if err := s.CheckIn(ctx, "b", CheckIn{KernelRelease: "6.1.0", KernelBuildID: "abcdef01", Patches: []MachinePatch{{Target: target, Name: "a", State: "failed", Since: now}}}, now); err != nil {
			t.Fatal(err)
		}
		counts := func() (c rollout.Tally) {
			if err := s.Rollout(ctx, target, func(tx RolloutTx, p *Patch) error {
				keys, err := tx.Counts(3, time.Time{})
				c = rollout.DefaultPolicy.Tally(keys)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			return c
		}
		if err := s.Rollout(ctx, target, func(tx RolloutTx, p *Patch) error {
			for _, m := range []RolloutMachine{{MachineID: "b", AppliedAt: now, Failed: true, Reason: "oops"}, {MachineID: "c", AppliedAt: now, Checks: 1}} {
				if err := tx.PutMachine(m); err != nil {
					return err
				}
				if err := tx.PutHealth(HealthReport{Target: target, MachineID: m.MachineID, Check: "1m", Healthy: !m.Failed, At: now}); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if c := counts(); c.Machines != 2 || c.Failed != 1 || c.Unfinished != 1 {
			t.Fatalf("counts before the deletion: %+v", c)
		}
		if err := s.DeleteMachine(ctx, "b"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.MachineByToken(ctx, "tb"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a deleted machine's token still works: %v", err)
		}
		if c := counts(); c.Machines != 1 || c.Failed != 0 || c.Unfinished != 1 {
			t.Fatalf("a deleted machine still counts in the rollout: %+v", c)
		}
		if ps, _ := s.MachinePatches(ctx, "b"); len(ps) != 0 {
			t.Fatalf("a deleted machine's patches stayed: %+v", ps)
		}
		if err := s.DeleteMachine(ctx, "b"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleting it twice: %v", err)
		}
		// Its slot is free again.
		if err := enroll("h1", "e", "te", "host-e"); err != nil {
			t.Fatalf("enrollment after a deletion: %v", err)
		}

		keys, err := s.Keys(ctx)
		if err != nil || len(keys) != 2 || keys[0].ID != "k1" || keys[0].Machines != 2 || keys[0].MaxMachines != 2 || !keys[0].ExpiresAt.Equal(now.Add(48*time.Hour)) ||
			keys[1].ID != "k2" || keys[1].Machines != 3 || !keys[0].RevokedAt.IsZero() {
			t.Fatalf("keys: %+v %v", keys, err)
		}

		// A revoked key enrolls nothing, not even a known host; its
		// machines keep working unless deleted with it.
		if n, err := s.RevokeKey(ctx, "k1", now.Add(time.Hour), false); err != nil || n != 0 {
			t.Fatalf("revoke: %d %v", n, err)
		}
		if err := enroll("h1", "a3", "ta3", "host-a"); !errors.Is(err, ErrRevoked) {
			t.Fatalf("re-enrollment with a revoked key: %v", err)
		}
		if _, err := s.MachineByToken(ctx, "ta2"); err != nil {
			t.Fatalf("a revoked key's machine lost its token: %v", err)
		}
		if _, err := s.RevokeKey(ctx, "k1", now.Add(2*time.Hour), false); err != nil {
			t.Fatal(err)
		}
		if keys, _ := s.Keys(ctx); !keys[0].RevokedAt.Equal(now.Add(time.Hour)) {
			t.Fatalf("a second revocation moved the time: %+v", keys[0])
		}
		if _, err := s.RevokeKey(ctx, "nope", now, false); !errors.Is(err, ErrNotFound) {
			t.Fatalf("revoke an unknown key: %v", err)
		}
		if err := s.Rollout(ctx, target, func(tx RolloutTx, p *Patch) error {
			return tx.PutMachine(RolloutMachine{MachineID: "c2", AppliedAt: now, Failed: true})
		}); err != nil {
			t.Fatal(err)
		}
		if n, err := s.RevokeKey(ctx, "k2", now, true); err != nil || n != 3 {
			t.Fatalf("revoke with its machines: %d %v, want 3", n, err)
		}
		for _, tok := range []string{"tc", "td", "tc2"} {
			if _, err := s.MachineByToken(ctx, tok); !errors.Is(err, ErrNotFound) {
				t.Fatalf("token %s of a revoked and deleted key still works: %v", tok, err)
			}
		}
		if c := counts(); c != (rollout.Tally{}) {
			t.Fatalf("the deleted machines still count: %+v", c)
		}
		if ms, _ := s.Machines(ctx); len(ms) != 2 {
			t.Fatalf("%d machines left, want k1's 2", len(ms))
		}
	})
}

// The database holds token and key hashes: it and its WAL files are
// private to the server's user (finding 8), also when an older version
// created them open to everyone.
func TestSQLiteFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "fleet.db")
	s, err := OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKey(ctx, Key{ID: "k", SecretHash: "h", MaxMachines: 1, CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		for _, p := range []string{path, path + "-wal", path + "-shm"} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %o, want 600", filepath.Base(p), fi.Mode().Perm())
			}
		}
	}
	check()
	s.Close()
	// An existing database left 0644 is narrowed at open.
	old2 := filepath.Join(dir, "old.db")
	if err := os.WriteFile(old2, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	path = old2
	s, err = OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	check()
}
