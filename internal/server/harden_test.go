package server

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// countingWriter counts the bytes a log handler writes.
type countingWriter struct{ n atomic.Int64 }

func (w *countingWriter) Write(p []byte) (int, error) { w.n.Add(int64(len(p))); return len(p), nil }

// Finding 3: one machine sending thousands of failure reports in a few
// seconds is throttled (429 with Retry-After), its failure is logged
// once with the detail cut short, and another machine is not held back.
// Before the fix every report was taken and logged with its 4 KB detail.
func TestReportFloodIsThrottledAndTheLogStaysSmall(t *testing.T) {
	var logged countingWriter
	e := newEnv(t, func(s *Server) {
		s.Policy = onePolicy
		s.Log = slog.New(slog.NewJSONHandler(&logged, nil))
	})
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if err := admin.Do(ctx, "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	ms := e.enroll(t, 2, "")
	target := publish(t, e.repo, "stitch_fix", simBuildID)
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	if acts := checkIn(t, ms[0]); len(acts) != 1 {
		t.Fatalf("the patch was not offered: %+v", acts)
	}

	report := js(api.Health{Target: target, Name: "stitch_fix", Check: contract.DefaultSchedule[0].Name, Reason: contract.ReasonOops, Detail: strings.Repeat("x", 4000)})
	before := logged.n.Load()
	const n = 3000
	codes := map[int]int{}
	retryAfter := ""
	start := time.Now()
	for range n {
		req, _ := http.NewRequest("POST", e.srv.URL+api.PathHealth, strings.NewReader(string(report)))
		req.Header.Set("Authorization", "Bearer "+ms[0].Token)
		resp, err := e.srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes[resp.StatusCode]++
		if resp.StatusCode == http.StatusTooManyRequests {
			retryAfter = resp.Header.Get("Retry-After")
		}
	}
	elapsed := time.Since(start)
	logBytes := logged.n.Load() - before
	t.Logf("%d reports in %s: %v; %d bytes logged", n, elapsed.Round(time.Millisecond), codes, logBytes)

	lim := DefaultLimits
	if most := lim.ReportBurst + int(elapsed.Seconds()*lim.ReportRate) + 1; codes[http.StatusNoContent] > most {
		t.Errorf("%d reports taken in %s, want at most %d", codes[http.StatusNoContent], elapsed, most)
	}
	if codes[http.StatusTooManyRequests] < n-lim.ReportBurst-int(elapsed.Seconds()*lim.ReportRate)-1 {
		t.Errorf("%d reports throttled of %d", codes[http.StatusTooManyRequests], n)
	}
	if s, err := strconv.Atoi(retryAfter); err != nil || s < 1 {
		t.Errorf("Retry-After %q: want whole seconds", retryAfter)
	}
	if logBytes > 2048 {
		t.Errorf("the flood wrote %d bytes of log, want at most 2 KiB", logBytes)
	}
	// Another machine has its own budget.
	checkIn(t, ms[1])
}

// The limiter's memory is bounded: past the bound, idle machines are
// forgotten first.
func TestReportLimiterIsBounded(t *testing.T) {
	l := newReportLimiter(1, 2, 8)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range 100 {
		if v := l.take(fmt.Sprint("m", i), now); !v.ok {
			t.Fatalf("a new machine was refused: %+v", v)
		}
		if len(l.buckets) > 8 {
			t.Fatalf("%d buckets, bound 8", len(l.buckets))
		}
	}
	// A busy machine keeps its bucket (and its log suppression) while
	// refilled ones go.
	busy := "busy"
	l.take(busy, now)
	l.take(busy, now)
	if v := l.take(busy, now); v.ok || v.retry != time.Second || !v.log || v.refused != 1 {
		t.Fatalf("the third report at once: %+v, want refused for 1s and logged", v)
	}
	if v := l.take(busy, now.Add(time.Second/2)); v.ok || v.log {
		t.Fatalf("half a second later: %+v, want refused, not logged again", v)
	}
	later := now.Add(10 * time.Second)
	for i := range 7 {
		l.take(fmt.Sprint("n", i), later)
	}
	if _, kept := l.buckets[busy]; !kept || len(l.buckets) > 8 {
		t.Fatalf("after eviction: busy kept %v, %d buckets", kept, len(l.buckets))
	}
	if v := l.take(busy, later); !v.ok {
		t.Fatalf("ten seconds later the busy machine has tokens again: %+v", v)
	}
}

// startServer serves s on a loopback listener with Serve's own
// http.Server (its timeouts and connection limit) until the test ends.
func startServer(t *testing.T, s *Server) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ServeListener(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return l.Addr().String()
}

func newServer(t *testing.T, lim Limits) (*Server, *bundle.Repo) {
	t.Helper()
	st, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	repo := &bundle.Repo{Dir: t.TempDir()}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	return &Server{Store: st, Repo: repo, AdminToken: "admin-secret", Log: slog.New(slog.DiscardHandler), Limits: lim}, repo
}

// closedWithin says whether the server closes c within d (reading and
// discarding whatever it answers first).
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// Finding 3: a client trickling a request body and an idle keep-alive
// connection are closed by the server; before the fix only the headers
// had a timeout, so both stayed open for good.
func TestSlowAndIdleConnectionsAreClosed(t *testing.T) {
	s, _ := newServer(t, Limits{ReadTimeout: 300 * time.Millisecond, IdleTimeout: 300 * time.Millisecond})
	addr := startServer(t, s)

	trickle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer trickle.Close()
	fmt.Fprintf(trickle, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{", api.PathEnroll)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				if _, err := trickle.Write([]byte(" ")); err != nil {
					return
				}
			}
		}
	}()
	if !closedWithin(trickle, 3*time.Second) {
		t.Error("a connection trickling its body was still open after 3s (read timeout 300ms)")
	}

	idle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	fmt.Fprintf(idle, "GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(idle), nil)
	if err != nil || resp.StatusCode != 404 || resp.Close {
		t.Fatalf("keep-alive request: %v %+v", err, resp)
	}
	if !closedWithin(idle, 3*time.Second) {
		t.Error("an idle keep-alive connection was still open after 3s (idle timeout 300ms)")
	}
}

