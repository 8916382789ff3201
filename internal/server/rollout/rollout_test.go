package rollout

import (
	"fmt"
	"testing"
	"time"
)

// simulate runs n machines against a rollout, advancing a virtual clock a
// minute at a time; fails(id) says which machines break. It returns the
// rollout and every machine that received the patch.
func simulate(t *testing.T, n int, fails func(id string) bool) (*Rollout, map[string]bool) {
	t.Helper()
	r, err := New("fix_a-0123", DefaultPolicy)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	applied := map[string]time.Time{}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for minute := 0; minute < 24*60 && r.State == Running; minute++ {
		now = now.Add(time.Minute)
		for i := range n {
			id := fmt.Sprintf("m%05d", i)
			if at, ok := applied[id]; ok {
				if !fails(id) && now.Sub(at) <= 20*time.Minute {
					r.Healthy(id, now)
				}
				continue
			}
			if !r.Offer(id) {
				continue
			}
			got[id] = true
			if fails(id) {
				r.Failed(id, "kernel oops after apply", now)
				applied[id] = now
				continue
			}
			if err := r.Applied(id, now); err != nil {
				t.Fatal(err)
			}
			applied[id] = now
		}
		r.Advance()
	}
	return r, got
}

func TestHealthyPatchReachesEveryone(t *testing.T) {
	r, got := simulate(t, 5000, func(string) bool { return false })
	if r.State != Complete || len(got) != 5000 {
		t.Fatalf("state %s, stage %d, %d machines got it", r.State, r.Stage, len(got))
	}
}

func TestFailingPatchHaltsAtFirstStage(t *testing.T) {
	// A third of machines crash: the 1% stage (about 50 machines) must
	// catch it, and nobody ranked beyond 1% may ever get the patch.
	r, got := simulate(t, 5000, func(id string) bool { return Rank("fix_a-0123", id) < 0.01 && id[len(id)-1]%3 == 0 })
	if r.State != Blocklisted || r.Stage != 0 {
		t.Fatalf("state %s at stage %d, want blocklisted at stage 0", r.State, r.Stage)
	}
	for id := range got {
		if Rank(r.Patch, id) >= 0.01 {
			t.Fatalf("machine %s beyond the 1%% stage received the patch", id)
		}
		if !r.MustRevert(id) {
			t.Fatalf("machine %s applied the blocklisted patch but is not told to revert", id)
		}
	}
	if len(got) > 60 {
		t.Fatalf("%d machines received it, want about 50", len(got))
	}
}

func TestFailureInLaterStageHaltsThere(t *testing.T) {
	// Only machines ranked in (10%, 50%) break: the rollout passes 1% and
	// 10%, and stops in the 50% stage; nobody beyond 50% gets it.
	r, got := simulate(t, 5000, func(id string) bool {
		k := Rank("fix_a-0123", id)
		return k > 0.10 && k < 0.5 && id[len(id)-1]%2 == 0
	})
	if r.State != Blocklisted || r.Stage != 2 {
		t.Fatalf("state %s at stage %d, want blocklisted at stage 2", r.State, r.Stage)
	}
	for id := range got {
		if Rank(r.Patch, id) >= 0.5 {
			t.Fatalf("machine %s beyond 50%% got the patch", id)
		}
	}
}

func TestNoAdvanceBeforeLastCheck(t *testing.T) {
	r, _ := New("p", DefaultPolicy)
	t0 := time.Unix(0, 0)
	id := ""
	for i := 0; ; i++ {
		id = fmt.Sprint(i)
		if r.Offer(id) {
			break
		}
	}
	r.Applied(id, t0)
	r.Healthy(id, t0.Add(14*time.Minute))
	if r.Advance() {
		t.Fatal("advanced before the 15-minute check")
	}
	r.Healthy(id, t0.Add(15*time.Minute))
	if !r.Advance() || r.Stage != 1 {
		t.Fatal("did not advance after all checks passed")
	}
	for i := 0; ; i++ {
		out := fmt.Sprint("out", i)
		if r.Offer(out) {
			continue
		}
		if err := r.Applied(out, t0); err == nil {
			t.Fatal("a machine never offered the patch was recorded as applied")
		}
		break
	}
}

func TestOperatorHands(t *testing.T) {
	r, _ := New("p", DefaultPolicy)
	r.Halt("looking into a report")
	if r.State != Halted || r.Offer("anything") {
		t.Fatal("halted rollout still offers")
	}
	if err := r.Resume(); err != nil || r.State != Running {
		t.Fatal("resume failed")
	}
	r.Blocklist("by hand")
	if r.State != Blocklisted {
		t.Fatal("blocklist failed")
	}
	if err := (Policy{Stages: []float64{0.5, 0.2, 1}}).Validate(); err == nil {
		t.Fatal("shrinking stages accepted")
	}
}

// Failures within the tolerance do not hold the rollout back; the one past
// it blocklists even a complete rollout.
func TestToleratedFailures(t *testing.T) {
	r, _ := New("p", Policy{Stages: []float64{0.5, 1}, Checks: []time.Duration{time.Minute}, MaxFailures: 1, MaxRate: 0.5})
	t0 := time.Unix(0, 0)
	var ids []string
	for i := 0; len(ids) < 4; i++ {
		if id := fmt.Sprint(i); r.Offer(id) {
			ids = append(ids, id)
		}
	}
	for _, id := range ids[:3] {
		r.Applied(id, t0)
		r.Healthy(id, t0.Add(time.Minute))
	}
	r.Failed(ids[3], "oops", t0)
	if r.State != Running || !r.Advance() {
		t.Fatalf("one tolerated failure held the rollout: %s at stage %d", r.State, r.Stage)
	}
	r.Advance()
	if r.State != Complete {
		t.Fatalf("state %s, want complete", r.State)
	}
	for i := 0; ; i++ {
		if id := fmt.Sprint("late", i); r.Offer(id) {
			r.Failed(id, "oops", t0)
			break
		}
	}
	if r.State != Blocklisted || !r.MustRevert(ids[0]) {
		t.Fatalf("a failure past the tolerance left a complete rollout %s", r.State)
	}
}

// A report naming a check counts it (with those before it) once half its
// time has passed on the server's clock, which starts at the machine's
// first report, after the machine's own apply.
func TestNamedCheckCounts(t *testing.T) {
	p := DefaultPolicy
	t0 := time.Unix(0, 0)
	for _, c := range []struct {
		elapsed     time.Duration
		done, named int
		want        int
	}{
		{59 * time.Second, 0, -1, 0},
		{60 * time.Second, 0, -1, 1},
		{59 * time.Second, 0, 0, 1}, // "1m", 59 s after the server heard of the apply
		{14 * time.Minute, 1, 2, 3}, // "15m" a minute late in the server's eyes
		{7 * time.Minute, 1, 2, 2},  // "15m" after 7 minutes: too early; the 5m check counts by time
		{5 * time.Second, 0, 2, 0},  // a hasty agent rushes nothing
		{20 * time.Minute, 0, 0, 3}, // time alone passes later checks
		{2 * time.Minute, 3, 1, 3},  // never fewer than done
	} {
		if got := p.ChecksPassed(t0, t0.Add(c.elapsed), c.done, c.named); got != c.want {
			t.Errorf("ChecksPassed(+%s, done %d, named %d) = %d, want %d", c.elapsed, c.done, c.named, got, c.want)
		}
	}
}
