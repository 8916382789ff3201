package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The tests here are about patch levels: cumulative patches
// (klp replace) of a patch stream, against the real server and TUF
// repository, with the stand-in kernel, which drops every other patch
// when it loads a level as the kernel does.

const stream = "stitch_test"

// levelFixes are the fixes of the test stream's levels: level 1 carries
// A, level 2 A and B, level 3 B and C (A withdrawn), and on.
func levelFixes(n int) (fixes []contract.Fix, cves, withdrawn []string) {
	fix := func(name, cve string) {
		fixes = append(fixes, contract.Fix{Name: name, Hash: strings.Repeat(fmt.Sprintf("%02x", len(fixes)+1), 32), CVEs: []string{cve}, Files: []string{"fs/proc/meminfo.c"}})
		cves = append(cves, cve)
	}
	if n <= 2 {
		fix("meminfo_a.patch", "CVE-2099-0101")
	} else if n == 3 {
		withdrawn = []string{"meminfo_a.patch"}
	}
	if n >= 2 {
		fix("meminfo_b.patch", "CVE-2099-0102")
	}
	for i := 3; i <= n; i++ {
		fix(fmt.Sprintf("fix_%c.patch", 'a'+i-1), fmt.Sprintf("CVE-2099-01%02d", i))
	}
	return fixes, cves, withdrawn
}

// levelManifest is level n of the test stream for the machines' kernel.
func levelManifest(n int) contract.Manifest {
	name := contract.LevelName(stream, n)
	fixes, cves, withdrawn := levelFixes(n)
	m := manifest(name, release, buildID, cves...)
	m.Fixes, m.Replace = fixes, true
	m.Level = &contract.Level{Stream: stream, Number: n, Supersedes: n - 1, Withdrawn: withdrawn}
	return m
}

// level publishes level n and starts its rollout.
func (f *fleet) level(t *testing.T, n int) string {
	t.Helper()
	m := levelManifest(n)
	return f.publish(m, testutils.StandInModule(t, m.Name, release, ""))
}

// levelsTaken publishes levels 1 to n, one at a time, each taken by
// machine m in a pass.
func (f *fleet) levelsTaken(t *testing.T, m *machine, n int) []string {
	t.Helper()
	var targets []string
	for i := 1; i <= n; i++ {
		targets = append(targets, f.level(t, i))
		m.pass(t)
	}
	return targets
}

func levelName(n int) string { return contract.LevelName(stream, n) }

// onlyLoaded fails unless the kernel holds exactly the patches named.
func (m *machine) onlyLoaded(t *testing.T, names ...string) {
	t.Helper()
	m.k.mu.Lock()
	defer m.k.mu.Unlock()
	var have []string
	for n := range m.k.loaded {
		have = append(have, n)
	}
	slices.Sort(have)
	slices.Sort(names)
	if !slices.Equal(have, names) {
		t.Fatalf("kernel holds %v, want %v", have, names)
	}
}

func (m *machine) loads() []string {
	m.k.mu.Lock()
	defer m.k.mu.Unlock()
	return slices.Clone(m.k.order)
}