// Finding 3: past MaxConns, a new connection waits until one closes;
// before the fix there was no limit.
func TestConnectionLimit(t *testing.T) {
	s, _ := newServer(t, Limits{ReadTimeout: 10 * time.Second, MaxConns: 2})
	addr := startServer(t, s)
	var holders []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		holders = append(holders, c)
	}
	time.Sleep(200 * time.Millisecond) // the server accepts both
	get := func(timeout time.Duration) error {
		hc := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := hc.Get("http://" + addr + "/v1/nope")
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get(500 * time.Millisecond); err == nil {
		t.Fatal("a third connection was served while two held the limit of 2")
	}
	holders[0].Close()
	if err := get(5 * time.Second); err != nil {
		t.Fatalf("after one closed, a new connection was not served: %v", err)
	}
}

// The API's write timeout does not cut a bundle short on a slow link: a
// repository file has the download timeout. The same slow reader is cut
// off by a download timeout shorter than its download, which shows it
// is slow enough to tell.
func TestSlowDownloadHasTheDownloadTimeout(t *testing.T) {
	get := func(lim Limits) (int, error) {
		s, repo := newServer(t, lim)
		data, err := bundle.Pack(testManifest("stitch_big", simRelease, simBuildID), testutils.StandInModule(t, "stitch_big", simRelease, strings.Repeat("x", 8<<20)))
		if err != nil {
			t.Fatal(err)
		}
		target, err := repo.Publish(data)
		if err != nil {
			t.Fatal(err)
		}
		addr := startServer(t, s)
		// A small receive buffer, so the server's writes wait for the reader.
		d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10) })
		}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /v1/repo/targets/%s HTTP/1.1\r\nHost: x\r\n\r\n", target)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		total, buf := 0, make([]byte, 128<<10)
		for {
			time.Sleep(20 * time.Millisecond)
			n, err := io.ReadFull(resp.Body, buf)
			total += n
			if err == io.EOF || err == io.ErrUnexpectedEOF && total == len(data) {
				return total, nil
			}
			if err != nil {
				return total, err
			}
		}
	}
	if n, err := get(Limits{WriteTimeout: 200 * time.Millisecond, DownloadTimeout: time.Minute}); err != nil {
		t.Fatalf("a slow download with a 200ms write timeout and a minute's download timeout: %d bytes, %v", n, err)
	}
	if n, err := get(Limits{WriteTimeout: time.Minute, DownloadTimeout: 300 * time.Millisecond}); err == nil {
		t.Fatalf("the slow reader got all %d bytes within a 300ms download timeout: it is not slow enough to test anything", n)
	}
}

