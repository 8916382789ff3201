package store

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// Contained records are kept once each, read back whole, and patches
// keep their upstream commits.
func TestContainedAndUpstream(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		c := Contained{Target: "contained/6.1.0-57-amd64/fix-0123456789abcdef.json", Name: "fix", KernelRelease: "6.1.0-57-amd64", KernelBuildID: "5757575757",
			CVEs: []string{"CVE-2026-1111", "CVE-2026-2222"}, Upstream: []string{"0123456789abcdef"}, Checked: now.Add(-time.Hour), LearnedAt: now}
		for i, want := range []bool{true, false} {
			later := c
			later.LearnedAt = now.Add(time.Duration(i) * time.Hour) // a second replica learning it later
			if added, err := s.AddContained(ctx, later); err != nil || added != want {
				t.Fatalf("add #%d: added %v, %v; want %v", i+1, added, err, want)
			}
		}
		other := Contained{Target: "contained/6.1.0-47-amd64/fix-fedcba9876543210.json", Name: "fix", KernelRelease: "6.1.0-47-amd64", KernelBuildID: "4747474747", LearnedAt: now}
		if _, err := s.AddContained(ctx, other); err != nil {
			t.Fatal(err)
		}
		got, err := s.Contained(ctx)
		if err != nil || len(got) != 2 {
			t.Fatalf("contained: %+v %v", got, err)
		}
		if !reflect.DeepEqual(got[1], c) || got[0].Target != other.Target || len(got[0].CVEs) != 0 {
			t.Fatalf("read back %+v, want %+v then %+v", got, other, c)
		}
		p := Patch{Target: "6.1.0-47-amd64/fix-0123456789abcdef.stitch", Name: "fix", KernelRelease: "6.1.0-47-amd64", KernelBuildID: "4747474747",
			Upstream: []string{"0123456789abcdef", "fedcba98765"}, RegisteredAt: now, UpdatedAt: now, State: "running", StageStarted: []time.Time{now}}
		if err := s.RegisterPatch(ctx, p); err != nil {
			t.Fatal(err)
		}
		if got, err := s.Patch(ctx, p.Target); err != nil || !reflect.DeepEqual(got.Upstream, p.Upstream) {
			t.Fatalf("patch upstream: %+v %v", got, err)
		}
	})
}

// A database of migration 0005 takes 0006 with its patches as they were:
// their upstream is unknown (empty), and contained records can be added.
func TestMigrationAddsContained(t *testing.T) {
	ctx := context.Background()
	test := func(t *testing.T, s *SQL, reopen func() *SQL) {
		for _, q := range []string{`DROP TABLE contained`, `ALTER TABLE patches DROP COLUMN upstream`,
			`DELETE FROM schema_migrations WHERE version = 'migrations/0006_contained.sql'`,
			`INSERT INTO patches (target, name, kernel_release, kernel_build_id, cves, registered_at, state, updated_at) VALUES ('6.1/a-0123456789abcdef.stitch', 'a', '6.1', 'ab', 'CVE-2026-1111', 1, 'running', 1)`,
		} {
			if _, err := s.db.ExecContext(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		s.Close()
		s = reopen()
		defer s.Close()
		p, err := s.Patch(ctx, "6.1/a-0123456789abcdef.stitch")
		if err != nil || len(p.Upstream) != 0 || len(p.CVEs) != 1 {
			t.Fatalf("patch after migrating: %+v %v", p, err)
		}
		if added, err := s.AddContained(ctx, Contained{Target: "contained/6.1/a-0123456789abcdef.json", Name: "a", KernelRelease: "6.1", KernelBuildID: "cd"}); !added || err != nil {
			t.Fatalf("contained after migrating: %v %v", added, err)
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