func TestLevelsInTurn(t *testing.T) {
	f, m := enrolled(t)
	targets := map[int]string{}
	for n := 1; n <= 3; n++ {
		targets[n] = f.level(t, n)
		m.pass(t)
		m.onlyLoaded(t, levelName(n))
		p := m.state(t, targets[n])
		if p.State != contract.StateApplied || p.Level == nil || p.Level.Number != n || !p.Replace {
			t.Fatalf("level %d: %+v", n, p)
		}
		if n > 1 {
			// The level before is superseded: kept, as the one to fall
			// back to, and reported reverted.
			if q := m.state(t, targets[n-1]); q.State != contract.StateReverted || !q.Superseded {
				t.Fatalf("level %d after level %d: %+v", n-1, n, q)
			}
		}
	}
	// One transition a level: level 3 was loaded once, and nothing else
	// was loaded again.
	if got := m.loads(); !slices.Equal(got, []string{levelName(1), levelName(2), levelName(3)}) {
		t.Errorf("loads %v", got)
	}
	s := m.status(t)
	want := release + " + stitch level 3 (2 fixes, CVE-2099-0102, CVE-2099-0103)"
	if s.Coverage != agent.UpToDate || s.Level != 3 || s.Effective != want || s.LiveLevel == nil ||
		s.LiveLevel.Stream != stream || len(s.LiveLevel.Fixes) != 2 || !slices.Equal(s.LiveLevel.Withdrawn, []string{"meminfo_a.patch"}) {
		t.Fatalf("status: %s\n%+v", s.Effective, s)
	}
	if s.FixedCVEs[0] != "CVE-2099-0102" || len(s.FixedCVEs) != 2 {
		t.Errorf("fixed CVEs %v: level 3 withdrew A", s.FixedCVEs)
	}
	// The server saw each level applied, and the older ones reverted.
	time.Sleep(200 * time.Millisecond)
	m.pass(t)
	if r := f.patch(targets[3]); r.Applied != 1 || r.Healthy != 1 {
		t.Errorf("server on level 3: %+v", r)
	}

	// Levels 4 and 5 published together: the machine goes straight to 5.
	targets[4], targets[5] = f.level(t, 4), f.level(t, 5)
	m.pass(t)
	m.onlyLoaded(t, levelName(5))
	if m.state(t, targets[4]) != nil {
		t.Error("level 4 recorded: the machine skipped it")
	}
	if q := m.state(t, targets[3]); !q.Superseded {
		t.Errorf("level 3 after level 5: %+v", q)
	}
	// Level 4, still offered, is not pending: it is older than the live one.
	m.pass(t)
	if s := m.status(t); s.Coverage != agent.UpToDate || len(s.Pending) != 0 || s.Level != 5 {
		t.Errorf("after level 5: %s %s %v", s.Coverage, s.Why, s.Pending)
	}
	if n := len(m.loads()); n != 4 {
		t.Errorf("%d loads for 4 levels taken: %v", n, m.loads())
	}
}

// The server names the level of each offer (api.Action.Level): the agent
// fetches only the newest, and believes the signed manifest over the
// unsigned answer.
func TestOfferedLevelsFetchNewestOnly(t *testing.T) {
	f, m := newFleet(t), newMachine(t)
	g := newGateway(t, f)
	m.enrollVia(t, f, g)
	levels := map[string]*contract.Level{}
	var mu sync.Mutex
	var fetched []string
	lie := false
	g.set(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/targets/") {
			mu.Lock()
			fetched = append(fetched, r.URL.Path)
			mu.Unlock()
		}
		return false
	}, func(cr *api.CheckInResponse) {
		for i, a := range cr.Actions {
			if l := levels[a.Target]; l != nil {
				c := *l
				if lie {
					c.Number += 10
				}
				cr.Actions[i].Level = &c
			}
		}
	})
	for n := 1; n <= 3; n++ {
		target := f.level(t, n)
		levels[target] = levelManifest(n).Level
	}
	m.pass(t)
	m.onlyLoaded(t, levelName(3))
	mu.Lock()
	if len(fetched) != 1 || !strings.Contains(fetched[0], levelName(3)) {
		t.Errorf("fetched %v, want level 3's bundle only", fetched)
	}
	mu.Unlock()

	// An answer that calls level 4 level 14 is not believed.
	lie = true
	t4 := f.level(t, 4)
	levels[t4] = levelManifest(4).Level
	l := captureLog(m)
	m.pass(t)
	m.onlyLoaded(t, levelName(3))
	if m.state(t, t4) != nil || len(l.lines("does not match its signed manifest", levelName(14))) == 0 {
		t.Errorf("a level the answer misnamed was taken, or not logged:\n%s", l)
	}
}

