package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The tests in this file drive the agent's logic against a real server
// and TUF repository, with a stand-in kernel (fakeKernel). The same flows
// run on the real kernel in the VM (vm_test.go).

const (
	release = "6.1.0-54-amd64"
	buildID = "0123456789abcdef0123456789abcdef01234567"
)

// fakeKernel holds patches by name, as /sys/kernel/livepatch does.
type fakeKernel struct {
	mu      sync.Mutex
	loaded  map[string]bool
	taint   uint64
	badCode map[string]bool // function names whose running code differs
	applies int
	// stuck are patches whose apply stalled and whose rollback stalled
	// too: disabled, in their reverse transition. Apply of a name in
	// stallBoth ends so; Revert of a name in revertErr fails with it.
	stuck     map[string]bool
	stallBoth map[string]bool
	revertErr map[string]error
	order     []string // the modules loaded, in order
	// noLivepatch is a kernel built without CONFIG_LIVEPATCH.
	noLivepatch bool
}

func newKernel() *fakeKernel {
	return &fakeKernel{loaded: map[string]bool{}, badCode: map[string]bool{}, stuck: map[string]bool{}, stallBoth: map[string]bool{}, revertErr: map[string]error{}}
}

func (k *fakeKernel) Status() (*livepatch.Status, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	s := &livepatch.Status{Release: release, BuildID: buildID, Livepatch: !k.noLivepatch}
	for n := range k.loaded {
		s.Patches = append(s.Patches, livepatch.Patch{Name: n, Enabled: true})
	}
	for n := range k.stuck {
		s.Patches = append(s.Patches, livepatch.Patch{Name: n, Transition: true})
	}
	return s, nil
}

func (k *fakeKernel) Apply(ctx context.Context, path string, o livepatch.ApplyOptions) (*kmod.Module, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	name := strings.TrimSuffix(filepath.Base(path), ".ko")
	if k.loaded[name] {
		return nil, livepatch.ErrAlreadyLoaded
	}
	for _, c := range o.Expect.Code {
		if k.badCode[c.Name] {
			return nil, fmt.Errorf("%w: %s differs", livepatch.ErrWrongKernel, c.Name)
		}
	}
	k.applies++
	if k.stallBoth[name] {
		k.stuck[name] = true
		stall := &livepatch.TransitionError{Patch: name, Enabling: true, Holders: []livepatch.Task{{PID: 10, Comm: "stuck-old"}}}
		back := &livepatch.TransitionError{Patch: name, Holders: []livepatch.Task{{PID: 11, Comm: "stuck-new"}}}
		return &kmod.Module{Name: name}, &livepatch.RollbackError{Patch: name, Cause: stall, Err: back, Reason: back.Error(),
			Still: &livepatch.Patch{Name: name, Transition: true}, ModuleLoaded: true, Holders: back.Holders}
	}
	if levelModule.MatchString(name) {
		// A level is cumulative (klp replace): once its transition is
		// over it is the only patch, and livepatch.Apply unloads the
		// modules of those it replaced.
		clear(k.loaded)
	}
	k.loaded[name] = true
	k.order = append(k.order, name)
	return &kmod.Module{Name: name}, nil
}

// levelModule matches a level's name (contract.LevelName).
var levelModule = regexp.MustCompile(`_l[0-9]+$`)

func (k *fakeKernel) Revert(ctx context.Context, name string, o livepatch.ApplyOptions) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.loaded[name] {
		return livepatch.ErrUnknownPatch
	}
	if err := k.revertErr[name]; err != nil {
		delete(k.loaded, name)
		k.stuck[name] = true
		return err
	}
	delete(k.loaded, name)
	return nil
}

func (k *fakeKernel) Taint() (livepatch.Taint, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return livepatch.DecodeTaint(k.taint), nil
}

func (k *fakeKernel) isLoaded(name string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.loaded[name]
}

// fakeLog is a kernel log a test writes to.
type fakeLog struct {
	mu    sync.Mutex
	lines string
}

