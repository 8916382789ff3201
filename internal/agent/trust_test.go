package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The tests here are about what the agent believes of the network: the
// real server stands behind a gateway that the test can make lie, as a
// network path the agent does not control can.

// gateway passes everything on to the fleet's server unless a rule
// answers first; orders, when set, rewrites check-in answers.
type gateway struct {
	srv    *httptest.Server
	mu     sync.Mutex
	rule   func(w http.ResponseWriter, r *http.Request) bool // true: answered
	orders func(*api.CheckInResponse)
}

func newGateway(t *testing.T, f *fleet) *gateway {
	t.Helper()
	u, err := url.Parse(f.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	g := &gateway{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		g.mu.Lock()
		orders := g.orders
		g.mu.Unlock()
		if orders == nil || resp.Request.URL.Path != api.PathCheckIn || resp.StatusCode != http.StatusOK {
			return nil
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		var cr api.CheckInResponse
		if err := json.Unmarshal(body, &cr); err != nil {
			return err
		}
		orders(&cr)
		if body, err = json.Marshal(cr); err != nil {
			return err
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
		return nil
	}
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.mu.Lock()
		rule := g.rule
		g.mu.Unlock()
		if rule != nil && rule(w, r) {
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(g.srv.Close)
	return g
}

func (g *gateway) set(rule func(http.ResponseWriter, *http.Request) bool, orders func(*api.CheckInResponse)) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rule, g.orders = rule, orders
}

// enrollVia enrolls m with f's server as reached through g: g's URL is
// the only server the agent knows.
func (m *machine) enrollVia(t *testing.T, f *fleet, g *gateway) {
	t.Helper()
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Server: g.srv.URL, Key: f.key(), Root: f.root(), Hostname: "m"}); err != nil {
		t.Fatal(err)
	}
}

// logged collects the agent's log.
type logged struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logged) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logged) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines are the log lines that hold every one of want.
func (l *logged) lines(want ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		ok := line != ""
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

func captureLog(m *machine) *logged {
	l := &logged{}
	m.Logger = slog.New(slog.NewTextHandler(l, nil))
	return l
}

func markerExists(m *machine, name string) bool {
	_, err := os.Stat(filepath.Join(m.Dir, "loading", name))
	return err == nil
}

// Finding 6: a server (or anyone answering for it) redirects the agent
// to a local file, or its bundle downloads to another host. Neither is
// followed; a redirect within the same scheme and host still is.
func TestRedirectsRefused(t *testing.T) {
	ctx := context.Background()
	f, m := newFleet(t), newMachine(t)
	g := newGateway(t, f)
	m.enrollVia(t, f, g)
	one := f.fix(t, "fix_one")
	m.pass(t)
	if !m.k.isLoaded("fix_one") {
		t.Fatal("fix_one not applied")
	}

	// The check-in answered with a redirect to a file of orders.
	orders := filepath.Join(t.TempDir(), "orders.json")
	must(os.WriteFile(orders, []byte(`{"actions":[{"target":"`+one+`","name":"fix_one","op":"revert"}],"next_checkin_seconds":60}`), 0o644))
	g.set(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != api.PathCheckIn {
			return false
		}
		http.Redirect(w, r, "file://"+orders, http.StatusTemporaryRedirect)
		return true
	}, nil)
	err := m.Once(ctx)
	if !errors.Is(err, agent.ErrServer) || !errors.Is(err, agent.ErrRedirect) {
		t.Errorf("check-in redirected to file://: %v, want ErrServer and ErrRedirect", err)
	}
	if !m.k.isLoaded("fix_one") || m.state(t, one).State != contract.StateApplied {
		t.Fatal("the agent followed a redirect to a local file and obeyed what it read there")
	}

	// A bundle's download sent to another host.
	u, _ := url.Parse(f.srv.URL)
	var elsewhere int
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere++
		httputil.NewSingleHostReverseProxy(u).ServeHTTP(w, r)
	}))
	defer other.Close()
	two := f.fix(t, "fix_two")
	g.set(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/targets/") {
			return false
		}
		http.Redirect(w, r, other.URL+r.URL.Path, http.StatusFound)
		return true
	}, nil)
	err = m.Once(ctx)
	if err == nil || !strings.Contains(err.Error(), "redirect refused") {
		t.Errorf("download redirected to another host: %v, want the redirect refused", err)
	}
	if elsewhere != 0 || m.k.isLoaded("fix_two") {
		t.Fatalf("the download followed a redirect to another host (%d requests there)", elsewhere)
	}
	if m.state(t, two) != nil || f.patch(two).Failed != 0 {
		t.Errorf("a refused redirect counted against the patch: %+v, server %+v", m.state(t, two), f.patch(two))
	}

	// Within the same scheme and host, a redirect is followed.
	g.set(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/targets/") || r.URL.Query().Has("moved") {
			return false
		}
		http.Redirect(w, r, r.URL.Path+"?moved=1", http.StatusFound)
		return true
	}, nil)
	m.pass(t)
	if !m.k.isLoaded("fix_two") {
		t.Error("fix_two not applied through a same-host redirect")
	}
}