func TestBlocklistedLevelFallsBack(t *testing.T) {
	f, m := enrolled(t)
	targets := f.levelsTaken(t, m, 3)
	f.operate(targets[2], "blocklist")
	m.pass(t)
	m.onlyLoaded(t, levelName(2))
	if p := m.state(t, targets[2]); p.State != contract.StateReverted || !strings.Contains(p.Detail, "back to "+levelName(2)) {
		t.Fatalf("blocklisted level 3: %+v", p)
	}
	if p := m.state(t, targets[1]); p.State != contract.StateApplied || p.Superseded {
		t.Fatalf("level 2 after the fallback: %+v", p)
	}
	if s := m.status(t); s.Level != 2 || !strings.HasPrefix(s.Effective, release+" + stitch level 2 (") {
		t.Errorf("status after the fallback: %s", s.Effective)
	}
	// Level 2 passed its checks again: the server hears it is healthy.
	time.Sleep(200 * time.Millisecond)
	m.pass(t)
	if r := f.patch(targets[1]); r.Failed != 0 || r.Healthy != 1 {
		t.Errorf("server on level 2: %+v", r)
	}
	// Back to level 1, then to nothing: no level below it.
	f.operate(targets[1], "blocklist")
	m.pass(t)
	m.onlyLoaded(t, levelName(1))
	f.operate(targets[0], "blocklist")
	m.pass(t)
	m.onlyLoaded(t)
	if s := m.status(t); s.Level != 0 || s.Effective != release {
		t.Errorf("status with no level: %s", s.Effective)
	}
	// A new level after all that is taken.
	t4 := f.level(t, 4)
	m.pass(t)
	m.onlyLoaded(t, levelName(4))
	if p := m.state(t, t4); p.State != contract.StateApplied {
		t.Errorf("level 4: %+v", p)
	}
}

func TestFailingLevelFallsBack(t *testing.T) {
	// Slower checks than newFleet's: the watch window must outlast the
	// trouble below.
	f, m := newFleetWith(t, policy(300*time.Millisecond, 400*time.Millisecond, 500*time.Millisecond)), newMachine(t)
	m.enroll(t, f)
	t1, t2 := f.level(t, 1), f.level(t, 2)
	m.pass(t)
	m.onlyLoaded(t, levelName(2))
	// A hot-fix on level 2 (checked below: it survives the fallback).
	hot := f.fix(t, "fix_hot", "CVE-2099-0200")
	m.pass(t)
	m.onlyLoaded(t, levelName(2), "fix_hot")
	if m.state(t, t1) != nil {
		t.Fatal("level 1 taken although level 2 was offered with it")
	}
	t3 := f.level(t, 3)
	go func() {
		for !m.k.isLoaded(levelName(3)) {
			time.Sleep(5 * time.Millisecond)
		}
		m.log.write("WARNING: CPU: 0 PID: 1 at meminfo.c:9 meminfo_proc_show+0x15/0x30 [" + levelName(3) + "]")
		m.k.mu.Lock()
		m.k.taint |= 1 << 9
		m.k.mu.Unlock()
	}()
	m.pass(t)
	m.onlyLoaded(t, levelName(2), "fix_hot")
	p := m.state(t, t3)
	if p.State != contract.StateFailed || p.Reason != contract.ReasonKernelWarning {
		t.Fatalf("level 3 after its warning: %+v", p)
	}
	if q := m.state(t, t2); q.State != contract.StateApplied {
		t.Fatalf("level 2 after level 3 failed: %+v", q)
	}
	if h := m.state(t, hot); h.State != contract.StateApplied || !h.HotFix {
		t.Fatalf("hot-fix after the fallback: %+v", h)
	}
	if r := f.patch(t3); r.Failed != 1 {
		t.Errorf("server on level 3: %+v", r)
	}
	// Never taken again, however it is offered.
	m.pass(t)
	m.onlyLoaded(t, levelName(2), "fix_hot")
	if n := strings.Count(strings.Join(m.loads(), " "), levelName(3)); n != 1 {
		t.Errorf("level 3 loaded %d times", n)
	}
	if s := m.status(t); s.Coverage != agent.NotCovered || s.Level != 2 {
		t.Errorf("status: %s %s (level 3's fixes are missing)", s.Coverage, s.Effective)
	}
}