func (l *fakeLog) ReadNew() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.lines
	l.lines = ""
	return s
}

func (l *fakeLog) write(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines += s + "\n"
}

// machine is an agent on a stand-in kernel with its own /proc (boot id
// and command line) and a fast health-check schedule.
type machine struct {
	*agent.Agent
	k    *fakeKernel
	log  *fakeLog
	proc string
}

// fastChecks is the schedule of an agent without a server (a mirror);
// with one, the agent goes by the server's (newFleet's policy).
var fastChecks = contract.NewSchedule(40*time.Millisecond, 80*time.Millisecond, 120*time.Millisecond)

func newMachine(t *testing.T) *machine {
	t.Helper()
	m := &machine{k: newKernel(), log: &fakeLog{}, proc: t.TempDir()}
	m.Agent = &agent.Agent{Dir: t.TempDir(), Kernel: m.k, Log: m.log, Root: m.proc, Version: "test",
		Sleep: func(ctx context.Context, d time.Duration) error {
			time.Sleep(min(d, 20*time.Millisecond))
			return ctx.Err()
		}}
	m.setBoot("boot-1", "console=ttyS0")
	return m
}

// setBoot simulates a boot: a new boot id, a command line, nothing loaded.
func (m *machine) setBoot(id, cmdline string) {
	must(os.MkdirAll(filepath.Join(m.proc, "proc/sys/kernel/random"), 0o755))
	must(os.WriteFile(filepath.Join(m.proc, "proc/sys/kernel/random/boot_id"), []byte(id+"\n"), 0o644))
	must(os.WriteFile(filepath.Join(m.proc, "proc/cmdline"), []byte(cmdline+"\n"), 0o644))
	m.k.mu.Lock()
	m.k.loaded, m.k.stuck = map[string]bool{}, map[string]bool{}
	m.k.mu.Unlock()
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// enrolled starts a fleet and enrolls a machine with it.
func enrolled(t *testing.T) (*fleet, *machine) {
	t.Helper()
	f, m := newFleet(t), newMachine(t)
	m.enroll(t, f)
	return f, m
}

// fix publishes a patch named name for the machines' kernel.
func (f *fleet) fix(t *testing.T, name string, cves ...string) string {
	t.Helper()
	return f.publish(manifest(name, release, buildID, cves...), testutils.StandInModule(t, name, release, ""))
}

func (m *machine) enroll(t *testing.T, f *fleet) {
	t.Helper()
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root(), Hostname: "m"}); err != nil {
		t.Fatal(err)
	}
}