// Finding 6: the check-in interval the server sets is clamped: nine
// billion seconds (285 years) and 2^62 (which overflows a Duration)
// become a day, one second becomes a minute.
func TestCheckInIntervalClamped(t *testing.T) {
	f, m := newFleet(t), newMachine(t)
	g := newGateway(t, f)
	m.enrollVia(t, f, g)
	log := captureLog(m)
	for _, c := range []struct {
		secs   int
		lo, hi time.Duration // jitter is ±10 %
	}{
		{9_000_000_000, 21 * time.Hour, 27 * time.Hour},
		{1 << 62, 21 * time.Hour, 27 * time.Hour},
		{1, 50 * time.Second, 70 * time.Second},
		{600, 9 * time.Minute, 11 * time.Minute},
	} {
		g.set(nil, func(r *api.CheckInResponse) { r.NextCheckinSeconds = c.secs })
		before := time.Now()
		m.pass(t)
		st, err := agent.LoadState(m.Dir)
		if err != nil {
			t.Fatal(err)
		}
		if d := st.NextCheckIn.Sub(before); d < c.lo || d > c.hi {
			t.Errorf("server asked for %d s: next check-in in %s, want %s..%s", c.secs, d, c.lo, c.hi)
		}
	}
	if n := len(log.lines("clamped")); n != 3 {
		t.Errorf("%d clamped intervals logged, want 3:\n%s", n, log)
	}
}

// Finding 6: revert orders travel outside TUF. The agent obeys one only
// for a patch this server offered it and that it applied; it logs every
// order, obeyed or ignored, with why.
func TestRevertOrdersOnlyForPatchesFromThisServer(t *testing.T) {
	f, m := enrolled(t)
	three := f.fix(t, "fix_three")
	m.pass(t) // offered by f.srv.URL
	// The agent now talks to a server at another address.
	g := newGateway(t, f)
	repoint(t, m, g.srv.URL, g.srv.URL+"/v1/repo")
	one := f.fix(t, "fix_one")
	// fix_two is refused: its pre-fix code is not this kernel's.
	mtwo := manifest("fix_two", release, buildID)
	mtwo.Objects[0].Functions[0].Name = "version_proc_show"
	m.k.badCode["version_proc_show"] = true
	two := f.publish(mtwo, testutils.StandInModule(t, "fix_two", release, ""))
	m.pass(t)
	if !m.k.isLoaded("fix_one") || !m.k.isLoaded("fix_three") || m.state(t, two).State != contract.StateRefused {
		t.Fatalf("setup: loaded %v, fix_two %+v", m.k.loaded, m.state(t, two))
	}
	log := captureLog(m)
	unknown := release + "/fix_none-0123456789abcdef.stitch"
	g.set(nil, func(r *api.CheckInResponse) {
		for _, target := range []string{three, one, two, unknown} {
			r.Actions = append(r.Actions, api.Action{Target: target, Name: "fix_one", Op: api.OpRevert})
		}
	})
	m.pass(t)
	if m.k.isLoaded("fix_one") || m.state(t, one).State != contract.StateReverted {
		t.Errorf("fix_one, offered by this server, not reverted as ordered: %+v", m.state(t, one))
	}
	if !m.k.isLoaded("fix_three") || m.state(t, three).State != contract.StateApplied {
		t.Errorf("fix_three, offered by another server, reverted on this one's order: %+v", m.state(t, three))
	}
	for _, want := range [][]string{
		{"revert order obeyed", one},
		{"revert order ignored", three, "not offered by this server", f.srv.URL},
		{"revert order ignored", two, "refused, not applied"},
		{"revert order ignored", unknown, "never had"},
	} {
		if len(log.lines(want...)) == 0 {
			t.Errorf("no log line with %q:\n%s", want, log)
		}
	}
}

