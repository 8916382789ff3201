package store

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// The fleet gauges: enrolled, stale (last checked in before the cut),
// never checked in, unsupported; and on SQLite these counts read an
// index only, not the machines' rows.
func TestMachineCounts(t *testing.T) {
	both(t, func(t *testing.T, s *SQL) {
		ctx := context.Background()
		t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.CreateKey(ctx, Key{ID: "k", SecretHash: "h", MaxMachines: 100, CreatedAt: t0}); err != nil {
			t.Fatal(err)
		}
		cut := t0.Add(3 * time.Hour)
		if c, err := s.MachineCounts(ctx, cut); err != nil || c != (MachineCounts{}) {
			t.Fatalf("empty fleet: %+v %v", c, err)
		}
		enroll := func(id string, at time.Time) {
			t.Helper()
			if _, err := s.Enroll(ctx, "h", Machine{ID: id, TokenHash: "t-" + id, Hostname: id}, at); err != nil {
				t.Fatal(err)
			}
		}
		checkIn := func(id string, at time.Time, unsupported string) {
			t.Helper()
			if err := s.CheckIn(ctx, id, CheckIn{KernelRelease: "6.1.0", KernelBuildID: "ab", Unsupported: unsupported}, at); err != nil {
				t.Fatal(err)
			}
		}
		enroll("fresh", t0)   // checked in after the cut
		enroll("silent", t0)  // checked in before it
		enroll("never", t0)   // never checked in
		enroll("new", cut)    // never checked in either
		enroll("nolive", t0)  // checks in, unsupported
		enroll("nolive2", t0) // unsupported, then silent
		checkIn("fresh", cut.Add(time.Minute), "")
		checkIn("silent", t0.Add(time.Hour), "")
		checkIn("nolive", cut.Add(time.Minute), "no CONFIG_LIVEPATCH")
		checkIn("nolive2", t0.Add(time.Minute), "no CONFIG_LIVEPATCH")
		want := MachineCounts{Enrolled: 6, Stale: 2, Never: 2, Unsupported: 2}
		if c, err := s.MachineCounts(ctx, cut); err != nil || c != want {
			t.Fatalf("counts %+v %v, want %+v", c, err, want)
		}
		// A machine that can live-patch again leaves the unsupported count.
		checkIn("nolive", cut.Add(2*time.Minute), "")
		if c, _ := s.MachineCounts(ctx, cut); c.Unsupported != 1 {
			t.Fatalf("unsupported after a supported check-in: %+v", c)
		}
		if err := s.DeleteMachine(ctx, "silent"); err != nil {
			t.Fatal(err)
		}
		if c, _ := s.MachineCounts(ctx, cut); c != (MachineCounts{Enrolled: 5, Stale: 1, Never: 2, Unsupported: 1}) {
			t.Fatalf("after a deletion: %+v", c)
		}
		if s.postgres {
			return
		}
		for q, index := range map[string]string{
			`SELECT COUNT(*) FROM machines WHERE last_checkin > 0 AND last_checkin < 1`: "COVERING INDEX machines_last_checkin",
			`SELECT COUNT(*) FROM machines WHERE last_checkin = 0`:                      "COVERING INDEX machines_last_checkin",
			`SELECT COUNT(*) FROM machines WHERE unsupported <> ''`:                     "INDEX machines_unsupported",
		} {
			if plan := explain(t, s, q); !strings.Contains(plan, index) {
				t.Errorf("%s: plan %q, want %s", q, plan, index)
			}
		}
	})
}

func explain(t *testing.T, s *SQL, q string) string {
	t.Helper()
	rows, err := s.db.Query("EXPLAIN QUERY PLAN " + q)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var b strings.Builder
	cols, _ := rows.Columns()
	for rows.Next() {
		v := make([]any, len(cols))
		p := make([]any, len(cols))
		for i := range v {
			p[i] = &v[i]
		}
		if err := rows.Scan(p...); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(&b, v[len(v)-1])
	}
	return b.String()
}

// BenchmarkMachineCounts: the gauges of a /metrics scrape over 100,000
// machines (a tenth unsupported, a fifth stale, a twentieth never
// checked in).
//
//	go test -run '^$' -bench MachineCounts ./internal/server/store
func BenchmarkMachineCounts(b *testing.B) {
	for name, open := range map[string]func(b *testing.B) *SQL{
		"sqlite": func(b *testing.B) *SQL {
			s, err := OpenSQLite(context.Background(), b.TempDir()+"/fleet.db")
			if err != nil {
				b.Fatal(err)
			}
			return s
		},
		"postgres": func(b *testing.B) *SQL {
			if os.Getenv("STITCH_TEST_POSTGRES") == "" {
				b.Skip("STITCH_TEST_POSTGRES unset")
			}
			s, err := OpenPostgres(context.Background(), os.Getenv("STITCH_TEST_POSTGRES"))
			if err != nil {
				b.Fatal(err)
			}
			if err := s.dropAll(context.Background()); err != nil {
				b.Fatal(err)
			}
			s.Close()
			if s, err = OpenPostgres(context.Background(), os.Getenv("STITCH_TEST_POSTGRES")); err != nil {
				b.Fatal(err)
			}
			return s
		},
	} {
		b.Run(name, func(b *testing.B) {
			s := open(b)
			defer s.Close()
			ctx := context.Background()
			t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			if err := s.CreateKey(ctx, Key{ID: "k", SecretHash: "h", MaxMachines: 1 << 20, CreatedAt: t0}); err != nil {
				b.Fatal(err)
			}
			const n = 100_000
			tx, err := s.db.BeginTx(ctx, nil)
			if err != nil {
				b.Fatal(err)
			}
			for i := range n {
				last, why := t0.Add(3*time.Hour), ""
				if i%5 == 0 {
					last = t0.Add(time.Hour)
				}
				if i%20 == 3 {
					last = time.Time{}
				}
				if i%10 == 1 {
					why = "no CONFIG_LIVEPATCH"
				}
				if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO machines (id, key_id, token_hash, hostname, enrolled_at, group_name, last_checkin, unsupported) VALUES (?, 'k', ?, 'h', ?, 'default', ?, ?)`),
					fmt.Sprint("m", i), fmt.Sprint("t", i), unix(t0), unix(last), why); err != nil {
					b.Fatal(err)
				}
			}
			if err := tx.Commit(); err != nil {
				b.Fatal(err)
			}
			if s.postgres {
				// What autovacuum does: the visibility map lets the COUNTs
				// read the indexes only.
				s.db.ExecContext(ctx, "VACUUM ANALYZE machines")
			}
			b.ResetTimer()
			for b.Loop() {
				c, err := s.MachineCounts(ctx, t0.Add(2*time.Hour))
				if err != nil || c != (MachineCounts{Enrolled: n, Stale: n / 5, Never: n / 20, Unsupported: n / 10}) {
					b.Fatalf("%+v %v", c, err)
				}
			}
		})
	}
}