// Finding 8: the admin token's check takes as long whatever the length
// of the guess relative to the token's. Comparing the strings themselves
// with ConstantTimeCompare (before the fix) returns at once on another
// length: the control below shows the measurement can tell.
func TestAdminTokenCheckHidesTheLength(t *testing.T) {
	secret := strings.Repeat("s", 1<<20)
	want := sha256.Sum256([]byte(secret))
	sameLen, otherLen := []byte(strings.Repeat("x", len(secret))), []byte(strings.Repeat("x", len(secret)+1))
	timed := func(f func([]byte) bool, guess []byte) time.Duration {
		start := time.Now()
		if f(guess) {
			t.Fatal("a wrong token matched")
		}
		return time.Since(start)
	}
	ratio := func(f func([]byte) bool) float64 {
		// The fastest of each, measured in turns, each first every other
		// turn: a spell of load on a shared machine slows both alike, and
		// the second of a turn is not always the same one (it ran
		// measurably slower).
		a, b := time.Hour, time.Hour
		for i := range 100 { // more turns: a better chance of an unloaded one for each
			if i%2 == 0 {
				a = min(a, timed(f, sameLen))
				b = min(b, timed(f, otherLen))
			} else {
				b = min(b, timed(f, otherLen))
				a = min(a, timed(f, sameLen))
			}
		}
		return float64(a) / float64(max(b, 1))
	}
	raw := ratio(func(g []byte) bool { return subtle.ConstantTimeCompare(g, []byte(secret)) == 1 })
	hashed := ratio(func(g []byte) bool { return sameSecret(string(g), want) })
	t.Logf("same length / other length: raw compare %.1f, hashed %.2f", raw, hashed)
	if raw < 3 {
		t.Skipf("the raw comparison's ratio is %.1f: this machine's timing cannot tell lengths apart", raw)
	}
	if hashed > 1.5 || hashed < 1/1.5 {
		t.Errorf("the admin token check takes %.2f times as long for a guess of the token's length: it leaks the length", hashed)
	}
	if !sameSecret("right", sha256.Sum256([]byte("right"))) || sameSecret("", sha256.Sum256([]byte("right"))) {
		t.Error("sameSecret is wrong about equal and different secrets")
	}
}

// Finding 8: no directory of the repository is listed; its files are
// still served.
func TestRepositoryDirectoriesAreNotListed(t *testing.T) {
	e := newEnv(t)
	target := publish(t, e.repo, "stitch_fix", simBuildID)
	release := strings.Split(target, "/")[0]
	for _, path := range []string{"/v1/repo/metadata/", "/v1/repo/targets/", "/v1/repo/targets/" + release + "/", "/v1/repo/targets/" + release} {
		resp, err := e.srv.Client().Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound || strings.Contains(string(body), ".stitch") || strings.Contains(string(body), ".json") {
			t.Errorf("GET %s: %d %q, want 404 and no listing", path, resp.StatusCode, body)
		}
	}
	for _, path := range []string{"/v1/repo/metadata/timestamp.json", "/v1/repo/targets/" + target} {
		if c := e.call(t, "GET", path, "", nil, nil); c != http.StatusOK {
			t.Errorf("GET %s: %d, want 200", path, c)
		}
	}
}

