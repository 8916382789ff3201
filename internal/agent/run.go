package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/server/api"
)

// Poll is how often a running agent looks at the kernel for trouble.
const Poll = 5 * time.Second

// The check-in interval a server may set: a server (or whatever answers
// in its place) can neither make the agent hammer it nor send it to
// sleep for years.
const (
	MinCheckIn = time.Minute
	MaxCheckIn = 24 * time.Hour
)

// session is one locked pass over the state.
type session struct {
	*Agent
	cfg    *Config
	root   []byte
	st     *State
	boot   string
	kernel *livepatch.Status
	unlock func()
	// alarms are what this pass must end in error for although it
	// carried on: a rollback that failed.
	alarms []error
}

// open locks Dir against a second agent and reads the configuration and
// state. The lock is an flock on Dir/lock, released if the process dies.
func (a *Agent) open() (*session, error) {
	cfg, root, err := a.config()
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(a.path("lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%w on %s (%v)", ErrLocked, a.Dir, err)
	}
	st, err := LoadState(a.Dir)
	if err != nil {
		f.Close()
		return nil, err
	}
	ks, err := a.Kernel.Status()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !ks.Livepatch {
		f.Close()
		return nil, fmt.Errorf("%w: this kernel has no /sys/kernel/livepatch (CONFIG_LIVEPATCH)", livepatch.ErrUnsupported)
	}
	if st.Version < stateVersion {
		// Before version 1 the state did not say which server offered a
		// patch: with a server configured, it was that one.
		for _, p := range st.Patches {
			if p.Server == "" && p.Bundle != "" {
				p.Server = cfg.Server
			}
		}
		st.Version = stateVersion
	}
	return &session{Agent: a, cfg: cfg, root: root, st: st, boot: a.bootID(), kernel: ks, unlock: func() { f.Close() }}, nil
}

// checks is the health-check schedule in force: the test's override, or
// the one the server gave last, or the default.
func (s *session) checks() contract.Schedule {
	switch {
	case s.Checks != nil:
		return s.Checks
	case len(s.st.Schedule) > 0:
		return s.st.Schedule
	}
	return contract.DefaultSchedule
}

func (s *session) close() error {
	defer s.unlock()
	return s.saveState(s.st)
}

// Boot is the early-boot pass, before the network: it settles crash
// markers and loads again, from the verified local copies, the patches
// that were applied before the reboot. Nothing is fetched or reported.
func (a *Agent) Boot(ctx context.Context) error {
	s, err := a.open()
	if err != nil {
		return err
	}
	s.recover()
	err = s.reload(ctx)
	return errors.Join(err, errors.Join(s.alarms...), s.close())
}

// Once is one full pass: settle crash markers, reload what a reboot
// dropped, report due health checks, check in (or read the mirror), act
// on the orders, and watch each newly applied patch through its first
// health check. A server that cannot be reached is ErrServer; the
// patches already applied stay.
func (a *Agent) Once(ctx context.Context) error {
	s, err := a.open()
	if err != nil {
		return err
	}
	s.recover()
	err = s.reload(ctx)
	s.watch(ctx)
	if serr := s.sync(ctx); serr != nil {
		err = errors.Join(err, serr)
	}
	if werr := s.settle(ctx); werr != nil {
		err = errors.Join(err, werr)
	}
	if err == nil {
		err = s.flush(ctx)
	}
	return errors.Join(err, errors.Join(s.alarms...), s.close())
}

// Run is the daemon: a pass at every check-in (the server's interval,
// with jitter; backing off from 30 seconds while the server is down),
// and between passes a look at the kernel every Poll for trouble after
// a recent apply and for due health checks.
func (a *Agent) Run(ctx context.Context) error {
	failures := 0
	for {
		err := a.Once(ctx)
		var wait time.Duration
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case fatal(err):
			return err
		case err != nil:
			failures++
			wait = backoff(failures, a.interval())
			a.log().Warn("pass failed; patches kept, retrying", "in", wait.Round(time.Second), "err", err)
		default:
			failures = 0
			wait = a.untilNextCheckIn()
		}
		if err := a.idle(ctx, wait); err != nil {
			return err
		}
	}
}

