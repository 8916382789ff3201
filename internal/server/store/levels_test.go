package store

import (
	"context"
	"errors"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
)

// A level keeps its stream, number, supersedes, withdrawn fixes and
// fixes; a second target for the same kernel, stream and number is
// refused naming the first, while another kernel, another stream or a
// patch that is no level are not; the offers of levels read back.
func TestLevelsRegisteredOncePerKernel(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		patch := func(target, release, stream string, n int) Patch {
			return Patch{Target: target, Name: contract.LevelName(stream, n), KernelRelease: release, KernelBuildID: "5454545454", RegisteredAt: now, UpdatedAt: now, State: "running",
				Level: &contract.Level{Stream: stream, Number: n, Supersedes: n - 1, Withdrawn: []string{"a fix with spaces.patch"}},
				Fixes: []Fix{{Name: "b.patch", CVEs: []string{"CVE-2026-2222"}, Upstream: "0123456789abcdef"}, {Name: "c.patch"}},
				CVEs:  []string{"CVE-2026-2222"}}
		}
		l3 := patch("6.1.0-54-amd64/mem_l3-0123456789abcdef.stitch", "6.1.0-54-amd64", "mem", 3)
		if err := s.RegisterPatch(ctx, l3); err != nil {
			t.Fatal(err)
		}
		got, err := s.Patch(ctx, l3.Target)
		if err != nil || !reflect.DeepEqual(got.Level, l3.Level) || !reflect.DeepEqual(got.Fixes, l3.Fixes) {
			t.Fatalf("read back %+v %+v (%v), want %+v %+v", got.Level, got.Fixes, err, l3.Level, l3.Fixes)
		}
		again := patch("6.1.0-54-amd64/mem_l3-fedcba9876543210.stitch", "6.1.0-54-amd64", "mem", 3)
		var taken *LevelTakenError
		if err := s.RegisterPatch(ctx, again); !errors.As(err, &taken) || !errors.Is(err, ErrLevelTaken) || taken.Target != l3.Target {
			t.Fatalf("the same level under another target: %v", err)
		}
		if err := s.RegisterPatch(ctx, l3); !errors.Is(err, ErrExists) || errors.Is(err, ErrLevelTaken) {
			t.Fatalf("the same target twice: %v", err)
		}
		for _, ok := range []Patch{
			patch("6.1.0-57-amd64/mem_l3-0123456789abcdef.stitch", "6.1.0-57-amd64", "mem", 3),
			patch("6.1.0-54-amd64/net_l3-0123456789abcdef.stitch", "6.1.0-54-amd64", "net", 3),
			{Target: "6.1.0-54-amd64/fix-0123456789abcdef.stitch", Name: "fix", KernelRelease: "6.1.0-54-amd64", KernelBuildID: "5454545454", RegisteredAt: now, UpdatedAt: now, State: "running"},
			{Target: "6.1.0-54-amd64/fix-fedcba9876543210.stitch", Name: "fix", KernelRelease: "6.1.0-54-amd64", KernelBuildID: "5454545454", RegisteredAt: now, UpdatedAt: now, State: "running"},
		} {
			if err := s.RegisterPatch(ctx, ok); err != nil {
				t.Fatalf("register %s: %v", ok.Target, err)
			}
		}
		if p, _ := s.Patch(ctx, "6.1.0-54-amd64/fix-0123456789abcdef.stitch"); p.Level != nil || p.Fixes != nil {
			t.Fatalf("a patch that is no level: %+v", p)
		}

		k := Key{ID: "k1", SecretHash: "h", MaxMachines: 5, CreatedAt: now}
		if err := s.CreateKey(ctx, k); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Enroll(ctx, "h", Machine{ID: "m1", TokenHash: "t1", Hostname: "a"}, now); err != nil {
			t.Fatal(err)
		}
		if err := s.RecordOffers(ctx, "m1", []string{l3.Target, "6.1.0-54-amd64/fix-0123456789abcdef.stitch"}, now); err != nil {
			t.Fatal(err)
		}
		if got, err := s.MachineOffers(ctx, "m1"); err != nil || len(got) != 2 {
			t.Fatalf("machine offers %v %v", got, err)
		}
		if got, err := s.LevelOffers(ctx); err != nil || !reflect.DeepEqual(got, []Offer{{Target: l3.Target, MachineID: "m1"}}) {
			t.Fatalf("level offers %v %v", got, err)
		}
	})
}

// A database of migration 0006 takes 0007 with its patches as they were:
// no level, no fixes recorded.
func TestMigrationAddsLevels(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	s, err := OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`DROP INDEX patches_level`, `ALTER TABLE patches DROP COLUMN level_stream`, `ALTER TABLE patches DROP COLUMN level_number`,
		`ALTER TABLE patches DROP COLUMN level_supersedes`, `ALTER TABLE patches DROP COLUMN level_withdrawn`, `ALTER TABLE patches DROP COLUMN fixes`,
		`DELETE FROM schema_migrations WHERE version = 'migrations/0007_levels.sql'`,
		`INSERT INTO patches (target, name, kernel_release, kernel_build_id, cves, registered_at, state, updated_at) VALUES ('6.1/a-0123456789abcdef.stitch', 'a', '6.1', 'ab', 'CVE-2026-1111', 1, 'running', 1)`,
	} {
		if _, err := s.db.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	s.Close()
	if s, err = OpenSQLite(ctx, path); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p, err := s.Patch(ctx, "6.1/a-0123456789abcdef.stitch")
	if err != nil || p.Level != nil || p.Fixes != nil || len(p.CVEs) != 1 {
		t.Fatalf("patch after migrating: %+v %v", p, err)
	}
}