// pass runs one agent pass that must succeed.
func (m *machine) pass(t *testing.T) {
	t.Helper()
	if err := m.Once(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func (m *machine) state(t *testing.T, target string) *agent.Patch {
	t.Helper()
	st, err := agent.LoadState(m.Dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Patches {
		if p.Target == target {
			return p
		}
	}
	return nil
}

func (m *machine) status(t *testing.T) *agent.Status {
	t.Helper()
	ks, _ := m.k.Status()
	s, err := m.Status(ks)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestApplyReportAndRevertOrder(t *testing.T) {
	f, m := enrolled(t)
	if s := m.status(t); s.Coverage != agent.Error {
		t.Errorf("before any check-in: coverage %s, want error (%s)", s.Coverage, s.Why)
	}
	target := f.fix(t, "fix_one", "CVE-2024-0001")
	other := f.publish(manifest("fix_other", release, "ffffffffffffffffffffffffffffffffffffffff"), testutils.StandInModule(t, "fix_other", release, ""))

	m.pass(t)
	if !m.k.isLoaded("fix_one") {
		t.Fatal("fix_one not applied")
	}
	p := m.state(t, target)
	// The checks are named by the server's schedule (40ms...), not the
	// default one (1m...): the agent went by what the server said.
	if p.State != contract.StateApplied || !hasAll(p.Checks, contract.CheckApply, "40ms") {
		t.Fatalf("state after the pass: %+v", p)
	}
	if m.state(t, other) != nil {
		t.Error("a patch for another build of the kernel was handled")
	}
	s := m.status(t)
	if s.Coverage != agent.UpToDate || s.Level != 1 || s.Effective != release+" + stitch level 1" || len(s.FixedCVEs) != 1 {
		t.Errorf("status: %+v", s)
	}
	// The 5m and 15m checks fall due later, and are reported by the next pass.
	time.Sleep(200 * time.Millisecond)
	m.pass(t)
	if r := f.patch(target); r.Applied != 1 || r.Healthy != 1 {
		t.Errorf("server sees %+v, want 1 applied and healthy", r)
	}

	f.operate(target, "blocklist")
	m.pass(t)
	if m.k.isLoaded("fix_one") {
		t.Fatal("blocklisted patch still loaded")
	}
	if p := m.state(t, target); p.State != contract.StateReverted {
		t.Errorf("after the revert order: %+v", p)
	}
	if s := m.status(t); s.Level != 0 || s.Effective != release {
		t.Errorf("status after revert: %+v", s)
	}
}

func hasAll(have []string, want ...string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

func TestServerDownKeepsPatchesAndBacksOff(t *testing.T) {
	f, m := enrolled(t)
	target := f.fix(t, "fix_one")
	m.pass(t)
	f.srv.Close()
	err := m.Once(context.Background())
	if !errors.Is(err, agent.ErrServer) {
		t.Fatalf("with the server down: %v, want ErrServer", err)
	}
	if !m.k.isLoaded("fix_one") || m.state(t, target).State != contract.StateApplied {
		t.Error("the agent dropped its patch when the server went away")
	}
	if s := m.status(t); s.Coverage != agent.Error || !strings.Contains(s.Why, "check-in failed") {
		t.Errorf("status with the server down: %s: %s", s.Coverage, s.Why)
	}

	// The daemon retries with growing waits (30 s doubling up to the
	// interval, an hour) and keeps its patches; over two hours of a
	// failing server that is about 8 attempts, not the 240 of a fixed 30 s.
	var attempts atomic.Int32
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attempts.Add(1)
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer down.Close()
	repoint(t, m, down.URL, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	now := time.Now()
	end := now.Add(2 * time.Hour)
	m.Now = func() time.Time { return now }
	m.Sleep = func(c context.Context, d time.Duration) error {
		now = now.Add(d)
		if now.After(end) {
			cancel()
		}
		return ctx.Err()
	}
	if err := m.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v", err)
	}
	if !m.k.isLoaded("fix_one") {
		t.Error("patch dropped while the server was down")
	}
	if n := attempts.Load(); n < 5 || n > 12 {
		t.Errorf("%d check-in attempts in two hours of a down server, want about 8", n)
	}
}

func TestSlowServerTimesOut(t *testing.T) {
	_, m := enrolled(t)
	block := make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
	defer slow.Close()
	defer close(block)
	repoint(t, m, slow.URL, "")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := m.Once(ctx); !errors.Is(err, agent.ErrServer) {
		t.Fatalf("slow server: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a slow server held the pass %s", d)
	}
}

// repoint edits the agent's configuration to use other URLs.
func repoint(t *testing.T, m *machine, server, repo string) {
	t.Helper()
	path := filepath.Join(m.Dir, "config.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cfg agent.Config
	must(json.Unmarshal(b, &cfg))
	if server != "" {
		cfg.Server = server
	}
	if repo != "" {
		cfg.Repo = repo
	}
	b, err = json.Marshal(cfg)
	must(err)
	must(os.WriteFile(path, b, 0o600))
}

func TestTruncatedDownloadIsRetried(t *testing.T) {
	f, m := enrolled(t)
	target := f.publish(manifest("fix_one", release, buildID), testutils.StandInModule(t, "fix_one", release, strings.Repeat("x", 64<<10)))
	// A proxy that cuts the first bundle download short: the right
	// Content-Length, half the body, then the connection closed.
	u, _ := url.Parse(f.srv.URL)
	var cut atomic.Bool
	rp := httputil.NewSingleHostReverseProxy(u)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.Contains(r.URL.Path, "/targets/") || !cut.CompareAndSwap(false, true) {
			rp.ServeHTTP(w, r)
			return
		}
		resp, err := http.Get(f.srv.URL + r.URL.Path)
		if err != nil {
			panic(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		c, buf, err := w.(http.Hijacker).Hijack()
		if err != nil {
			panic(err)
		}
		fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", len(body))
		buf.Write(body[:len(body)/2])
		buf.Flush()
		c.Close()
	}))
	defer proxy.Close()
	repoint(t, m, proxy.URL, proxy.URL+"/v1/repo")
	if err := m.Once(context.Background()); !errors.Is(err, agent.ErrServer) {
		t.Fatalf("truncated download: %v, want ErrServer (retry later)", err)
	}
	if m.k.applies != 0 || m.state(t, target) != nil {
		t.Fatal("a truncated download was acted on")
	}
	if s := m.status(t); len(s.Pending) != 1 {
		t.Errorf("pending after the cut: %v", s.Pending)
	}
	m.pass(t)
	if !m.k.isLoaded("fix_one") {
		t.Error("not applied on the retry")
	}
}

func TestFingerprintMismatchRefused(t *testing.T) {
	f, m := enrolled(t)
	m.k.badCode["cmdline_proc_show"] = true
	target := f.fix(t, "fix_one")
	m.pass(t)
	p := m.state(t, target)
	if m.k.isLoaded("fix_one") || p.State != contract.StateRefused || p.Reason != contract.ReasonFingerprintMismatch {
		t.Fatalf("state %+v", p)
	}
	if _, err := os.Stat(filepath.Join(m.Dir, "loading", "fix_one")); err == nil {
		t.Error("crash marker left for a patch never loaded")
	}
	// Refused once, it is not offered again.
	m.pass(t)
	if m.k.applies != 0 {
		t.Error("refused patch tried again")
	}
}

func TestTroubleAfterApplyReverts(t *testing.T) {
	// Slower checks than newFleet's: the watch window must outlast the
	// trouble below.
	f, m := newFleetWith(t, policy(300*time.Millisecond, 400*time.Millisecond, 500*time.Millisecond)), newMachine(t)
	m.enroll(t, f)
	good := f.fix(t, "fix_good")
	m.pass(t)
	bad := f.fix(t, "fix_bad")
	go func() {
		for !m.k.isLoaded("fix_bad") {
			time.Sleep(5 * time.Millisecond)
		}
		m.log.write("WARNING: CPU: 0 PID: 1 at lp.c:9 bad_show+0x15/0x30 [fix_bad]")
		m.k.mu.Lock()
		m.k.taint |= 1 << 9
		m.k.mu.Unlock()
	}()
	m.pass(t)
	p := m.state(t, bad)
	if m.k.isLoaded("fix_bad") || p.State != contract.StateFailed || p.Reason != contract.ReasonKernelWarning || !strings.Contains(p.Detail, "[fix_bad]") {
		t.Fatalf("warning after apply: loaded %v, state %+v", m.k.isLoaded("fix_bad"), p)
	}
	if !m.k.isLoaded("fix_good") || m.state(t, good).State != contract.StateApplied {
		t.Error("a patch the warning does not name was reverted")
	}
	if r := f.patch(bad); r.Failed != 1 {
		t.Errorf("server: %+v", r)
	}
}

func TestCrashMarkerStopsReload(t *testing.T) {
	f, m := enrolled(t)
	target := f.fix(t, "fix_one")
	m.pass(t)

	// A reboot: the patch comes back from the cache, with no network.
	f.srv.Close()
	m.setBoot("boot-2", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !m.k.isLoaded("fix_one") {
		t.Fatal("not reloaded at boot")
	}
	// The machine dies within the patch's first check: the marker stays.
	if _, err := os.Stat(filepath.Join(m.Dir, "loading", "fix_one")); err != nil {
		t.Fatalf("no crash marker during the first watch: %v", err)
	}
	m.setBoot("boot-3", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	p := m.state(t, target)
	if m.k.isLoaded("fix_one") || p.State != contract.StateFailed || p.Reason != contract.ReasonCrashLoop {
		t.Fatalf("after a crash with the marker: loaded %v, %+v", m.k.isLoaded("fix_one"), p)
	}
	m.setBoot("boot-4", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil || m.k.isLoaded("fix_one") {
		t.Fatalf("crash-looped patch loaded again (%v)", err)
	}
	st, _ := agent.LoadState(m.Dir)
	if len(st.Outbox) == 0 || st.Outbox[len(st.Outbox)-1].Reason != contract.ReasonCrashLoop {
		t.Errorf("crash-loop not queued for the server: %+v", st.Outbox)
	}
}

func TestSwitchesDisableLoading(t *testing.T) {
	f, m := enrolled(t)
	target := f.fix(t, "fix_one")
	must(m.SetDisabled(true))
	m.pass(t)
	s := m.status(t)
	if m.k.applies != 0 || s.Coverage != agent.NotCovered || len(s.Pending) != 1 || s.Disabled == "" {
		t.Fatalf("off file: applies %d, status %+v", m.k.applies, s)
	}
	must(m.SetDisabled(false))
	m.pass(t)
	if !m.k.isLoaded("fix_one") {
		t.Fatal("not applied once enabled")
	}
	// stitch=off on the kernel command line: the next boot loads nothing.
	m.setBoot("boot-2", "console=ttyS0 stitch=off")
	if err := m.Boot(context.Background()); err != nil {
		t.Fatal(err)
	}
	if m.k.isLoaded("fix_one") {
		t.Fatal("loaded at boot with stitch=off")
	}
	if p := m.state(t, target); p.State != contract.StateApplied {
		t.Errorf("stitch=off changed the patch's state: %+v", p)
	}
	if s := m.status(t); s.Coverage != agent.NotCovered {
		t.Errorf("coverage with stitch=off: %s", s.Coverage)
	}
	m.setBoot("boot-3", "console=ttyS0")
	if err := m.Boot(context.Background()); err != nil || !m.k.isLoaded("fix_one") {
		t.Fatalf("not reloaded without the switch: %v", err)
	}
}

func TestMirrorWithoutServer(t *testing.T) {
	f := newFleet(t)
	f.fix(t, "fix_one")
	f.publish(manifest("fix_two", release, "ffffffffffffffffffffffffffffffffffffffff"), testutils.StandInModule(t, "fix_two", release, ""))
	// A record that this very kernel contains a fix is no patch: the
	// agent on the mirror leaves it be (nothing failed, up to date).
	if _, err := f.repo.PublishAll(nil, []*contract.Contained{{Version: contract.ManifestVersion, Name: "fix_three",
		Kernel: contract.KernelID{Release: release, BuildID: buildID}, Checked: "2026-01-01T00:00:00Z",
		Fixes: []contract.Fix{{Name: "three.patch", Hash: strings.Repeat("ab", 32)}}}}); err != nil {
		t.Fatal(err)
	}
	// An air-gapped copy: the repository exported, imported elsewhere,
	// and read as files.
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(f.repo.Export(pw)) }()
	mirror := &bundle.Repo{Dir: filepath.Join(t.TempDir(), "mirror")}
	if err := mirror.Import(pr); err != nil {
		t.Fatal(err)
	}
	m := newMachine(t)
	m.Checks = fastChecks // no server to tell the schedule
	// A plain absolute path is the mirror's directory (file://).
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Repo: mirror.Dir, Root: f.root()}); err != nil {
		t.Fatal(err)
	}
	m.pass(t)
	if !m.k.isLoaded("fix_one") || m.k.isLoaded("fix_two") {
		t.Fatalf("mirror: loaded %v", m.k.loaded)
	}
	if s := m.status(t); s.Coverage != agent.UpToDate {
		t.Errorf("mirror status: %s %s", s.Coverage, s.Why)
	}
}

func TestEnrollRefusals(t *testing.T) {
	f := newFleet(t)
	m := newMachine(t)
	other := newFleet(t)
	_, err := m.Enroll(context.Background(), agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: other.root()})
	if err == nil || !strings.Contains(err.Error(), "repository") {
		t.Fatalf("enroll with another repository's root: %v", err)
	}
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Server: f.srv.URL, Key: "wrong", Root: f.root()}); !errors.Is(err, api.ErrUnauthorized) && !errors.Is(err, api.ErrForbidden) && !errors.Is(err, api.ErrBadRequest) {
		t.Fatalf("enroll with a wrong key: %v", err)
	}
	for _, f := range []string{"config.json", "root.json", "tuf"} {
		if _, err := os.Stat(filepath.Join(m.Dir, f)); err == nil {
			t.Fatalf("a failed enrollment left %s behind", f)
		}
	}
	if err := m.Once(context.Background()); !errors.Is(err, agent.ErrNotEnrolled) {
		t.Fatalf("Once unenrolled: %v", err)
	}
	for _, o := range []agent.EnrollOptions{{Repo: "stitch-repo"}, {Server: strings.TrimPrefix(f.srv.URL, "http://")}} {
		o.Key, o.Root = f.key(), f.root()
		if _, err := m.Enroll(context.Background(), o); err == nil || !strings.Contains(err.Error(), "want an http") {
			t.Errorf("enroll with server %q, repository %q: %v; want a refusal naming the URL forms", o.Server, o.Repo, err)
		}
	}
	m.enroll(t, f)
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root()}); err == nil {
		t.Fatal("enrolled twice")
	}
}