// fatal tells the errors no retry can mend: the daemon stops on them.
func fatal(err error) bool {
	for _, e := range []error{ErrNotEnrolled, ErrLocked, livepatch.ErrNotRoot, livepatch.ErrUnsupported} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// backoff doubles from 30 seconds up to the check-in interval.
func backoff(failures int, max time.Duration) time.Duration {
	d := 30 * time.Second
	for i := 1; i < failures && d < max; i++ {
		d *= 2
	}
	return jitter(min(d, max))
}

func (a *Agent) interval() time.Duration {
	cfg, _, err := a.config()
	if err != nil {
		return time.Hour
	}
	return cfg.interval()
}

func (a *Agent) untilNextCheckIn() time.Duration {
	st, err := LoadState(a.Dir)
	if err != nil || st.NextCheckIn.IsZero() {
		return jitter(a.interval())
	}
	return max(st.NextCheckIn.Sub(a.now()), time.Second)
}

// idle waits d, looking at the kernel every Poll.
func (a *Agent) idle(ctx context.Context, d time.Duration) error {
	end := a.now().Add(d)
	for {
		left := end.Sub(a.now())
		if left <= 0 {
			return nil
		}
		if err := a.sleep(ctx, min(left, Poll)); err != nil {
			return err
		}
		s, err := a.open()
		if err != nil {
			return err
		}
		s.watch(ctx)
		if s.st.LastError == "" {
			// Health reports go out as they fall due, unless the server
			// is failing: then they wait for the next pass's backoff.
			s.flush(ctx) // kept on failure, for the next pass
		}
		if err := s.close(); err != nil {
			return err
		}
	}
}

// recover settles the crash markers left behind. A marker from an
// earlier boot means the machine went down while its patch was being
// loaded or in its first watch: the patch is failed for good (never
// loaded again) and reported. A marker from this boot means only that an
// agent process died on the way: the kernel says whether the load
// happened, and a loaded patch keeps its marker for its first watch.
func (s *session) recover() {
	ms, err := s.markers()
	if err != nil {
		s.log().Warn("read crash markers", "err", err)
		return
	}
	loaded := s.loaded()
	for name, m := range ms {
		p := s.st.patch(m.Target)
		if p == nil {
			p = s.st.byName(name)
		}
		if p == nil {
			s.unmark(name)
			continue
		}
		if p.State == contract.StateFailed && p.Reason == contract.ReasonRollbackFailed {
			// The marker stays while the kernel may hold the patch partly
			// applied: until its reverse transition ends (the kernel
			// keeps trying) or a reboot. The patch stays failed, never
			// loaded again.
			if m.BootID == s.boot && s.boot != "" && s.holds(p.Name) {
				continue
			}
			s.unmark(name)
			s.log().Warn("the kernel no longer holds the patch whose rollback failed; it stays failed", "patch", p.Name, "target", p.Target)
			continue
		}
		if m.BootID == s.boot && s.boot != "" {
			switch {
			case loaded[p.Name] && p.State != contract.StateApplied:
				p.set(contract.StateApplied, "", "", s.now())
				p.AppliedAt, p.BootID, p.Checks = s.now(), s.boot, nil
			case !loaded[p.Name]:
				s.unmark(name)
				if p.State == "" { // never loaded: the next check-in offers it again
					s.st.Patches = slices.DeleteFunc(s.st.Patches, func(q *Patch) bool { return q == p })
				}
			}
			continue
		}
		s.unmark(name)
		detail := fmt.Sprintf("the machine went down within the first health check of loading %s (crash marker of boot %s, written %s); it will not be loaded again", p.Name, m.BootID, m.At.Format(time.RFC3339))
		s.log().Error("crash marker found: patch not loaded again", "patch", p.Name, "target", p.Target)
		p.set(contract.StateFailed, contract.ReasonCrashLoop, detail, s.now())
		s.report(p, contract.CheckBoot, false, contract.ReasonCrashLoop, detail)
	}
}

// reload loads again the applied patches a reboot dropped, from their
// verified local copies; a patch unloaded in this boot by someone else
// is taken as reverted rather than forced back.
func (s *session) reload(ctx context.Context) error {
	loaded := s.loaded()
	var errs []error
	for _, p := range s.st.Patches {
		if p.State != contract.StateApplied || loaded[p.Name] || !s.forKernel(p) {
			continue
		}
		if p.BootID == s.boot && s.boot != "" {
			p.set(contract.StateReverted, "", "unloaded outside the agent (stitch revert, or by hand)", s.now())
			continue
		}
		if off, why := s.Disabled(); off {
			s.log().Warn("not loading patches", "why", why)
			return nil
		}
		b, err := s.cached(p)
		if err != nil {
			p.set(contract.StateFailed, contract.ReasonVerifyFailed, err.Error(), s.now())
			s.report(p, contract.CheckBoot, false, contract.ReasonVerifyFailed, err.Error())
			continue
		}
		if err := s.load(ctx, p, b, contract.CheckBoot); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// holds says whether the kernel lists a patch of that name, enabled or
// not.
func (s *session) holds(name string) bool {
	return slices.ContainsFunc(s.kernel.Patches, func(p livepatch.Patch) bool { return p.Name == name })
}

// forKernel says whether p was built for the running kernel.
func (s *session) forKernel(p *Patch) bool {
	return p.Release == s.kernel.Release && p.BuildID == s.kernel.BuildID
}

// loaded names the enabled patches in the kernel.
func (s *session) loaded() map[string]bool {
	ks, err := s.Kernel.Status()
	if err == nil {
		s.kernel = ks
	}
	out := map[string]bool{}
	for _, p := range s.kernel.Patches {
		if p.Enabled {
			out[p.Name] = true
		}
	}
	return out
}

// cached opens a patch's local bundle, checking it is still the bytes
// the signed metadata named when it was fetched.
func (s *session) cached(p *Patch) (*bundle.Bundle, error) {
	data, err := os.ReadFile(p.Bundle)
	if err != nil {
		return nil, fmt.Errorf("local copy of %s: %w", p.Target, err)
	}
	if got := bundle.SHA256Hex(data); got != p.BundleSHA256 {
		return nil, fmt.Errorf("%w: local copy %s of %s changed since it was verified (sha256 %s, signed %s)", bundle.ErrVerify, p.Bundle, p.Target, got, p.BundleSHA256)
	}
	return bundle.Open(data)
}

// load checks a bundle against the running kernel and applies it: the
// kernel release and build-id, then (in livepatch.Apply) the module's
// vermagic and hash and the running code of every function it replaces.
// A patch that does not fit is refused and reported, with nothing
// loaded; one the kernel rejects or that stalls is failed and reported.
// Only errors that say nothing about the patch (no root, a transition
// already running) are returned, and the patch is left to try again.
func (s *session) load(ctx context.Context, p *Patch, b *bundle.Bundle, check string) error {
	m := &b.Manifest
	now := s.now()
	refuse := func(reason string, err error) {
		s.log().Error("patch refused", "patch", p.Name, "reason", reason, "err", err)
		p.set(contract.StateRefused, reason, err.Error(), now)
		s.report(p, check, false, reason, err.Error())
	}
	if m.Kernel.Release != s.kernel.Release || m.Kernel.BuildID != s.kernel.BuildID {
		refuse(contract.ReasonVerifyFailed, fmt.Errorf("%w: %s was built for %s (build-id %s), this machine runs %s (build-id %s)",
			livepatch.ErrWrongKernel, p.Name, m.Kernel.Release, m.Kernel.BuildID, s.kernel.Release, s.kernel.BuildID))
		return nil
	}
	if err := os.MkdirAll(s.path("modules"), 0o700); err != nil {
		return err
	}
	ko := s.path("modules", m.Name+".ko")
	if err := writeFile(ko, b.Module, 0o600); err != nil {
		return err
	}
	taint, err := s.Kernel.Taint()
	if err != nil {
		return err
	}
	// The marker and the state that names its patch must both be on disk
	// before the module is: a crash in the load must find them.
	if err := s.mark(p); err != nil {
		return fmt.Errorf("write crash marker for %s: %w", p.Name, err)
	}
	if err := s.saveState(s.st); err != nil {
		s.unmark(p.Name)
		return err
	}
	s.log().Info("applying patch", "patch", p.Name, "target", p.Target, "check", check)
	_, err = s.Kernel.Apply(ctx, ko, livepatch.ApplyOptions{Timeout: s.Timeout, Expect: Expect(m),
		Progress: func(pr livepatch.Progress) {
			s.log().Info("livepatch", "patch", pr.Patch, "phase", pr.Phase, "pending", pr.Pending)
		}})
	switch {
	case err == nil:
	case errors.Is(err, livepatch.ErrRollbackFailed):
		// Failed, and maybe still partly in the kernel: the crash marker
		// stays (a crash from here on is this patch's), and the pass
		// ends in this error once the rest is done.
		s.rollbackFailed(p, check, err)
		return nil
	case errors.Is(err, livepatch.ErrNotRoot), errors.Is(err, livepatch.ErrUnsupported), errors.Is(err, livepatch.ErrBusy), ctx.Err() != nil:
		s.unmark(p.Name)
		return fmt.Errorf("apply %s: %w", p.Name, err)
	case errors.Is(err, livepatch.ErrWrongKernel):
		s.unmark(p.Name)
		refuse(contract.ReasonFingerprintMismatch, err)
		return nil
	case errors.Is(err, kmod.ErrVermagic), errors.Is(err, kmod.ErrNotModule), errors.Is(err, kmod.ErrNotELF), errors.Is(err, kmod.ErrNotLivepatch):
		s.unmark(p.Name)
		refuse(contract.ReasonVerifyFailed, err)
		return nil
	default:
		s.unmark(p.Name)
		reason := contract.ReasonApplyFailed
		if errors.Is(err, livepatch.ErrTimeout) {
			reason = contract.ReasonTransitionTimeout
		}
		s.log().Error("patch failed", "patch", p.Name, "reason", reason, "err", err)
		p.set(contract.StateFailed, reason, err.Error(), now)
		s.report(p, check, false, reason, err.Error())
		return nil
	}
	// The checks count from the end of the transition.
	now = s.now()
	p.set(contract.StateApplied, "", "", now)
	p.AppliedAt, p.BootID, p.Taint, p.Checks = now, s.boot, taint.Value, nil
	s.report(p, check, true, "", "")
	// The server times a machine's checks from its first report: send
	// this one now, not after the first watch.
	s.flush(ctx)
	s.st.Pending = slices.DeleteFunc(s.st.Pending, func(t string) bool { return t == p.Target })
	return nil
}

// watch looks at the kernel for trouble since each patch in its watch
// window (this boot, before its last health check) was applied, reverts
// the patches the trouble is blamed on, and reports the health checks
// that fell due. Trouble is a new W, D or L taint bit, or a kernel log
// line of a warning or oops; a line that names a patch's module blames
// that patch only, anything else every patch in its window.
func (s *session) watch(ctx context.Context) {
	taint, err := s.Kernel.Taint()
	if err != nil {
		s.log().Warn("read taint", "err", err)
		return
	}
	var lines []string
	if s.Log != nil {
		lines = livepatch.TroubleLines(s.Log.ReadNew())
	}
	checks := s.checks()
	var window []*Patch
	for _, p := range s.st.Patches {
		if p.State == contract.StateApplied && p.BootID == s.boot && p.watched(checks) {
			window = append(window, p)
		}
	}
	named := map[*Patch][]string{}
	for _, l := range lines {
		for _, p := range window {
			if strings.Contains(l, "["+p.Name+"]") {
				named[p] = append(named[p], l)
			}
		}
	}
	for _, p := range window {
		newBits := taint.Value & livepatch.TroubleTaint &^ p.Taint
		var blame []string
		switch {
		case len(named) > 0:
			blame = named[p]
		case newBits != 0 || len(lines) > 0:
			blame = lines
			if len(blame) == 0 {
				blame = []string{"new kernel taint " + livepatch.DecodeTaint(newBits).String()}
			}
		}
		next := nextCheck(p, checks)
		if len(blame) > 0 {
			s.fail(ctx, p, next, blame)
			continue
		}
		for _, c := range checks {
			if !p.checked(c.Name) && !s.now().Before(p.AppliedAt.Add(c.After)) {
				s.report(p, c.Name, true, "", "")
				if c.Name == checks[0].Name {
					s.unmark(p.Name)
				}
			}
		}
	}
}

// nextCheck is the first health check p has not reported.
func nextCheck(p *Patch, checks contract.Schedule) string {
	for _, c := range checks {
		if !p.checked(c.Name) {
			return c.Name
		}
	}
	return checks[len(checks)-1].Name
}

// fail reverts a patch the kernel's trouble is blamed on and reports it.
func (s *session) fail(ctx context.Context, p *Patch, check string, lines []string) {
	reason := contract.ReasonKernelWarning
	for _, l := range lines {
		if strings.Contains(l, "Oops") || strings.Contains(l, "BUG:") || strings.Contains(l, "general protection") {
			reason = contract.ReasonOops
		}
	}
	detail := strings.Join(lines, "\n")
	s.log().Error("kernel trouble after a patch: reverting it", "patch", p.Name, "reason", reason, "log", detail)
	// Not cut short by the daemon stopping: an interrupted revert would
	// be taken for a failed one. ApplyOptions.Timeout still bounds it.
	if err := s.Kernel.Revert(context.WithoutCancel(ctx), p.Name, livepatch.ApplyOptions{Timeout: s.Timeout}); err != nil && !errors.Is(err, livepatch.ErrUnknownPatch) {
		// The patch is still in the kernel, maybe half taken out. Its
		// marker (gone after the first check) is written again.
		if merr := s.mark(p); merr != nil {
			s.log().Error("write crash marker", "patch", p.Name, "err", merr)
		}
		s.rollbackFailed(p, check, fmt.Errorf("%s (%s): revert: %w: %w", detail, reason, livepatch.ErrRollbackFailed, err))
		return
	}
	s.unmark(p.Name)
	p.set(contract.StateFailed, reason, detail, s.now())
	s.report(p, check, false, reason, detail)
}

// rollbackFailed records that a patch which had to be taken out could
// not be: failed for good (reason rollback-failed) and reported, its
// crash marker left in place while the kernel may hold it, and the pass
// made to end in the error.
func (s *session) rollbackFailed(p *Patch, check string, err error) {
	s.log().Error("patch failed and could not be taken out: the kernel may hold it partly applied; crash marker kept", "patch", p.Name, "target", p.Target, "err", err)
	p.set(contract.StateFailed, contract.ReasonRollbackFailed, err.Error(), s.now())
	s.report(p, check, false, contract.ReasonRollbackFailed, err.Error())
	s.alarms = append(s.alarms, fmt.Errorf("%s: %w", p.Name, err))
}

// settle waits until every patch applied in this pass has passed (or
// failed) its first health check: the crash marker's window.
func (s *session) settle(ctx context.Context) error {
	first := s.checks()[0]
	for {
		var waiting bool
		for _, p := range s.st.Patches {
			if p.State == contract.StateApplied && p.BootID == s.boot && !p.checked(first.Name) {
				waiting = true
			}
		}
		if !waiting {
			return nil
		}
		if err := s.saveState(s.st); err != nil {
			return err
		}
		if err := s.sleep(ctx, min(Poll, first.After/4)); err != nil {
			return err
		}
		s.watch(ctx)
	}
}

// report queues a health report for the server (none in mirror mode)
// and records the check.
func (s *session) report(p *Patch, check string, healthy bool, reason, detail string) {
	if !p.checked(check) {
		p.Checks = append(p.Checks, check)
	}
	if s.cfg.Server == "" {
		return
	}
	if len(detail) > 1024 {
		detail = detail[:1024]
	}
	s.st.Outbox = append(s.st.Outbox, api.Health{Target: p.Target, Name: p.Name, Check: check, Healthy: healthy, Reason: reason, Detail: detail})
}

// flush sends the queued health reports; what cannot be sent now stays,
// and the error says why. A report the server refuses (the patch is
// unknown to it now) is dropped: sending it again would not change the
// answer.
func (s *session) flush(ctx context.Context) error {
	if s.cfg.Server == "" || len(s.st.Outbox) == 0 {
		return nil
	}
	c := s.client()
	for len(s.st.Outbox) > 0 {
		h := s.st.Outbox[0]
		err := c.Health(ctx, h)
		var se *api.StatusError
		refused := errors.As(err, &se)
		switch {
		case err == nil:
		case errors.Is(err, api.ErrRateLimited):
			// The server will read it later: keep it for the next pass.
			s.log().Warn("health report deferred: the server limits this machine's reports", "patch", h.Name, "check", h.Check, "retry_after", se.RetryAfter)
			return err
		case refused && se.Code < 500:
			s.log().Warn("health report refused by the server; dropped", "patch", h.Name, "check", h.Check, "err", err)
		default:
			s.log().Warn("health report not sent; kept", "patch", h.Name, "err", err)
			return err
		}
		s.st.Outbox = s.st.Outbox[1:]
	}
	return nil
}

func (s *session) client() *api.Client {
	hc, _ := s.cfg.httpClient() // the proxy was checked at enrollment
	return &api.Client{BaseURL: s.cfg.Server, Token: s.cfg.Token, HTTP: hc}
}

func (s *session) tuf() (*bundle.Client, error) {
	hc, err := s.cfg.httpClient()
	if err != nil {
		return nil, err
	}
	return &bundle.Client{BaseURL: s.cfg.Repo, TrustedRoot: s.root, CacheDir: s.path("tuf"), HTTP: hc, Now: s.Now}, nil
}

// sync checks in and carries out the orders, or, with no server, applies
// what the mirror holds for this kernel.
func (s *session) sync(ctx context.Context) error {
	if s.cfg.Server == "" {
		return s.mirror(ctx)
	}
	if err := s.flush(ctx); err != nil {
		s.st.LastAttempt, s.st.LastError = s.now(), err.Error()
		return fmt.Errorf("%w: %s: %v", ErrServer, s.cfg.Server, err)
	}
	resp, err := s.checkIn(ctx)
	if err != nil {
		return err
	}
	acted, err := s.act(ctx, resp.Actions)
	if acted {
		// Tell the server at once what became of its orders.
		if _, cerr := s.checkIn(ctx); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}
	return err
}

func (s *session) checkIn(ctx context.Context) (api.CheckInResponse, error) {
	now := s.now()
	s.st.LastAttempt = now
	resp, err := s.client().CheckIn(ctx, s.checkInReport())
	if err != nil {
		s.st.LastError = err.Error()
		s.st.NextCheckIn = now.Add(backoff(1, s.cfg.interval()))
		var se *api.StatusError
		if errors.As(err, &se) && se.Code < 500 {
			return resp, fmt.Errorf("check-in with %s: %w", s.cfg.Server, err)
		}
		return resp, fmt.Errorf("%w: check-in with %s: %w", ErrServer, s.cfg.Server, err)
	}
	s.st.LastCheckIn, s.st.LastError = now, ""
	if len(resp.Checks) > 0 {
		if err := resp.Checks.Validate(); err != nil {
			s.log().Warn("the server's health-check schedule is unusable; keeping the last one", "err", err)
		} else {
			s.st.Schedule = resp.Checks
		}
	}
	s.st.NextCheckIn = now.Add(jitter(s.nextInterval(resp.NextCheckinSeconds)))
	return resp, nil
}

// nextInterval is the wait the server asked for, within MinCheckIn and
// MaxCheckIn (compared in seconds: a huge number must not overflow a
// Duration); the configured interval when it asked for none.
func (s *session) nextInterval(secs int) time.Duration {
	var d time.Duration
	switch {
	case secs <= 0:
		return s.cfg.interval()
	case secs < int(MinCheckIn/time.Second):
		d = MinCheckIn
	case secs > int(MaxCheckIn/time.Second):
		d = MaxCheckIn
	default:
		return time.Duration(secs) * time.Second
	}
	s.log().Warn("server's check-in interval out of bounds; clamped", "asked_seconds", secs, "using", d, "bounds", fmt.Sprintf("%s..%s", MinCheckIn, MaxCheckIn))
	return d
}

// checkInReport lists every patch with what the kernel actually holds: a
// patch the agent wants applied but that is not loaded (loading is off)
// is reported reverted, so the server never counts it as protection.
func (s *session) checkInReport() api.CheckIn {
	loaded := s.loaded()
	ci := api.CheckIn{KernelRelease: s.kernel.Release, KernelBuildID: s.kernel.BuildID, AgentVersion: s.Version, Patches: []api.PatchState{}}
	for _, p := range s.st.Patches {
		if p.Release != "" && !s.forKernel(p) {
			continue
		}
		ps := api.PatchState{Target: p.Target, Name: p.Name, State: p.State, Since: p.Since, Reason: p.Reason}
		if p.State == contract.StateApplied && !loaded[p.Name] {
			ps.State, ps.Reason = contract.StateReverted, "not loaded"
		}
		ci.Patches = append(ci.Patches, ps)
		if len(ci.Patches) == api.MaxPatches {
			break
		}
	}
	return ci
}

// act carries out a check-in's orders: reverts first (a blocklisted patch
// must go even when loading is off), then applies. A revert order is
// obeyed only for a patch this server offered and the agent applied: the
// orders come outside TUF's signatures, so they may touch nothing else.
// Each one is logged, obeyed or not.
func (s *session) act(ctx context.Context, actions []api.Action) (bool, error) {
	acted := false
	for _, a := range actions {
		if a.Op != api.OpRevert {
			continue
		}
		p := s.st.patch(a.Target)
		why := ""
		switch {
		case p == nil:
			why = "this machine never had that patch"
		case p.Server != s.cfg.Server:
			from := p.Server
			if from == "" {
				from = "the mirror " + s.cfg.Repo
			}
			why = "that patch was not offered by this server (it came from " + from + ")"
		case p.State != contract.StateApplied:
			why = "that patch is " + p.State + ", not applied"
		}
		if why != "" {
			s.log().Warn("revert order ignored", "target", clip(a.Target), "server", s.cfg.Server, "why", why)
			continue
		}
		s.log().Warn("revert order obeyed: reverting the patch (blocklisted by the server)", "patch", p.Name, "target", p.Target, "server", s.cfg.Server)
		if err := s.Kernel.Revert(ctx, p.Name, livepatch.ApplyOptions{Timeout: s.Timeout}); err != nil && !errors.Is(err, livepatch.ErrUnknownPatch) {
			return acted, fmt.Errorf("revert %s as ordered: %w", p.Name, err)
		}
		s.unmark(p.Name)
		p.set(contract.StateReverted, "", "blocklisted by the server", s.now())
		acted = true
	}
	s.st.Pending = nil
	if !slices.ContainsFunc(actions, func(a api.Action) bool { return a.Op == api.OpApply && s.st.patch(a.Target) == nil }) {
		// Nothing waits on the repository any more.
		s.st.RepoError, s.st.RepoErrorAt = "", time.Time{}
	}
	for _, a := range actions {
		if a.Op != api.OpApply || s.st.patch(a.Target) != nil {
			continue
		}
		if off, why := s.Disabled(); off {
			s.st.Pending = append(s.st.Pending, a.Target)
			s.log().Warn("patch offered but loading is off", "target", a.Target, "why", why)
			continue
		}
		ok, err := s.fetchAndLoad(ctx, a.Target, a.Name, a.CVEs)
		acted = acted || ok
		if err != nil {
			s.st.Pending = append(s.st.Pending, a.Target)
			return acted, err
		}
	}
	return acted, nil
}

// fetchAndLoad fetches a target through TUF and loads it. It reports
// whether a patch was decided on (applied, refused or failed).
func (s *session) fetchAndLoad(ctx context.Context, target, name string, cves []string) (bool, error) {
	tc, err := s.tuf()
	if err != nil {
		return false, err
	}
	b, path, err := tc.Fetch(ctx, target)
	// The server offers only patches for this kernel; the manifest says
	// for sure once it is verified.
	p := &Patch{Target: target, Name: name, CVEs: cves, Since: s.now(), Release: s.kernel.Release, BuildID: s.kernel.BuildID, Server: s.cfg.Server}
	switch {
	case err == nil:
		s.st.RepoError, s.st.RepoErrorAt = "", time.Time{}
	case ctx.Err() != nil:
		return false, err
	case errors.Is(err, bundle.ErrVerify):
		// Expired or rolled-back metadata, a bad signature, content not
		// of its signed hash: the repository's problem (a refresh racing
		// the fetch, a stale mirror, tampering on the way), not the
		// patch's. Tried again at the next pass; no failure is reported.
		s.repoProblem(target, err)
		return false, fmt.Errorf("%w: %w", ErrRepository, err)
	case errors.Is(err, bundle.ErrBadBundle), errors.Is(err, contract.ErrBadManifest):
		// Signed and intact as published, and still no valid bundle: the
		// patch itself is bad.
		s.st.Patches = append(s.st.Patches, p)
		s.log().Error("bundle refused", "target", target, "err", err)
		p.set(contract.StateRefused, contract.ReasonVerifyFailed, err.Error(), s.now())
		s.report(p, contract.CheckApply, false, contract.ReasonVerifyFailed, err.Error())
		return true, nil
	default:
		// Network trouble, a missing target: try again later.
		s.repoProblem(target, err)
		return false, fmt.Errorf("%w: %w", ErrServer, err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	p.Name, p.Bundle, p.BundleSHA256 = b.Manifest.Name, path, bundle.SHA256Hex(data)
	p.Description, p.Release, p.BuildID = b.Manifest.Description, b.Manifest.Kernel.Release, b.Manifest.Kernel.BuildID
	if len(p.CVEs) == 0 {
		p.CVEs = b.Manifest.CVEs
	}
	if old := s.st.byName(p.Name); old != nil {
		// The kernel holds one patch of a name: a rebuilt patch replaces
		// the old one only after the old is reverted.
		err := fmt.Errorf("a patch named %s is already applied (%s); revert it first", p.Name, old.Target)
		p.set(contract.StateRefused, contract.ReasonApplyFailed, err.Error(), s.now())
		s.st.Patches = append(s.st.Patches, p)
		s.report(p, contract.CheckApply, false, contract.ReasonApplyFailed, err.Error())
		return true, nil
	}
	s.st.Patches = append(s.st.Patches, p)
	if err := s.load(ctx, p, b, contract.CheckApply); err != nil {
		s.st.Patches = s.st.Patches[:len(s.st.Patches)-1]
		return false, err
	}
	return true, nil
}

// repoProblem records that the repository could not give a target, for
// stitch status and the log.
func (s *session) repoProblem(target string, err error) {
	s.st.RepoError, s.st.RepoErrorAt = err.Error(), s.now()
	s.log().Warn("patch repository problem: patch not fetched, trying again later", "target", target, "repo", s.cfg.Repo, "err", err)
}

// clip shortens what a server sent before it goes into a log line.
func clip(v string) string {
	if len(v) > 200 {
		return v[:200] + "..."
	}
	return v
}

// mirror applies, with no server, every bundle the repository holds for
// this kernel that the agent has not decided on yet.
func (s *session) mirror(ctx context.Context) error {
	now := s.now()
	s.st.LastAttempt = now
	tc, err := s.tuf()
	if err != nil {
		return err
	}
	names, err := tc.Targets(ctx)
	if err != nil {
		s.st.LastError = err.Error()
		s.repoProblem("", err)
		if errors.Is(err, bundle.ErrVerify) {
			return fmt.Errorf("%w: mirror %s: %w", ErrRepository, s.cfg.Repo, err)
		}
		return fmt.Errorf("%w: mirror %s: %v", ErrServer, s.cfg.Repo, err)
	}
	s.st.LastCheckIn, s.st.LastError, s.st.NextCheckIn = now, "", now.Add(jitter(s.cfg.interval()))
	slices.Sort(names)
	var actions []api.Action
	for _, n := range names {
		// Bundles only: a contained record (contained/RELEASE/...) is
		// no patch to apply.
		if strings.HasPrefix(n, s.kernel.Release+"/") && contract.ValidTarget(n) {
			actions = append(actions, api.Action{Target: n, Op: api.OpApply})
		}
	}
	_, err = s.act(ctx, actions)
	return err
}