func TestLevelCrashLoopFallsBackAtBoot(t *testing.T) {
	f, m := enrolled(t)
	t1 := f.level(t, 1)
	m.pass(t)
	t2 := f.level(t, 2)
	m.pass(t)
	// A reboot: level 2 is loaded again, and the machine dies within its
	// first check.
	f.srv.Close()
	m.setBoot("boot-2", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.onlyLoaded(t, levelName(2))
	m.setBoot("boot-3", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.onlyLoaded(t, levelName(1))
	if p := m.state(t, t2); p.State != contract.StateFailed || p.Reason != contract.ReasonCrashLoop {
		t.Fatalf("level 2 after the crash: %+v", p)
	}
	if p := m.state(t, t1); p.State != contract.StateApplied {
		t.Fatalf("level 1 after the crash: %+v", p)
	}
}

func TestRebootReloadsLiveLevelOnly(t *testing.T) {
	f, m := enrolled(t)
	for n := 1; n <= 3; n++ {
		f.level(t, n)
		m.pass(t)
	}
	f.fix(t, "fix_hot")
	m.pass(t)
	m.onlyLoaded(t, levelName(3), "fix_hot")
	f.srv.Close()
	m.setBoot("boot-2", "console=ttyS0")
	before := len(m.loads())
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.onlyLoaded(t, levelName(3), "fix_hot")
	// The level first (it would drop a patch loaded before it), then the
	// hot-fix; no older level.
	if got := m.loads()[before:]; !slices.Equal(got, []string{levelName(3), "fix_hot"}) {
		t.Errorf("loaded at boot: %v", got)
	}
}

func TestHotFixKeptAcrossLevels(t *testing.T) {
	f, m := enrolled(t)
	f.level(t, 1)
	m.pass(t)
	hot := f.fix(t, "fix_hot", "CVE-2099-0200")
	m.pass(t)
	m.onlyLoaded(t, levelName(1), "fix_hot")
	s := m.status(t)
	if !strings.HasSuffix(s.Effective, " + 1 hot-fix") || !slices.Equal(s.HotFixes, []string{"fix_hot"}) || !m.state(t, hot).HotFix {
		t.Fatalf("status with a hot-fix: %s %v", s.Effective, s.HotFixes)
	}
	// Level 2 drops every other patch; the agent loads the hot-fix again.
	f.level(t, 2)
	m.pass(t)
	m.onlyLoaded(t, levelName(2), "fix_hot")
	if got := m.loads(); !slices.Equal(got[len(got)-2:], []string{levelName(2), "fix_hot"}) {
		t.Errorf("loads: %v", got)
	}
	// Its disappearance was no revert: it stays applied pass after pass,
	// and reported so.
	time.Sleep(200 * time.Millisecond)
	m.pass(t)
	m.pass(t)
	m.onlyLoaded(t, levelName(2), "fix_hot")
	if p := m.state(t, hot); p.State != contract.StateApplied || p.Detail != "" {
		t.Fatalf("hot-fix after level 2: %+v", p)
	}
	if r := f.patch(hot); r.Applied != 1 || r.Failed != 0 {
		t.Errorf("server on the hot-fix: %+v", r)
	}
	if s := m.status(t); s.Coverage != agent.UpToDate || !strings.Contains(s.Effective, "stitch level 2 (") || len(s.HotFixes) != 1 {
		t.Errorf("status: %s %s %s", s.Coverage, s.Why, s.Effective)
	}
	// An operator's revert of the hot-fix is one.
	m.k.mu.Lock()
	delete(m.k.loaded, "fix_hot")
	m.k.mu.Unlock()
	m.pass(t)
	m.onlyLoaded(t, levelName(2))
	if p := m.state(t, hot); p.State != contract.StateReverted {
		t.Errorf("hot-fix reverted by hand: %+v", p)
	}
}

func TestMirrorTakesNewestLevel(t *testing.T) {
	f := newFleet(t)
	for n := 1; n <= 3; n++ {
		f.level(t, n)
	}
	f.fix(t, "fix_hot")
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(f.repo.Export(pw)) }()
	mirror := &bundle.Repo{Dir: filepath.Join(t.TempDir(), "mirror")}
	if err := mirror.Import(pr); err != nil {
		t.Fatal(err)
	}
	m := newMachine(t)
	m.Checks = fastChecks
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Repo: "file://" + mirror.Dir, Root: f.root()}); err != nil {
		t.Fatal(err)
	}
	m.pass(t)
	m.onlyLoaded(t, levelName(3), "fix_hot")
	m.pass(t)
	st, err := agent.LoadState(m.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Patches) != 2 || len(m.loads()) != 2 {
		t.Errorf("mirror: %d patches recorded, loads %v", len(st.Patches), m.loads())
	}
	if s := m.status(t); s.Coverage != agent.UpToDate || s.Level != 3 {
		t.Errorf("mirror status: %s %s %s", s.Coverage, s.Why, s.Effective)
	}
}