func TestThroughProxy(t *testing.T) {
	f := newFleet(t)
	// A forward proxy: requests arrive with absolute URLs.
	var through atomic.Int32
	proxy := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		through.Add(1)
		r.Out.URL = r.In.URL
	}})
	defer proxy.Close()
	m := newMachine(t)
	if _, err := m.Enroll(context.Background(), agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root(), Proxy: proxy.URL}); err != nil {
		t.Fatal(err)
	}
	f.fix(t, "fix_one")
	m.pass(t)
	if !m.k.isLoaded("fix_one") {
		t.Fatal("not applied through the proxy")
	}
	// Enrollment, metadata, the bundle, check-ins and reports.
	if n := through.Load(); n < 6 {
		t.Errorf("only %d requests went through the proxy", n)
	}
	if _, err := newMachine(t).Enroll(context.Background(), agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root(), Proxy: "::bad"}); err == nil || !strings.Contains(err.Error(), "proxy") {
		t.Errorf("a bad proxy URL: %v", err)
	}
}

func TestCoverage(t *testing.T) {
	f, m := enrolled(t)
	var skew time.Duration // how far the machine's clock runs ahead
	m.Now = func() time.Time { return time.Now().Add(skew) }
	f.fix(t, "fix_one", "CVE-2024-0001")
	f.fix(t, "fix_two", "CVE-2024-0002", "CVE-2024-0001")
	must(m.SetDisabled(true))
	m.pass(t)
	must(m.SetDisabled(false))
	if s := m.status(t); s.Coverage != agent.Pending || len(s.Pending) != 2 {
		t.Errorf("offered, not applied: %s %v", s.Coverage, s.Pending)
	}
	m.pass(t)
	s := m.status(t)
	if s.Coverage != agent.UpToDate || s.Level != 2 || strings.Join(s.FixedCVEs, " ") != "CVE-2024-0001 CVE-2024-0002" {
		t.Errorf("both applied: %+v", s)
	}
	// An agent that stopped checking in: error once an interval overdue.
	skew = 3 * time.Minute // the fleet's interval is a minute
	if s := m.status(t); s.Coverage != agent.Error || !strings.Contains(s.Why, "no check-in since") {
		t.Errorf("overdue: %s %s", s.Coverage, s.Why)
	}
	skew = 0
	// Unloaded by hand: reported reverted, and the machine not covered.
	must(m.k.Revert(context.Background(), "fix_two", livepatch.ApplyOptions{}))
	if s := m.status(t); s.Coverage != agent.NotCovered || s.Level != 1 {
		t.Errorf("a patch unloaded by hand: %s %s", s.Coverage, s.Why)
	}
	m.pass(t)
	if m.k.isLoaded("fix_two") {
		t.Error("the agent forced back a patch reverted by hand in this boot")
	}
}

