package bundle

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRefresherKeepsMetadataValidPastAYear: with nothing but the refresher
// running (every 8 hours of an injected clock) and the operator renewing
// root when warned, agents fetch for 400 days. The timestamp is re-signed
// at half its life, not at every run, and targets every 45 days.
func TestRefresherKeepsMetadataValidPastAYear(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	start := f.clk.t
	count := map[string]int{}
	var warnedAt time.Time
	for step := 1; f.clk.t.Before(start.Add(400 * 24 * time.Hour)); step++ {
		f.clk.t = f.clk.t.Add(8 * time.Hour)
		fr, err := f.repo.RefreshIfDue()
		if err != nil {
			t.Fatalf("day %.1f: %v", f.clk.t.Sub(start).Hours()/24, err)
		}
		for _, r := range fr.Resigned {
			count[r]++
		}
		for _, w := range fr.Warnings {
			if w.Role != "root" || !warnedAt.IsZero() {
				t.Fatalf("unexpected warning: %+v", w)
			}
			if !strings.Contains(w.Msg, "stitch keys renew-root --dir "+f.repo.Dir) {
				t.Fatalf("the root warning does not name the command: %s", w.Msg)
			}
			warnedAt = f.clk.t
			if err := f.repo.RenewRoot(); err != nil { // the operator, with the offline key
				t.Fatal(err)
			}
		}
		if exp := fr.Status.Roles["timestamp"].Expires; !exp.After(f.clk.t.Add(8 * time.Hour)) {
			t.Fatalf("day %.1f: timestamp expires %s, under 8 hours away", f.clk.t.Sub(start).Hours()/24, exp)
		}
		if step%3 == 0 { // daily
			if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
				t.Fatalf("day %.1f: %v", f.clk.t.Sub(start).Hours()/24, err)
			}
		}
	}
	if d := warnedAt.Sub(start); d < 300*24*time.Hour || d > 306*24*time.Hour {
		t.Errorf("root warning after %s: want about two months before the 365-day expiry", d)
	}
	// Once less than half its life is left (every 16 hours at 8-hour
	// steps, plus after each new snapshot), not at each of the 1,200 runs.
	if n := count["timestamp"]; n < 600 || n > 700 {
		t.Errorf("timestamp signed %d times in 400 days, want about 650 (at half its life)", n)
	}
	if n := count["targets"]; n < 8 || n > 9 {
		t.Errorf("targets signed %d times in 400 days, want every 45 days", n)
	}
	fresh := *f.client
	fresh.CacheDir = t.TempDir()
	if _, _, err := fresh.Fetch(context.Background(), name); err != nil {
		t.Fatalf("a new agent with the first root, on day 400: %v", err)
	}
}

// TestRootNeedsTheOperator: the refresher cannot renew root (offline key);
// past day 365 agents refuse until `stitch keys renew-root`, after which
// an agent that pinned the old root accepts the new one.
func TestRootNeedsTheOperator(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	start := f.clk.t
	f.clk.t = start.Add(366 * 24 * time.Hour)
	if _, err := f.repo.RefreshIfDue(); err != nil {
		t.Fatal(err)
	}
	_, _, err := f.client.Fetch(context.Background(), name)
	wantVerify(t, err, "root.json is expired")
	if err := f.repo.RenewRoot(); err != nil {
		t.Fatal(err)
	}
	st, err := f.repo.Status()
	if err != nil {
		t.Fatal(err)
	}
	if r := st.Roles["root"]; r.Version != 2 || !r.Expires.Equal(f.clk.t.Add(DefaultExpiries.Root)) {
		t.Fatalf("renewed root: %+v", r)
	}
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatalf("agent with the old root after renew-root: %v", err)
	}
	fresh := *f.client
	fresh.CacheDir = t.TempDir()
	if _, _, err := fresh.Fetch(context.Background(), name); err != nil {
		t.Fatalf("new agent pinning 1.root.json after renew-root: %v", err)
	}
}

// syncBuffer is a log sink for a goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestKeepFresh: the loop the server runs re-signs stale metadata at once,
// reports every role's expiry, and repeats a standing warning only daily.
func TestKeepFresh(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	var mu sync.Mutex
	clockAt := func(d time.Duration) func() time.Time {
		at := f.clk.t.Add(d)
		return func() time.Time { mu.Lock(); defer mu.Unlock(); return at }
	}
	// The server was down for two days, and root is near its end.
	f.repo.Now = clockAt(330 * 24 * time.Hour)
	f.client.Now = f.repo.Now
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	reports := make(chan map[string]time.Time, 100)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		f.repo.KeepFresh(ctx, 5*time.Millisecond, log, func(m map[string]time.Time) { reports <- m })
		close(done)
	}()
	var last map[string]time.Time
	for range 5 {
		select {
		case last = <-reports:
		case <-time.After(10 * time.Second):
			t.Fatal("no report from KeepFresh")
		}
	}
	cancel()
	<-done
	now := f.repo.Now()
	if !last["timestamp"].After(now) || !last["snapshot"].After(now) || !last["targets"].After(now) || last["root"].IsZero() {
		t.Fatalf("expiries after KeepFresh: %v (now %s)", last, now)
	}
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatalf("fetch after KeepFresh: %v", err)
	}
	out := logs.String()
	if !strings.Contains(out, "re-signed") {
		t.Errorf("nothing logged about re-signing:\n%s", out)
	}
	if n := strings.Count(out, "renew-root"); n != 1 {
		t.Errorf("root warning logged %d times in 5 runs, want once a day:\n%s", n, out)
	}
}