// A state file written before levels (version 1) is read, and its levels
// learnt from the kept bundles: the newest applied one is live, and the
// only one loaded at boot.
func TestStateBeforeLevels(t *testing.T) {
	f, m := enrolled(t)
	t1 := f.level(t, 1)
	m.pass(t)
	t2 := f.level(t, 2)
	m.pass(t)
	path := filepath.Join(m.Dir, "state.json")
	var raw map[string]any
	b, err := os.ReadFile(path)
	must(err)
	must(json.Unmarshal(b, &raw))
	raw["version"] = 1
	for _, p := range raw["patches"].([]any) {
		p := p.(map[string]any)
		for _, k := range []string{"level", "replace", "superseded", "fixes", "hot_fix"} {
			delete(p, k)
		}
		p["state"] = contract.StateApplied // as an agent that stacked them would have it
	}
	b, err = json.Marshal(raw)
	must(err)
	must(os.WriteFile(path, b, 0o600))

	f.srv.Close()
	m.setBoot("boot-2", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.onlyLoaded(t, levelName(2))
	if p := m.state(t, t1); p.State != contract.StateReverted || !p.Superseded || p.Level == nil {
		t.Errorf("level 1 from the old state: %+v", p)
	}
	if p := m.state(t, t2); p.State != contract.StateApplied || p.Level == nil || p.Level.Number != 2 {
		t.Errorf("level 2 from the old state: %+v", p)
	}
	st, err := agent.LoadState(m.Dir)
	if err != nil || st.Version != 2 {
		t.Errorf("state version %d (%v)", st.Version, err)
	}
}

// A revert order for a level the machine holds superseded (a server that
// blocklists it) takes it off the levels to fall back to.
func TestRevertOrderForSupersededLevel(t *testing.T) {
	f, m := newFleet(t), newMachine(t)
	g := newGateway(t, f)
	m.enrollVia(t, f, g)
	targets := f.levelsTaken(t, m, 3)
	g.set(nil, func(cr *api.CheckInResponse) {
		cr.Actions = append(cr.Actions, api.Action{Target: targets[1], Name: levelName(2), Op: api.OpRevert})
	})
	m.pass(t)
	g.set(nil, nil)
	if p := m.state(t, targets[1]); p.State != contract.StateReverted || p.Superseded {
		t.Fatalf("level 2 after its revert order: %+v", p)
	}
	m.onlyLoaded(t, levelName(3))
	f.operate(targets[2], "blocklist")
	m.pass(t)
	m.onlyLoaded(t, levelName(1))
}

// Level 2 is blocklisted while the machine runs level 3 (no order names
// it: the machine does not run it), then level 3 is: the server offers
// level 1 as the fallback, and the agent goes there, not to the level 2
// it kept.
func TestFallbackSkipsLevelBlocklistedWhileSuperseded(t *testing.T) {
	f, m := enrolled(t)
	targets := f.levelsTaken(t, m, 3)
	f.operate(targets[1], "blocklist")
	m.pass(t)
	m.onlyLoaded(t, levelName(3))
	before := len(m.loads())
	f.operate(targets[2], "blocklist")
	m.pass(t)
	m.onlyLoaded(t, levelName(1))
	if loads := m.loads()[before:]; !slices.Equal(loads, []string{levelName(1)}) {
		t.Errorf("loads after level 3 was blocklisted: %v, want level 1 only", loads)
	}
	if p := m.state(t, targets[1]); p.State != contract.StateReverted || p.Superseded {
		t.Errorf("level 2, blocklisted while superseded: %+v", p)
	}
}