// Finding 1 (the group rule): machines get their key's group. Three
// machines on a free-tier key asking for canaries are refused, and
// change nothing; before the fix they joined it.
func TestEnrollmentGroupIsTheKeys(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if err := admin.Do(ctx, "PUT", "/v1/admin/groups/canaries", api.Group{Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	var key api.KeyResponse
	if err := admin.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{}, &key); err != nil || key.MaxMachines != FreeTierMachines {
		t.Fatalf("free-tier key: %+v %v", key, err)
	}
	c := &api.Client{BaseURL: e.srv.URL}
	for i := range 3 {
		_, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: fmt.Sprint("rogue", i), Group: "canaries"})
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusForbidden || !strings.Contains(se.Message, `group "default"`) {
			t.Fatalf("machine %d asking for canaries: %v, want 403 naming the key's group", i, err)
		}
	}
	if n, _ := e.st.CountMachines(ctx, key.ID); n != 0 {
		t.Fatalf("%d machines enrolled by refused requests", n)
	}
	for _, group := range []string{"", "default"} {
		r, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "web", Group: group})
		if err != nil {
			t.Fatalf("group %q: %v", group, err)
		}
		me, err := (&api.Client{BaseURL: e.srv.URL, Token: r.Token}).Self(ctx)
		if err != nil || me.Group != "default" {
			t.Fatalf("group %q: enrolled into %+v %v", group, me, err)
		}
	}
}