// State written before the agent recorded each patch's server: its
// patches came from the configured server, whose orders still apply.
func TestRevertOrderForStateWithoutServers(t *testing.T) {
	f, m := enrolled(t)
	target := f.fix(t, "fix_one")
	m.pass(t)
	path := filepath.Join(m.Dir, "state.json")
	var st map[string]any
	b, err := os.ReadFile(path)
	must(err)
	must(json.Unmarshal(b, &st))
	delete(st, "version")
	for _, p := range st["patches"].([]any) {
		delete(p.(map[string]any), "server")
	}
	b, err = json.Marshal(st)
	must(err)
	must(os.WriteFile(path, b, 0o600))
	f.operate(target, "blocklist")
	m.pass(t)
	if m.k.isLoaded("fix_one") || m.state(t, target).State != contract.StateReverted {
		t.Errorf("blocklisted patch from an older state file not reverted: %+v", m.state(t, target))
	}
}

// Finding 5: TUF refusing the repository (a bundle not of its signed
// hash, expired metadata) is the repository's problem: retried, shown in
// the status and the log, and never reported as the patch's failure.
func TestRepositoryRefusalIsNotAPatchFailure(t *testing.T) {
	ctx := context.Background()
	f, m := enrolled(t)
	log := captureLog(m)
	target := f.fix(t, "fix_one")
	path := filepath.Join(f.repo.TargetsDir(), target)
	good, err := os.ReadFile(path)
	must(err)
	bad := bytes.Clone(good)
	bad[len(bad)-600] ^= 1
	must(os.WriteFile(path, bad, 0o644))

	err = m.Once(ctx)
	if !errors.Is(err, agent.ErrRepository) || !errors.Is(err, bundle.ErrVerify) {
		t.Fatalf("tampered bundle: %v, want ErrRepository and bundle.ErrVerify", err)
	}
	if m.k.applies != 0 || m.state(t, target) != nil {
		t.Fatalf("the repository's refusal was taken for the patch's: applies %d, %+v", m.k.applies, m.state(t, target))
	}
	if r := f.patch(target); r.Failed != 0 {
		t.Errorf("the server counted a failure: %+v", r)
	}
	s := m.status(t)
	if s.Coverage != agent.Error || !strings.Contains(s.RepoError, "hash") || !strings.Contains(s.Why, "repository") || len(s.Pending) != 1 {
		t.Errorf("status after the refusal: %s (%s), repo error %q, pending %v", s.Coverage, s.Why, s.RepoError, s.Pending)
	}
	if len(log.lines("patch repository problem", target)) == 0 {
		t.Errorf("the refusal was not logged:\n%s", log)
	}

	// The repository repaired, the next pass applies the patch.
	must(os.WriteFile(path, good, 0o644))
	m.pass(t)
	if !m.k.isLoaded("fix_one") {
		t.Fatal("not applied once the repository was repaired")
	}
	if s := m.status(t); s.RepoError != "" || s.Coverage != agent.UpToDate {
		t.Errorf("status once repaired: %s (%s), repo error %q", s.Coverage, s.Why, s.RepoError)
	}

	// Expired metadata: the machine's clock three days on.
	two := f.fix(t, "fix_two")
	m.Now = func() time.Time { return time.Now().Add(72 * time.Hour) }
	err = m.Once(ctx)
	m.Now = nil
	if !errors.Is(err, agent.ErrRepository) || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired metadata: %v, want ErrRepository", err)
	}
	if m.k.isLoaded("fix_two") || m.state(t, two) != nil || f.patch(two).Failed != 0 {
		t.Fatalf("expired metadata counted against fix_two: %+v, server %+v", m.state(t, two), f.patch(two))
	}
	m.pass(t)
	if !m.k.isLoaded("fix_two") {
		t.Error("fix_two not applied with fresh metadata")
	}
}