func TestInstall(t *testing.T) {
	root := t.TempDir()
	self := filepath.Join(root, "self")
	must(os.WriteFile(self, []byte("binary"), 0o755))
	bin, units := filepath.Join(root, "sbin/stitch"), filepath.Join(root, "units")
	var log strings.Builder
	if err := agent.Install(self, bin, units, "/var/lib/stitch", &log); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(bin); string(b) != "binary" {
		t.Error("binary not installed")
	}
	boot, _ := os.ReadFile(filepath.Join(units, "stitch-agent-boot.service"))
	for _, want := range []string{"ExecStart=" + bin + " agent --boot --dir /var/lib/stitch", "ConditionKernelCommandLine=!stitch=off", "Before=sysinit.target network-pre.target"} {
		if !strings.Contains(string(boot), want) {
			t.Errorf("boot unit lacks %q:\n%s", want, boot)
		}
	}
	daemon, _ := os.ReadFile(filepath.Join(units, "stitch-agent.service"))
	if !strings.Contains(string(daemon), "ExecStart="+bin+" agent --dir /var/lib/stitch") {
		t.Errorf("daemon unit:\n%s", daemon)
	}
	// systemd's own check of the units, where systemd is installed.
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Log("systemd-analyze not installed: units not verified by systemd")
	} else {
		cmd := exec.Command("systemd-analyze", "verify", "--man=no", "./stitch-agent.service", "./stitch-agent-boot.service")
		cmd.Dir = units
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	}
	if err := agent.Install(self, "relative/stitch", units, "/var/lib/stitch", &log); err == nil {
		t.Error("a relative binary path was accepted")
	}
}

