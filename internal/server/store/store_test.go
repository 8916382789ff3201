package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// postgresDSN is the test database from scripts/postgres.sh; CI must have
// one, elsewhere the PostgreSQL half is skipped.
func postgresDSN(t *testing.T) string {
	dsn := os.Getenv("STITCH_TEST_POSTGRES")
	if dsn == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but STITCH_TEST_POSTGRES is not: run scripts/postgres.sh and export its output")
		}
		t.Skip("STITCH_TEST_POSTGRES unset: run `eval $(scripts/postgres.sh)` to test PostgreSQL too")
	}
	return dsn
}

// openPostgres opens the test database with the schema dropped first, so
// each test starts empty.
func openPostgres(t *testing.T) *SQL {
	ctx := context.Background()
	s, err := OpenPostgres(ctx, postgresDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.dropAll(ctx); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s, err = OpenPostgres(ctx, postgresDSN(t)); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestEnrollLimitAndExpiry(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "fleet.db")
		s, err := OpenSQLite(context.Background(), path)
		if err != nil {
			t.Fatal(err)
		}
		testEnroll(t, s, path)
	})
	t.Run("postgres", func(t *testing.T) { testEnroll(t, openPostgres(t), "") })
}

func testEnroll(t *testing.T, s *SQL, path string) {
	ctx := context.Background()
	var err error
	defer s.Close()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := s.CreateKey(ctx, Key{ID: "free", SecretHash: "h1", MaxMachines: 3, CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateKey(ctx, Key{ID: "old", SecretHash: "h2", MaxMachines: 10, ExpiresAt: now.Add(time.Hour), CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := s.Enroll(ctx, "h1", Machine{ID: fmt.Sprint("m", i), TokenHash: fmt.Sprint("t", i), Hostname: "h"}, now); err != nil {
			t.Fatalf("machine %d: %v", i, err)
		}
	}
	if _, err := s.Enroll(ctx, "h1", Machine{ID: "m3", TokenHash: "t3", Hostname: "h"}, now); !errors.Is(err, ErrLimit) {
		t.Fatalf("fourth machine on the free tier: %v", err)
	}
	if n, _ := s.CountMachines(ctx, "free"); n != 3 {
		t.Fatalf("%d machines after a refused enrollment", n)
	}
	if _, err := s.Enroll(ctx, "h2", Machine{ID: "m9", TokenHash: "t9", Hostname: "h"}, now.Add(2*time.Hour)); !errors.Is(err, ErrExpired) {
		t.Fatalf("expired key: %v", err)
	}
	if _, err := s.Enroll(ctx, "nope", Machine{ID: "m8", TokenHash: "t8"}, now); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown key: %v", err)
	}
	m, err := s.MachineByToken(ctx, "t1")
	if err != nil || m.ID != "m1" || m.KeyID != "free" {
		t.Fatalf("machine by token: %+v %v", m, err)
	}
	if s.postgres {
		return
	}
	// Reopening applies no migration twice.
	s.Close()
	s2, err := OpenSQLite(ctx, path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s2.Close()
	if n, _ := s2.CountMachines(ctx, "free"); n != 3 {
		t.Fatalf("reopened store has %d machines", n)
	}
}

// tables are every table the migrations create, dependents first.
var tables = []string{"audit_log", "console_sessions", "operators", "contained", "health_reports", "patch_offers", "rollout_machines", "patches", "machine_patches", "machines", "machine_groups", "channels", "enrollment_keys", "schema_migrations"}

// dropAll drops every table of the fleet schema, leaving the test
// database empty.
func (s *SQL) dropAll(ctx context.Context) error {
	for _, t := range tables {
		if _, err := s.db.ExecContext(ctx, "DROP TABLE IF EXISTS "+t); err != nil {
			return fmt.Errorf("drop %s: %w", t, err)
		}
	}
	return nil
}