// Finding 9: an apply whose transition stalls and whose rollback stalls
// too. The patch is failed for its own reason (rollback-failed) and
// reported so, the crash marker stays while the kernel may hold it, and
// the pass ends in the error; after a reboot the marker goes and the
// patch stays failed, not taken for a crash.
func TestRollbackFailedKeepsMarker(t *testing.T) {
	ctx := context.Background()
	f, m := enrolled(t)
	target := f.fix(t, "fix_one")
	m.k.stallBoth["fix_one"] = true
	log := captureLog(m)

	err := m.Once(ctx)
	if !errors.Is(err, livepatch.ErrRollbackFailed) {
		t.Fatalf("pass with a failed rollback: %v, want ErrRollbackFailed", err)
	}
	p := m.state(t, target)
	if p.State != contract.StateFailed || p.Reason != contract.ReasonRollbackFailed || !strings.Contains(p.Detail, "stuck-new") {
		t.Fatalf("state after a failed rollback: %+v", p)
	}
	if !markerExists(m, "fix_one") {
		t.Fatal("crash marker removed while the kernel may hold the patch")
	}
	if r := f.patch(target); r.Failed != 1 {
		t.Errorf("server: %+v, want the failure", r)
	}
	if st, _ := agent.LoadState(m.Dir); len(st.Outbox) != 0 {
		t.Errorf("report not sent: %+v", st.Outbox)
	}
	if s := m.status(t); s.Coverage != agent.NotCovered || !strings.Contains(s.Why, "partly applied") {
		t.Errorf("status: %s: %s", s.Coverage, s.Why)
	}
	if len(log.lines("could not be taken out", "fix_one")) == 0 {
		t.Errorf("not logged:\n%s", log)
	}

	// Another pass in the same boot: the marker stays, nothing is retried.
	m.pass(t)
	if !markerExists(m, "fix_one") || m.k.applies != 1 {
		t.Errorf("second pass: marker %v, applies %d", markerExists(m, "fix_one"), m.k.applies)
	}

	// The kernel finishes the reverse transition: the marker goes, the
	// patch stays failed.
	m.k.mu.Lock()
	delete(m.k.stuck, "fix_one")
	m.k.mu.Unlock()
	m.pass(t)
	if markerExists(m, "fix_one") || m.state(t, target).Reason != contract.ReasonRollbackFailed {
		t.Errorf("once the kernel let go: marker %v, %+v", markerExists(m, "fix_one"), m.state(t, target))
	}
	if s := m.status(t); strings.Contains(s.Why, "partly applied") {
		t.Errorf("status once the kernel let go: %s", s.Why)
	}

	// A reboot clears the kernel too: the marker goes, and the patch
	// stays failed for its own reason, not loaded, no crash-loop
	// reported.
	// (the marker as the failed rollback left it in boot-1)
	must(os.WriteFile(filepath.Join(m.Dir, "loading", "fix_one"), []byte(`{"target":"`+target+`","boot_id":"boot-1","at":"2026-01-01T00:00:00Z"}`), 0o600))
	m.setBoot("boot-2", "console=ttyS0")
	if err := m.Boot(ctx); err != nil {
		t.Fatal(err)
	}
	p = m.state(t, target)
	if markerExists(m, "fix_one") || m.k.isLoaded("fix_one") || p.Reason != contract.ReasonRollbackFailed {
		t.Errorf("after the reboot: marker %v, loaded %v, %+v", markerExists(m, "fix_one"), m.k.isLoaded("fix_one"), p)
	}
	if st, _ := agent.LoadState(m.Dir); len(st.Outbox) != 0 {
		t.Errorf("reported again after the reboot: %+v", st.Outbox)
	}
}

// Finding 9, the watch's side: the kernel warns after a patch, and
// reverting it fails. That too is rollback-failed, with the warning in
// the detail and the marker in place.
func TestRevertAfterTroubleFails(t *testing.T) {
	// Checks slow enough for the watch window to outlast the trouble.
	f, m := newFleetWith(t, policy(300*time.Millisecond, 400*time.Millisecond, 500*time.Millisecond)), newMachine(t)
	m.enroll(t, f)
	bad := f.fix(t, "fix_bad")
	m.k.revertErr["fix_bad"] = &livepatch.TransitionError{Patch: "fix_bad", Holders: []livepatch.Task{{PID: 11, Comm: "stuck-new"}}}
	go func() {
		for !m.k.isLoaded("fix_bad") {
			time.Sleep(5 * time.Millisecond)
		}
		m.log.write("WARNING: CPU: 0 PID: 1 at lp.c:9 bad_show+0x15/0x30 [fix_bad]")
	}()
	err := m.Once(context.Background())
	if !errors.Is(err, livepatch.ErrRollbackFailed) {
		t.Fatalf("pass whose revert failed: %v, want ErrRollbackFailed", err)
	}
	p := m.state(t, bad)
	if p.State != contract.StateFailed || p.Reason != contract.ReasonRollbackFailed || !strings.Contains(p.Detail, "[fix_bad]") || !strings.Contains(p.Detail, "stuck-new") {
		t.Fatalf("state: %+v", p)
	}
	if !markerExists(m, "fix_bad") {
		t.Error("crash marker removed while the kernel may hold the patch")
	}
	if r := f.patch(bad); r.Failed != 1 {
		t.Errorf("server: %+v", r)
	}
}