// A machine whose kernel cannot live-patch enrolls, checks in as
// unsupported, is offered nothing and counts as no rollout's eligible
// machine; its status says "not covered" and why, not "error". Its
// agent keeps checking in, so it stays visible.
func TestUnsupportedKernel(t *testing.T) {
	f := newFleet(t)
	target := f.fix(t, "fix_one")
	ok, no := newMachine(t), newMachine(t)
	no.k.noLivepatch = true
	for _, m := range []*machine{ok, no} {
		m.enroll(t, f)
		m.pass(t)
	}
	if !ok.k.isLoaded("fix_one") || len(no.k.order) != 0 {
		t.Fatalf("loaded: supported %v, unsupported %v", ok.k.order, no.k.order)
	}
	s := no.status(t)
	if s.Coverage != agent.NotCovered || !strings.Contains(s.Why, "no livepatch support") {
		t.Errorf("unsupported machine's status: %s (%s), want not covered, saying why", s.Coverage, s.Why)
	}
	var ms []api.MachineReport
	if err := f.admin.Do(context.Background(), "GET", "/v1/admin/reports/machines", nil, &ms); err != nil {
		t.Fatal(err)
	}
	unsupported := 0
	for _, m := range ms {
		if m.Unsupported != "" {
			unsupported++
			if m.KernelRelease != release || m.LastCheckIn.IsZero() {
				t.Errorf("unsupported machine %+v: want its kernel and check-in recorded", m)
			}
		}
	}
	if len(ms) != 2 || unsupported != 1 {
		t.Errorf("machines report: %d machines, %d unsupported; want 2 and 1", len(ms), unsupported)
	}
	if p := f.patch(target); p.Eligible != 1 || p.Pending != 0 {
		t.Errorf("rollout: eligible %d, pending %d; want 1 and 0 (the unsupported machine is neither)", p.Eligible, p.Pending)
	}
	if err := no.Boot(context.Background()); err != nil {
		t.Errorf("boot pass on an unsupported kernel: %v", err)
	}
}
