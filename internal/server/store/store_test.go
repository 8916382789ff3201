package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

func TestEnrollLimitAndExpiry(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	s, err := OpenSQLite(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
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
