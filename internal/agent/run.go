package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/modsign"
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
	s := &session{Agent: a, cfg: cfg, root: root, st: st, boot: a.bootID(), kernel: ks, unlock: func() { f.Close() }}
	if st.Version < 1 {
		// Before version 1 the state did not say which server offered a
		// patch: with a server configured, it was that one.
		for _, p := range st.Patches {
			if p.Server == "" && p.Bundle != "" {
				p.Server = cfg.Server
			}
		}
	}
	if st.Version < 2 {
		s.learnLevels()
	}
	st.Version = stateVersion
	return s, nil
}

// learnLevels fills in, for a state written before version 2, which
// patches are cumulative and which levels, from their kept bundles; of
// the levels of a stream applied then, the newest is the live one.
func (s *session) learnLevels() {
	for _, p := range s.st.Patches {
		if p.Bundle == "" || p.Level != nil {
			continue
		}
		b, err := s.cached(p)
		if err != nil {
			continue // reload finds it unusable and says so
		}
		p.Replace, p.Level, p.Fixes = b.Manifest.Replace, b.Manifest.Level, fixNames(&b.Manifest)
	}
	for _, p := range s.st.Patches {
		if p.Level == nil || p.State != contract.StateApplied {
			continue
		}
		if live := s.live(p.Release, p.BuildID, p.Level.Stream); live != nil && live != p {
			older := p
			if older.number() > live.number() {
				older = live
			}
			older.set(contract.StateReverted, "", "superseded by a newer level", s.now())
			older.Superseded = true
		}
	}
}

func fixNames(m *contract.Manifest) []string {
	var out []string
	for _, f := range m.Fixes {
		out = append(out, f.Name)
	}
	return out
}

// live is the newest applied level of a stream for a kernel: the level
// the agent holds (there is one, but for an old state's).
func (s *session) live(release, buildID, stream string) *Patch {
	var out *Patch
	for _, p := range s.st.Patches {
		if p.inStream(stream) && p.State == contract.StateApplied && p.Release == release && p.BuildID == buildID && p.number() > out.number() {
			out = p
		}
	}
	return out
}

