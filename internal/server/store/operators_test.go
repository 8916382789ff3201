package store

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestOperatorsSessionsAudit(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.CreateOperator(ctx, Operator{Name: "ana", Role: "operator", TokenHash: "h-ana", CreatedAt: now}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateOperator(ctx, Operator{Name: "ana", Role: "admin", TokenHash: "h-other", CreatedAt: now}); !errors.Is(err, ErrExists) {
			t.Fatalf("operator created twice: %v", err)
		}
		o, err := s.OperatorByToken(ctx, "h-ana")
		if err != nil || o.Name != "ana" || o.Role != "operator" || !o.RevokedAt.IsZero() {
			t.Fatalf("by token: %+v %v", o, err)
		}
		if err := s.CreateSession(ctx, Session{IDHash: "s1", Operator: "ana", CSRF: "c1", ExpiresAt: now.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		if se, err := s.Session(ctx, "s1", now); err != nil || se.CSRF != "c1" {
			t.Fatalf("session: %+v %v", se, err)
		}
		if _, err := s.Session(ctx, "s1", now.Add(2*time.Hour)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("expired session found: %v", err)
		}
		// Revoking ends the operator's sessions; a second revocation
		// keeps the first time; an unknown name is not found.
		if err := s.RevokeOperator(ctx, "ana", now.Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
		if err := s.RevokeOperator(ctx, "ana", now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
		if o, _ := s.OperatorByName(ctx, "ana"); !o.RevokedAt.Equal(now.Add(time.Minute)) {
			t.Errorf("revoked at %v, want the first revocation", o.RevokedAt)
		}
		if _, err := s.Session(ctx, "s1", now); !errors.Is(err, ErrNotFound) {
			t.Errorf("a revoked operator's session lives on: %v", err)
		}
		if err := s.RevokeOperator(ctx, "bob", now); !errors.Is(err, ErrNotFound) {
			t.Errorf("revoke unknown: %v", err)
		}
		for i := range 5 {
			actor := "ana"
			if i%2 == 1 {
				actor = "bob"
			}
			if err := s.Audit(ctx, AuditEntry{At: now.Add(time.Duration(i) * time.Second), ID: fmt.Sprint(i), Actor: actor, Action: "rollout halt", Target: "t", Status: 200}); err != nil {
				t.Fatal(err)
			}
		}
		all, err := s.AuditLog(ctx, "", time.Time{}, 3)
		if err != nil || len(all) != 3 || all[0].ID != "4" || all[2].ID != "2" {
			t.Fatalf("audit log: %+v %v", all, err)
		}
		older, _ := s.AuditLog(ctx, "", all[2].At, 10)
		bob, _ := s.AuditLog(ctx, "bob", time.Time{}, 10)
		if len(older) != 2 || older[0].ID != "1" || len(bob) != 2 || bob[0].Actor != "bob" {
			t.Errorf("audit log pages: older %+v, bob's %+v", older, bob)
		}
	})
}

func TestMachinesPage(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.CreateKey(ctx, Key{ID: "k", SecretHash: "sh", MaxMachines: 100, CreatedAt: now, Group: "default"}); err != nil {
			t.Fatal(err)
		}
		for i := range 30 {
			id := fmt.Sprintf("m-%02d", i)
			if _, err := s.Enroll(ctx, "sh", Machine{ID: id, TokenHash: "t" + id, Hostname: fmt.Sprintf("web%02d.example", i)}, now); err != nil {
				t.Fatal(err)
			}
			if i < 5 {
				continue // never checked in
			}
			ci := CheckIn{KernelRelease: "6.1.0-54-amd64", KernelBuildID: "aa", AgentVersion: "v1"}
			if i%3 == 0 {
				ci.KernelRelease = "6.12.117+deb12-amd64"
			}
			if i == 7 {
				ci.Unsupported = "no livepatch"
			}
			at := now.Add(time.Hour)
			if i >= 25 {
				at = now.Add(-time.Hour) // stale
			}
			if err := s.CheckIn(ctx, id, ci, at); err != nil {
				t.Fatal(err)
			}
		}
		page := func(q MachineQuery) ([]string, int) {
			t.Helper()
			q.StaleBefore = now
			ms, total, err := s.MachinesPage(ctx, q)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, m := range ms {
				ids = append(ids, m.ID)
			}
			return ids, total
		}
		if ids, total := page(MachineQuery{Limit: 10, Offset: 10}); total != 30 || len(ids) != 10 || ids[0] != "m-10" {
			t.Errorf("page 2: %v of %d", ids, total)
		}
		if ids, total := page(MachineQuery{Sort: "hostname", Desc: true, Limit: 2}); total != 30 || ids[0] != "m-29" {
			t.Errorf("descending: %v", ids)
		}
		for q, want := range map[MachineQuery]int{
			{Search: "WEB1"}:                           10,
			{Search: "m-2"}:                            10,
			{Search: "%"}:                              0,
			{Kernel: "6.12.117+deb12-amd64"}:           8,
			{State: "stale"}:                           5,
			{State: "never"}:                           5,
			{State: "unsupported"}:                     1,
			{Kernel: "6.1.0-54-amd64", State: "stale"}: 4, // 25, 26, 28, 29
		} {
			if _, total := page(q); total != want {
				t.Errorf("%+v: %d machines, want %d", q, total, want)
			}
		}
		if _, _, err := s.MachinesPage(ctx, MachineQuery{Sort: "token_hash"}); err == nil {
			t.Error("sorted by an unknown column")
		}
		ks, err := s.KernelCounts(ctx, now)
		if err != nil || len(ks) != 3 || ks[0].Release != "6.1.0-54-amd64" || ks[0].Machines != 17 || ks[0].Stale != 4 || ks[0].Unsupported != 1 {
			t.Errorf("kernel counts: %+v %v", ks, err)
		}
	})
}