// Finding 7: keys are listed and revoked, machines deleted (the token
// fails at once, the reports leave the rollout), and a host enrolling
// again replaces its record without taking a slot. Before the fix none
// of these existed and a re-enrolled host was a second machine.
func TestRevocationAndReEnrollment(t *testing.T) {
	pol := onePolicy
	pol.MaxFailures = 5 // one failure stays within the tolerance
	e := newEnv(t, func(s *Server) { s.Policy = pol })
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	admin.Do(ctx, "PUT", "/v1/admin/groups/default", api.Group{Channel: "canary"}, nil)
	var key api.KeyResponse
	if err := admin.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: 2}, &key); err != nil {
		t.Fatal(err)
	}
	hostA, hostB := strings.Repeat("a", 32), strings.Repeat("b", 64)
	enroll := func(host, name string) (*api.Client, string, error) {
		c := &api.Client{BaseURL: e.srv.URL}
		r, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: name, HostID: host})
		c.Token = r.Token
		return c, r.MachineID, err
	}
	a, idA, err := enroll(hostA, "a")
	if err != nil {
		t.Fatal(err)
	}
	b, idB, err := enroll(hostB, "b")
	if err != nil {
		t.Fatal(err)
	}
	target := publish(t, e.repo, "stitch_fix", simBuildID)
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	checkIn(t, a)
	checkIn(t, b)
	if err := a.Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.CheckApply, Reason: contract.ReasonOops}); err != nil {
		t.Fatal(err)
	}
	if err := b.Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.CheckApply, Healthy: true}); err != nil {
		t.Fatal(err)
	}
	patchReport := func() api.PatchReport {
		var reps []api.PatchReport
		if err := admin.Do(ctx, "GET", "/v1/admin/reports/patches", nil, &reps); err != nil || len(reps) != 1 {
			t.Fatalf("patch report: %+v %v", reps, err)
		}
		return reps[0]
	}
	if r := patchReport(); r.Failed != 1 || r.Applied != 1 {
		t.Fatalf("before the deletion: %+v", r)
	}

	// Machine a deleted: its token fails at once, its failure is gone.
	if err := admin.DeleteMachine(ctx, idA); err != nil {
		t.Fatal(err)
	}
	if _, err := a.CheckIn(ctx, api.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID}); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("a deleted machine checked in: %v", err)
	}
	if err := a.Health(ctx, api.Health{Target: target, Name: "stitch_fix", Check: contract.DefaultSchedule[0].Name, Reason: contract.ReasonOops}); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("a deleted machine reported: %v", err)
	}
	if r := patchReport(); r.Failed != 0 || r.Applied != 1 {
		t.Fatalf("a deleted machine's failure still counts: %+v", r)
	}
	var se *api.StatusError
	if err := admin.DeleteMachine(ctx, idA); !errors.As(err, &se) || se.Code != 404 {
		t.Fatalf("deleting it again: %v", err)
	}

	// Host b enrolls again: the same record, a new token, the old dead.
	b2, idB2, err := enroll(hostB, "b-reinstalled")
	if err != nil || idB2 != idB {
		t.Fatalf("re-enrollment: %s %v, want the record %s", idB2, err, idB)
	}
	if _, err := b.Self(ctx); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("the replaced token still works: %v", err)
	}
	if me, err := b2.Self(ctx); err != nil || me.Hostname != "b-reinstalled" || me.ID != idB {
		t.Fatalf("re-enrolled machine: %+v %v", me, err)
	}
	if r := patchReport(); r.Applied != 1 {
		t.Fatalf("the re-enrolled host's rollout record went: %+v", r)
	}
	keys, err := admin.Keys(ctx)
	if err != nil || len(keys) != 1 || keys[0].ID != key.ID || keys[0].Machines != 1 || keys[0].MaxMachines != 2 || !keys[0].RevokedAt.IsZero() {
		t.Fatalf("keys: %+v %v", keys, err)
	}
	var machines []api.MachineReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/machines", nil, &machines); err != nil || len(machines) != 1 || machines[0].KeyID != key.ID {
		t.Fatalf("machines report: %+v %v", machines, err)
	}
	// The freed slot takes a new host; the next is over the limit, and
	// the error names the command that frees a slot.
	if _, _, err := enroll(strings.Repeat("c", 32), "c"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := enroll(strings.Repeat("d", 32), "d"); !errors.As(err, &se) || se.Code != 403 || !strings.Contains(se.Message, "stitch fleet delete MACHINE") {
		t.Fatalf("over the limit: %v, want 403 naming `stitch fleet delete`", err)
	}
	if _, _, err := enroll("not-hex", "e"); !errors.As(err, &se) || se.Code != 400 {
		t.Fatalf("bad host id: %v, want 400", err)
	}

	// Revoked: no enrollment, not even of a known host; machines stay.
	rev, err := admin.RevokeKey(ctx, key.ID, api.RevokeRequest{})
	if err != nil || rev.Key.RevokedAt.IsZero() || rev.DeletedMachines != 0 {
		t.Fatalf("revoke: %+v %v", rev, err)
	}
	if _, _, err := enroll(hostB, "b"); !errors.As(err, &se) || se.Code != 403 || !strings.Contains(se.Message, "revoked") {
		t.Fatalf("enrollment with a revoked key: %v", err)
	}
	if _, err := b2.Self(ctx); err != nil {
		t.Fatalf("a revoked key's machine lost its token: %v", err)
	}
	if _, err := b2.Keys(ctx); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("a machine listed the keys: %v", err)
	}
	if _, err := admin.RevokeKey(ctx, "k-nope", api.RevokeRequest{}); !errors.As(err, &se) || se.Code != 404 {
		t.Fatalf("revoke an unknown key: %v", err)
	}
	rev, err = admin.RevokeKey(ctx, key.ID, api.RevokeRequest{DeleteMachines: true})
	if err != nil || rev.DeletedMachines != 2 {
		t.Fatalf("revoke with its machines: %+v %v", rev, err)
	}
	if _, err := b2.Self(ctx); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("a deleted machine's token still works: %v", err)
	}
	if r := patchReport(); r.Applied != 0 || r.Failed != 0 {
		t.Fatalf("deleted machines still count: %+v", r)
	}
}