// liveLevel is the running kernel's live level of any stream: a kernel
// runs one cumulative patch, so there is at most one.
func (s *session) liveLevel() *Patch {
	for _, p := range s.st.Patches {
		if p.Level != nil && p.State == contract.StateApplied && s.forKernel(p) {
			return p
		}
	}
	return nil
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
	if !s.kernel.Livepatch {
		return s.close() // nothing was applied, nothing to reload
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
	if !s.kernel.Livepatch {
		// The machine stays visible to its server, as unsupported, and
		// its status says why it is not covered.
		err := s.reportUnsupported(ctx)
		return errors.Join(err, s.close())
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
		if p.Level != nil && s.live(p.Release, p.BuildID, p.Level.Stream) == nil {
			if q := s.goodBelow(p); q != nil {
				// Wanted again: reload loads it (verified as any apply).
				s.log().Warn("falling back to the last good level at the next load", "from", p.Name, "to", q.Name)
				q.set(contract.StateApplied, "", "fallback after "+p.Name+" crash-looped", s.now())
				q.BootID = ""
			}
		}
	}
}

// reload loads again the applied patches a reboot dropped, from their
// verified local copies: the live level of each stream first (loading
// it replaces whatever is loaded), then the other patches. A patch
// unloaded in this boot by someone else is taken as reverted rather
// than forced back; one a cumulative patch of this boot took over is
// settled as that transition left it (see afterReplace). A live level
// that cannot be loaded gives way to the last good level before it.
func (s *session) reload(ctx context.Context) error {
	loaded := s.loaded()
	var want []*Patch
	var errs []error
	for _, p := range s.st.Patches {
		if p.State != contract.StateApplied || loaded[p.Name] || !s.forKernel(p) {
			continue
		}
		if p.BootID == s.boot && s.boot != "" {
			if s.replacer(p, loaded) == nil {
				p.set(contract.StateReverted, "", "unloaded outside the agent (stitch revert, or by hand)", s.now())
			}
			continue
		}
		want = append(want, p)
	}
	// Left over by an agent that stopped between a level's transition
	// and the hot-fixes' return.
	if err := s.afterReplace(ctx); err != nil {
		errs = append(errs, err)
	}
	if len(want) == 0 {
		return errors.Join(errs...)
	}
	if off, why := s.Disabled(); off {
		s.log().Warn("not loading patches", "why", why)
		return errors.Join(errs...)
	}
	slices.SortStableFunc(want, func(a, b *Patch) int {
		switch {
		case a.Replace == b.Replace:
			return 0
		case a.Replace:
			return -1
		}
		return 1
	})
	for _, p := range want {
		if p.State != contract.StateApplied || s.loaded()[p.Name] {
			continue
		}
		b, err := s.cached(p)
		if err != nil {
			p.set(contract.StateFailed, contract.ReasonVerifyFailed, err.Error(), s.now())
			s.report(p, contract.CheckBoot, false, contract.ReasonVerifyFailed, err.Error())
		} else if err := s.apply(ctx, p, b, contract.CheckBoot); err != nil {
			errs = append(errs, err)
			continue
		}
		if p.Level != nil && p.State != contract.StateApplied {
			if _, err := s.fallback(ctx, p, contract.CheckBoot); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// apply loads p (see load); when p is cumulative and took over, it
// settles the patches its transition took out of the kernel.
func (s *session) apply(ctx context.Context, p *Patch, b *bundle.Bundle, check string) error {
	if err := s.load(ctx, p, b, check); err != nil {
		return err
	}
	if p.State == contract.StateApplied && p.Replace {
		return s.afterReplace(ctx)
	}
	return nil
}

// replacer is the cumulative patch that took p out of the kernel: one
// the agent loaded in this boot after p and that is still live. Nil when
// p went by other hands.
func (s *session) replacer(p *Patch, loaded map[string]bool) *Patch {
	for _, r := range s.st.Patches {
		if r != p && r.Replace && r.State == contract.StateApplied && loaded[r.Name] && s.forKernel(r) &&
			r.BootID == s.boot && r.AppliedAt.After(p.AppliedAt) {
			return r
		}
	}
	return nil
}

// afterReplace settles the patches a cumulative patch's transition took
// out of the kernel (klp atomic replace drops every other livepatch,
// and livepatch.Apply unloads their modules): the level it follows in
// its stream is superseded (kept, as a level to fall back to); a hot-fix
// under a new level is loaded again on top of it (it is still wanted:
// its disappearance is no operator's revert); anything else is reverted
// in favour of the cumulative patch.
func (s *session) afterReplace(ctx context.Context) error {
	loaded := s.loaded()
	var errs []error
	for _, p := range s.st.Patches {
		if p.State != contract.StateApplied || loaded[p.Name] || !s.forKernel(p) || p.BootID != s.boot || s.boot == "" {
			continue
		}
		r := s.replacer(p, loaded)
		if r == nil {
			continue
		}
		s.unmark(p.Name)
		switch {
		case p.Level != nil && r.inStream(p.Level.Stream) && r.number() > p.number():
			s.log().Info("level superseded", "patch", p.Name, "by", r.Name)
			p.set(contract.StateReverted, "", "superseded by "+r.Name, s.now())
			p.Superseded = true
		case p.Replace || r.Level == nil:
			s.log().Info("patch replaced by a cumulative patch", "patch", p.Name, "by", r.Name)
			p.set(contract.StateReverted, "", "replaced by the cumulative patch "+r.Name, s.now())
		default:
			if off, _ := s.Disabled(); off {
				p.BootID = "" // loaded again when loading is back on
				continue
			}
			b, err := s.cached(p)
			if err != nil {
				p.set(contract.StateFailed, contract.ReasonVerifyFailed, err.Error(), s.now())
				s.report(p, contract.CheckApply, false, contract.ReasonVerifyFailed, err.Error())
				continue
			}
			s.log().Info("loading the hot-fix again on top of the new level", "patch", p.Name, "level", r.Name)
			if err := s.load(ctx, p, b, contract.CheckApply); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// dropUnoffered takes off the fallbacks of the live level p, which the
// server ordered reverted, the kept levels newer than the level of p's
// stream that the same answer offers below p: the server offers the last
// good level it knows, and a kept level above that one was blocklisted
// too (the server orders reverts only of applied patches, so no order
// named it).
func (s *session) dropUnoffered(p *Patch, actions []api.Action) {
	fallback := 0
	for _, a := range actions {
		if a.Op == api.OpApply && a.Level != nil && a.Level.Stream == p.Level.Stream && a.Level.Number < p.number() {
			fallback = max(fallback, a.Level.Number)
		}
	}
	if fallback == 0 {
		return
	}
	for _, c := range s.st.Patches {
		if c.inStream(p.Level.Stream) && c.Superseded && c.number() > fallback && c.number() < p.number() {
			s.log().Warn("not falling back to a level the server no longer offers", "patch", c.Name, "server's fallback", contract.LevelName(p.Level.Stream, fallback))
			c.set(contract.StateReverted, "", fmt.Sprintf("the server falls back to level %d, not to this one", fallback), s.now())
		}
	}
}

// goodBelow is the newest level of p's stream, for p's kernel, below p,
// that was good when a newer one superseded it, and whose bundle is
// kept: the level to fall back to.
func (s *session) goodBelow(p *Patch) *Patch {
	var q *Patch
	for _, c := range s.st.Patches {
		if c.inStream(p.Level.Stream) && c.Superseded && c.State == contract.StateReverted && c.number() < p.number() &&
			c.Release == p.Release && c.BuildID == p.BuildID && c.Bundle != "" && c.number() > q.number() {
			q = c
		}
	}
	return q
}

// fallback loads, in place of the live level p, the last good level of
// its stream (goodBelow), verified as any apply: it replaces p in one
// transition. A level that fails on the way is failed for good and the
// next older one is tried. It returns the level that took over, or nil
// when none did (there is none, or loading is off): then p is to be
// reverted plainly.
func (s *session) fallback(ctx context.Context, p *Patch, check string) (*Patch, error) {
	if p.Level == nil {
		return nil, nil
	}
	if off, why := s.Disabled(); off {
		s.log().Warn("not falling back to an earlier level", "patch", p.Name, "why", why)
		return nil, nil
	}
	for {
		q := s.goodBelow(p)
		if q == nil {
			s.log().Warn("no good earlier level to fall back to", "patch", p.Name)
			return nil, nil
		}
		s.log().Warn("falling back to the last good level", "from", p.Name, "to", q.Name)
		b, err := s.cached(q)
		if err != nil {
			q.set(contract.StateFailed, contract.ReasonVerifyFailed, err.Error(), s.now())
			s.report(q, check, false, contract.ReasonVerifyFailed, err.Error())
			continue
		}
		if err := s.apply(ctx, q, b, check); err != nil {
			return nil, fmt.Errorf("fall back from %s to %s: %w", p.Name, q.Name, err)
		}
		if q.State == contract.StateApplied {
			return q, nil
		}
	}
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
	p.Replace, p.Level, p.Fixes = m.Replace, m.Level, fixNames(m)
	// On a live level a patch that is no level is a hot-fix: the next
	// level's transition drops it, and the agent loads it again.
	p.HotFix = false
	if l := s.liveLevel(); !p.Replace && l != nil && s.loaded()[l.Name] {
		p.HotFix = true
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
	type verdict struct {
		p     *Patch
		check string
		blame []string
	}
	var blamed []verdict
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
		if len(blame) > 0 {
			blamed = append(blamed, verdict{p, nextCheck(p, checks), blame})
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
	// Patches that are no level first: a level's fallback loads the
	// hot-fixes again, and a blamed one must be failed before that.
	slices.SortStableFunc(blamed, func(a, b verdict) int { return a.p.number() - b.p.number() })
	for _, v := range blamed {
		if v.p.State == contract.StateApplied {
			s.fail(ctx, v.p, v.check, v.blame)
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
	// A level gives way to the last good level of its stream, not to
	// nothing.
	q, err := s.fallback(context.WithoutCancel(ctx), p, contract.CheckApply)
	if err != nil {
		s.log().Error("fallback failed; reverting the level", "patch", p.Name, "err", err)
	}
	if q != nil {
		s.unmark(p.Name)
		p.set(contract.StateFailed, reason, detail, s.now())
		s.report(p, check, false, reason, detail)
		return
	}
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
	hc, err := s.cfg.httpClient()
	if err != nil {
		// An unreadable pinned CA must not fall back to the system's
		// roots: every request fails with the reason.
		hc = &http.Client{Transport: failingTransport{err}}
	}
	return &api.Client{BaseURL: s.cfg.Server, Token: s.cfg.Token, HTTP: hc}
}

type failingTransport struct{ err error }

func (f failingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		r.Body.Close()
	}
	return nil, f.err
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

// unsupportedReason is why this kernel cannot be live-patched, for the
// server and for status.
const unsupportedReason = "the kernel has no livepatch support (no /sys/kernel/livepatch: CONFIG_LIVEPATCH)"

// reportUnsupported checks in as a machine that cannot be live-patched:
// no orders are asked for or obeyed.
func (s *session) reportUnsupported(ctx context.Context) error {
	if s.cfg.Server == "" {
		return nil
	}
	_, err := s.checkIn(ctx)
	return err
}

// checkInReport lists every patch with what the kernel actually holds: a
// patch the agent wants applied but that is not loaded (loading is off)
// is reported reverted, so the server never counts it as protection.
func (s *session) checkInReport() api.CheckIn {
	loaded := s.loaded()
	ci := api.CheckIn{KernelRelease: s.kernel.Release, KernelBuildID: s.kernel.BuildID, AgentVersion: s.Version, Patches: []api.PatchState{}}
	if !s.kernel.Livepatch {
		ci.Unsupported = unsupportedReason
	}
	for _, p := range s.st.Patches {
		if p.Release != "" && !s.forKernel(p) {
			continue
		}
		ps := api.PatchState{Target: p.Target, Name: p.Name, State: p.State, Since: p.Since, Reason: p.Reason}
		switch {
		case p.State == contract.StateApplied && !loaded[p.Name]:
			ps.State, ps.Reason = contract.StateReverted, "not loaded"
		case p.Superseded:
			ps.Reason = "superseded"
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
		case p.Superseded:
			// Not loaded, but kept to fall back to: no more.
			s.log().Warn("revert order for a superseded level: it is no longer one to fall back to", "patch", p.Name, "target", p.Target, "server", s.cfg.Server)
			p.set(contract.StateReverted, "", "blocklisted by the server after it was superseded", s.now())
			continue
		case p.State != contract.StateApplied:
			why = "that patch is " + p.State + ", not applied"
		}
		if why != "" {
			s.log().Warn("revert order ignored", "target", clip(a.Target), "server", s.cfg.Server, "why", why)
			continue
		}
		if p.Level != nil {
			s.dropUnoffered(p, actions)
			q, err := s.fallback(ctx, p, contract.CheckApply)
			if err != nil {
				return acted, fmt.Errorf("revert %s as ordered: %w", p.Name, err)
			}
			if q != nil {
				s.log().Warn("revert order obeyed: the level blocklisted by the server gave way to the last good one", "patch", p.Name, "target", p.Target, "level", q.Name, "server", s.cfg.Server)
				s.unmark(p.Name)
				p.set(contract.StateReverted, "", "blocklisted by the server; back to "+q.Name, s.now())
				acted = true
				continue
			}
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
	var offers []api.Action
	for _, a := range actions {
		if a.Op == api.OpApply && s.st.patch(a.Target) == nil {
			offers = append(offers, a)
		}
	}
	if len(offers) == 0 {
		// Nothing waits on the repository any more.
		s.st.RepoError, s.st.RepoErrorAt = "", time.Time{}
	}
	if off, why := s.Disabled(); off {
		for _, a := range offers {
			if a.Level != nil && a.Level.Number <= s.live(s.kernel.Release, s.kernel.BuildID, a.Level.Stream).number() {
				continue // no newer than the live level: nothing to take
			}
			s.st.Pending = append(s.st.Pending, a.Target)
			s.log().Warn("patch offered but loading is off", "target", a.Target, "why", why)
		}
		return acted, nil
	}
	// An offer that does not say whether it is a level (a mirror's, an
	// older server's) is fetched first: its verified manifest says.
	got := map[string]*fetched{}
	for i, a := range offers {
		if a.Level != nil {
			continue
		}
		f, decided, err := s.fetch(ctx, a)
		if err != nil {
			s.st.Pending = append(s.st.Pending, a.Target)
			return acted, err
		}
		if decided {
			acted = true
			continue
		}
		got[a.Target], offers[i].Level = f, f.b.Manifest.Level
	}
	// Levels first, as loading one drops every other livepatch: per
	// stream the newest offered above the live level, in one transition;
	// if it fails, the next newest.
	streams := map[string][]api.Action{}
	for _, a := range offers {
		if a.Level != nil && s.st.patch(a.Target) == nil {
			streams[a.Level.Stream] = append(streams[a.Level.Stream], a)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(streams)) {
		cands := streams[name]
		slices.SortStableFunc(cands, func(a, b api.Action) int { return b.Level.Number - a.Level.Number })
		for _, a := range cands {
			if a.Level.Number <= s.live(s.kernel.Release, s.kernel.BuildID, name).number() {
				break
			}
			ok, err := s.takeLevel(ctx, a, got[a.Target])
			acted = acted || ok
			if err != nil {
				s.st.Pending = append(s.st.Pending, a.Target)
				return acted, err
			}
		}
	}
	// Then the patches that are no level, stacked (on a live level they
	// are hot-fixes).
	for _, a := range offers {
		if a.Level != nil || s.st.patch(a.Target) != nil {
			continue
		}
		ok, err := s.fetchAndLoad(ctx, a, got[a.Target])
		acted = acted || ok
		if err != nil {
			s.st.Pending = append(s.st.Pending, a.Target)
			return acted, err
		}
	}
	return acted, nil
}

// fetched is a bundle fetched and verified through TUF, and its cached
// copy.
type fetched struct {
	b      *bundle.Bundle
	path   string
	sha256 string
}

// fetch fetches a target through TUF. A bundle that is signed and intact
// but malformed is refused, recorded and reported: decided. Repository
// and network trouble is an error, and the offer stays pending.
func (s *session) fetch(ctx context.Context, a api.Action) (f *fetched, decided bool, err error) {
	tc, err := s.tuf()
	if err != nil {
		return nil, false, err
	}
	b, path, err := tc.Fetch(ctx, a.Target)
	switch {
	case err == nil:
		s.st.RepoError, s.st.RepoErrorAt = "", time.Time{}
	case ctx.Err() != nil:
		return nil, false, err
	case errors.Is(err, bundle.ErrVerify):
		// Expired or rolled-back metadata, a bad signature, content not
		// of its signed hash: the repository's problem (a refresh racing
		// the fetch, a stale mirror, tampering on the way), not the
		// patch's. Tried again at the next pass; no failure is reported.
		s.repoProblem(a.Target, err)
		return nil, false, fmt.Errorf("%w: %w", ErrRepository, err)
	case errors.Is(err, bundle.ErrBadBundle), errors.Is(err, contract.ErrBadManifest):
		// Signed and intact as published, and still no valid bundle: the
		// patch itself is bad.
		p := s.newPatch(a, nil)
		s.st.Patches = append(s.st.Patches, p)
		s.log().Error("bundle refused", "target", a.Target, "err", err)
		p.set(contract.StateRefused, contract.ReasonVerifyFailed, err.Error(), s.now())
		s.report(p, contract.CheckApply, false, contract.ReasonVerifyFailed, err.Error())
		return nil, true, nil
	default:
		// Network trouble, a missing target: try again later.
		s.repoProblem(a.Target, err)
		return nil, false, fmt.Errorf("%w: %w", ErrServer, err)
	}
	if decided, err := s.checkSigner(ctx, tc, a, b); err != nil || decided {
		return nil, decided, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, false, err
	}
	return &fetched{b: b, path: path, sha256: bundle.SHA256Hex(data)}, false, nil
}

// checkSigner holds a fetched bundle's module to the fleet's
// module-signing certificates, which the repository publishes as signed
// targets: when there are any, a module that none of them signed is
// refused, recorded and reported (decided), and nothing is loaded; a
// kernel under Secure Boot would refuse it anyway, with no more than an
// errno. A repository that publishes no certificate signs no modules,
// and nothing is checked.
func (s *session) checkSigner(ctx context.Context, tc *bundle.Client, a api.Action, b *bundle.Bundle) (decided bool, err error) {
	certs, err := tc.SigningCerts(ctx)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return false, err
	case errors.Is(err, bundle.ErrVerify):
		s.repoProblem(a.Target, err)
		return false, fmt.Errorf("%w: %w", ErrRepository, err)
	default:
		s.repoProblem(a.Target, err)
		return false, fmt.Errorf("%w: %w", ErrServer, err)
	}
	if err := s.keepSigningCerts(certs); err != nil {
		s.log().Warn("keep the fleet's module-signing certificates", "err", err)
	}
	if len(certs) == 0 {
		return false, nil
	}
	signer, err := modsign.Verify(b.Module, certs)
	if err == nil {
		s.log().Info("module signer verified", "target", a.Target, "key", modsign.KeyDescription(signer))
		return false, nil
	}
	var fix string
	switch {
	case errors.Is(err, modsign.ErrUnsigned):
		fix = "the repository signs modules but this one is not signed: publish it again (`stitch publish` signs it with the repository's current key)"
	case errors.Is(err, modsign.ErrUntrusted):
		fix = "it is not signed by any of the fleet's module-signing certificates (`stitch keys signing list`; a retired key's bundles are refused): publish it again, which signs it with the current key"
	default:
		fix = "the module or its signature was changed after signing: rebuild and publish it again"
	}
	err = fmt.Errorf("%w: module %s: %w; %s", bundle.ErrVerify, b.Manifest.Module, err, fix)
	p := s.newPatch(a, nil)
	p.Name = b.Manifest.Name
	s.st.Patches = append(s.st.Patches, p)
	s.log().Error("module signer refused", "target", a.Target, "err", err)
	p.set(contract.StateRefused, contract.ReasonVerifyFailed, err.Error(), s.now())
	s.report(p, contract.CheckApply, false, contract.ReasonVerifyFailed, err.Error())
	return true, nil
}

// newPatch is the record of an offer, filled in from its verified
// bundle when there is one. The server offers only patches for this
// kernel; the manifest says for sure.
func (s *session) newPatch(a api.Action, f *fetched) *Patch {
	p := &Patch{Target: a.Target, Name: a.Name, CVEs: a.CVEs, Since: s.now(), Release: s.kernel.Release, BuildID: s.kernel.BuildID, Server: s.cfg.Server}
	if f == nil {
		return p
	}
	m := &f.b.Manifest
	p.Name, p.Bundle, p.BundleSHA256 = m.Name, f.path, f.sha256
	p.Description, p.Release, p.BuildID = m.Description, m.Kernel.Release, m.Kernel.BuildID
	p.Replace, p.Level, p.Fixes = m.Replace, m.Level, fixNames(m)
	if len(p.CVEs) == 0 || p.Level != nil {
		// A level's CVEs are its manifest's, all of them.
		p.CVEs = m.CVEs
	}
	return p
}

// takeLevel fetches an offered level and moves to it in one transition:
// loading it replaces the live level (and drops the hot-fixes, which
// afterReplace loads again). It reports whether the level was decided
// on (applied, refused or failed).
func (s *session) takeLevel(ctx context.Context, a api.Action, f *fetched) (bool, error) {
	if f == nil {
		var decided bool
		var err error
		if f, decided, err = s.fetch(ctx, a); err != nil || decided {
			return decided, err
		}
	}
	m := &f.b.Manifest
	if m.Level == nil || m.Level.Stream != a.Level.Stream || m.Level.Number != a.Level.Number {
		// The check-in answer is not signed; the manifest is.
		s.log().Warn("offered level does not match its signed manifest; not taken", "target", clip(a.Target),
			"offered", contract.LevelName(a.Level.Stream, a.Level.Number), "manifest", m.Name)
		return false, nil
	}
	p := s.newPatch(a, f)
	s.st.Patches = append(s.st.Patches, p)
	if l := s.liveLevel(); l != nil && !l.inStream(m.Level.Stream) {
		err := fmt.Errorf("%s would replace %s, the live level of stream %s: the kernel runs one cumulative patch, so a machine follows one stream per kernel (revert %s first to change streams)",
			p.Name, l.Name, l.Level.Stream, l.Name)
		s.log().Error("level refused", "patch", p.Name, "err", err)
		p.set(contract.StateRefused, contract.ReasonApplyFailed, err.Error(), s.now())
		s.report(p, contract.CheckApply, false, contract.ReasonApplyFailed, err.Error())
		return true, nil
	}
	if l := s.live(p.Release, p.BuildID, m.Level.Stream); l != nil {
		s.log().Info("moving to a new level", "from", l.Name, "to", p.Name)
	}
	if err := s.apply(ctx, p, f.b, contract.CheckApply); err != nil {
		return s.undecided(p), err
	}
	return true, nil
}

// fetchAndLoad fetches a target through TUF (unless f holds it already)
// and loads it. It reports whether a patch was decided on (applied,
// refused or failed).
func (s *session) fetchAndLoad(ctx context.Context, a api.Action, f *fetched) (bool, error) {
	if f == nil {
		var decided bool
		var err error
		if f, decided, err = s.fetch(ctx, a); err != nil || decided {
			return decided, err
		}
	}
	p := s.newPatch(a, f)
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
	if err := s.apply(ctx, p, f.b, contract.CheckApply); err != nil {
		return s.undecided(p), err
	}
	return true, nil
}

// undecided forgets p again when loading it stopped short of a decision
// (no root, a transition already running), so that it is offered and
// tried again; it says whether p was decided on after all (the error
// came later, from a hot-fix loaded again after it).
func (s *session) undecided(p *Patch) bool {
	if p.State != "" {
		return true
	}
	s.st.Patches = slices.DeleteFunc(s.st.Patches, func(q *Patch) bool { return q == p })
	return false
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
