package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

func (s *Server) self(w http.ResponseWriter, r *http.Request, m store.Machine) {
	ps, err := s.Store.MachinePatches(r.Context(), m.ID)
	if err != nil {
		s.internal(w, "read machine", err)
		return
	}
	v := api.MachineView{ID: m.ID, Hostname: m.Hostname, Group: m.Group, Channel: m.Channel, KernelRelease: m.KernelRelease,
		KernelBuildID: m.KernelBuildID, AgentVersion: m.AgentVersion, LastCheckIn: m.LastCheckIn, Patches: []api.PatchState{}}
	for _, p := range ps {
		v.Patches = append(v.Patches, api.PatchState{Target: p.Target, Name: p.Name, State: p.State, Since: p.Since, Reason: p.Reason})
	}
	reply(w, http.StatusOK, v)
}

// offered says whether machine m may be offered patch p now: same kernel
// (release and build-id), the rollout running (or complete), the patch
// within the channel's cutoff and the group's pin, and the machine's rank
// within the share of the stage its channel has reached. A channel with a
// deploy delay follows the rollout's stages that much later, so its
// machines get a patch in stages too, after the earlier channels had it.
// The offers a check-in makes are recorded: those machines, and only
// those, may report on the patch, even after the rollout stopped.
func (s *Server) offered(p store.Patch, m store.Machine) bool {
	switch {
	case p.KernelRelease != m.KernelRelease || p.KernelBuildID != m.KernelBuildID:
		return false
	case !rollout.State(p.State).Offers():
		return false
	case !m.Cutoff.IsZero() && p.RegisteredAt.After(m.Cutoff), !m.Pin.IsZero() && p.RegisteredAt.After(m.Pin):
		return false
	}
	return s.policy().Reaches(s.stageAt(p, s.now().Add(-m.Delay)), p.Target, m.ID)
}

// stageAt is the stage p's rollout had reached at t, -1 before it began.
func (s *Server) stageAt(p store.Patch, t time.Time) int {
	if len(p.StageStarted) == 0 { // no history: the current stage since registration
		if t.Before(p.RegisteredAt) {
			return -1
		}
		return p.Stage
	}
	stage := -1
	for i, at := range p.StageStarted {
		if !at.After(t) {
			stage = i
		}
	}
	return stage
}

func (s *Server) checkIn(w http.ResponseWriter, r *http.Request, m store.Machine) {
	var req api.CheckIn
	if !decode(w, r, &req) {
		return
	}
	if err := req.Validate(); err != nil {
		fail(w, http.StatusBadRequest, "check-in: "+err.Error())
		return
	}
	now := s.now()
	ci := store.CheckIn{KernelRelease: req.KernelRelease, KernelBuildID: req.KernelBuildID, AgentVersion: req.AgentVersion, Unsupported: req.Unsupported}
	reported := map[string]string{} // target → state
	for _, p := range req.Patches {
		if _, dup := reported[p.Target]; dup {
			fail(w, http.StatusBadRequest, fmt.Sprintf("check-in: target %s listed twice: report each patch once", p.Target))
			return
		}
		reported[p.Target] = p.State
		ci.Patches = append(ci.Patches, store.MachinePatch{Target: p.Target, Name: p.Name, State: p.State, Since: p.Since, Reason: p.Reason})
	}
	if err := s.Store.CheckIn(r.Context(), m.ID, ci, now); err != nil {
		s.internal(w, "check-in", err)
		return
	}
	m.KernelRelease, m.KernelBuildID = req.KernelRelease, req.KernelBuildID
	if req.Unsupported != "" { // nothing to offer a kernel that cannot take it
		reply(w, http.StatusOK, api.CheckInResponse{Actions: []api.Action{}, NextCheckinSeconds: int(s.checkInEvery().Seconds()), Checks: s.schedule()})
		return
	}
	patches, err := s.Store.PatchesForKernel(r.Context(), m.KernelRelease, m.KernelBuildID)
	if err != nil {
		s.internal(w, "check-in", err)
		return
	}
	resp := api.CheckInResponse{Actions: []api.Action{}, NextCheckinSeconds: int(s.checkInEvery().Seconds()), Checks: s.schedule()}
	var offers []string
	// Levels of patch streams: one level per stream (levels.go).
	byStream := streams(patches)
	names := slices.Sorted(maps.Keys(byStream))
	past := s.machineOffers(r.Context(), m.ID)
	for _, name := range names {
		acts, offered, err := s.levelOrders(byStream[name], reported, m, past)
		if err != nil {
			s.internal(w, "check-in", err)
			return
		}
		resp.Actions, offers = append(resp.Actions, acts...), append(offers, offered...)
	}
	for _, p := range patches {
		if p.Level != nil {
			continue
		}
		state, known := reported[p.Target]
		switch {
		case state == contract.StateApplied && rollout.State(p.State).Reverts():
			resp.Actions = append(resp.Actions, api.Action{Target: p.Target, Name: p.Name, CVEs: p.CVEs, Op: api.OpRevert})
		case !known && s.offered(p, m):
			// A patch the machine reported in any state (failed, refused,
			// reverted) is not offered again: its agent decided.
			resp.Actions = append(resp.Actions, api.Action{Target: p.Target, Name: p.Name, CVEs: p.CVEs, Op: api.OpApply})
			offers = append(offers, p.Target)
		}
	}
	// Recorded before the answer: only a machine offered a patch may
	// report on it.
	if len(offers) > 0 {
		if err := s.Store.RecordOffers(r.Context(), m.ID, offers, now); err != nil {
			s.internal(w, "check-in", err)
			return
		}
	}
	s.metrics.checkins.Add(1)
	s.log().Debug("check-in", "machine", m.ID, "kernel", m.KernelRelease, "patches", len(req.Patches), "actions", len(resp.Actions))
	reply(w, http.StatusOK, resp)
}

func (s *Server) checkInEvery() time.Duration {
	if s.CheckInEvery > 0 {
		return s.CheckInEvery
	}
	return time.Hour
}

// schedule is the health checks at the policy's times, which machines
// are told in every check-in answer.
func (s *Server) schedule() contract.Schedule { return contract.NewSchedule(s.policy().Checks...) }

// errNotOffered refuses a report about a patch the machine was never
// offered: it must not widen a rollout, nor count against one, by itself.
var errNotOffered = errors.New("not offered")

// silentBefore is the time before which a machine short of a check must
// last have been heard from to count as lost.
func (s *Server) silentBefore(now time.Time) time.Time {
	return now.Add(-rollout.SilentAfter(s.checkInEvery()))
}

// decide runs the rule book on p's rollout inside its transaction and
// applies the decision to p; it returns the event to count and log ("" for
// none). The stage has soaked when it lasted a check-in interval since the
// rollout last changed.
func (s *Server) decide(tx store.RolloutTx, p *store.Patch, now time.Time) (event string, err error) {
	pol := s.policy()
	keys, err := tx.Counts(len(pol.Checks), s.silentBefore(now))
	if err != nil {
		return "", err
	}
	st := rollout.Status{State: rollout.State(p.State), Stage: p.Stage, Soaked: now.Sub(p.UpdatedAt) >= s.checkInEvery(), Tolerated: p.Tolerated}
	d := rollout.Decide(pol, st, keys)
	switch d.Action {
	case rollout.Advance:
		p.Stage++
		p.StageStarted = append(p.StageStarted, now)
		event = "advanced"
	case rollout.Finish:
		p.State, event = string(rollout.Complete), "completed"
	case rollout.Halt:
		p.State, p.Reason, event = string(rollout.Halted), d.Reason, "halted"
	case rollout.Blocklist:
		p.State, p.Reason, event = string(rollout.Blocklisted), d.Reason, "blocklisted"
	default:
		return "", nil
	}
	p.UpdatedAt = now
	return event, nil
}

func (s *Server) health(w http.ResponseWriter, r *http.Request, m store.Machine) {
	var h api.Health
	if !decode(w, r, &h) {
		return
	}
	sched := s.schedule()
	if err := h.Validate(sched); err != nil {
		fail(w, http.StatusBadRequest, "health: "+err.Error())
		return
	}
	pol, now := s.policy(), s.now()
	var event, reason string
	var logFailure bool // a machine's failure is logged once, when new
	err := s.Store.Rollout(r.Context(), h.Target, func(tx store.RolloutTx, p *store.Patch) error {
		if p.Name != h.Name {
			return fmt.Errorf("%w: target %s is patch %s, not %s", errNotOffered, p.Target, p.Name, h.Name)
		}
		rm, ok, err := tx.Machine(m.ID)
		if err != nil {
			return err
		}
		if !ok {
			// The first report, whatever its check, starts the machine's
			// clock; the server must have offered it the patch (perhaps
			// just before the rollout stopped).
			offered, err := tx.Offered(m.ID)
			if err != nil {
				return err
			}
			if !offered {
				return fmt.Errorf("%w: %s was not offered %s (%s at stage %d): check in first, the server offers what it rolls out",
					errNotOffered, m.ID, p.Target, p.State, p.Stage)
			}
			rm.AppliedAt = now
		}
		// A failure counts once per machine: a machine that failed stays
		// failed whatever it reports next.
		newlyFailed := !h.Healthy && !rm.Failed
		switch {
		case newlyFailed:
			rm.Failed, rm.Reason = true, h.Reason
			logFailure = true
		case h.Healthy && !rm.Failed:
			rm.Checks = pol.ChecksPassed(rm.AppliedAt, now, rm.Checks, sched.Index(h.Check))
		}
		rm.LastReport = now
		if err := tx.PutMachine(rm); err != nil {
			return err
		}
		if err := tx.PutHealth(store.HealthReport{Target: p.Target, MachineID: m.ID, Check: h.Check, Healthy: h.Healthy, Reason: h.Reason, Detail: h.Detail, At: now}); err != nil {
			return err
		}
		if !newlyFailed || p.State == string(rollout.Blocklisted) {
			return nil // nothing to decide (Decide keeps a blocklisting): spare the counts
		}
		// A new failure is judged at once, whatever the rollout's state:
		// halted or complete, past both thresholds machines that have it
		// must still revert.
		if event, err = s.decide(tx, p, now); err != nil {
			return err
		}
		if event == "halted" || event == "blocklisted" {
			p.Reason = fmt.Sprintf("%s (last: %s: %s)", p.Reason, m.ID, h.Reason)
		}
		reason = p.Reason
		return nil
	})
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, fmt.Sprintf("health: target %s is not a registered patch", h.Target))
		return
	case errors.Is(err, errNotOffered):
		fail(w, http.StatusConflict, "health: "+err.Error())
		return
	case err != nil:
		s.internal(w, "health report", err)
		return
	}
	if h.Healthy {
		s.metrics.healthy.Add(1)
	} else {
		s.metrics.failed.Add(1)
	}
	if logFailure {
		s.log().Warn("patch failed on a machine", "machine", m.ID, "target", h.Target, "check", h.Check, "reason", h.Reason, "detail", clip(h.Detail, 256))
	}
	s.rolloutEvent(event, h.Target, reason, "machine", m.ID)
	w.WriteHeader(http.StatusNoContent)
}

// rolloutEvent counts and logs what decide did to target's rollout ("":
// nothing); a stop is a warning, with its reason.
func (s *Server) rolloutEvent(event, target, reason string, attrs ...any) {
	switch event {
	case "":
		return
	case "halted", "blocklisted":
		s.log().Warn("rollout "+event, append([]any{"target", target, "reason", reason}, attrs...)...)
	default:
		s.log().Info("rollout "+event, append([]any{"target", target}, attrs...)...)
	}
	s.metrics.event(event)
}

// Tick runs the rule book (rollout.Decide) on every running rollout whose
// stage has lasted a check-in interval, so that each machine in it had its
// chance to check in and take the patch: it advances the stage once every
// machine that applied the patch and did not fail passed every health
// check, machines silent for longer than rollout.SilentAfter counting as
// lost instead of holding it; a stage nobody took after that long moves
// on too, so small fleets are not stuck; the last stage completes only
// with a healthy machine. Counts that changed with no new failure (lost
// machines, the per-key caps) can halt or blocklist it here too. Serve
// calls it every 30 seconds; it is safe on several replicas at once, as
// each rollout is decided inside its locked transaction.
func (s *Server) Tick(ctx context.Context) error {
	ps, err := s.Store.Patches(ctx)
	if err != nil {
		return fmt.Errorf("tick: %w", err)
	}
	now, soak := s.now(), s.checkInEvery()
	for _, p := range ps {
		if p.State != string(rollout.Running) || now.Sub(p.UpdatedAt) < soak {
			continue
		}
		var event, reason string
		err := s.Store.Rollout(ctx, p.Target, func(tx store.RolloutTx, p *store.Patch) error {
			if p.State != string(rollout.Running) || now.Sub(p.UpdatedAt) < soak {
				return nil // another replica was first
			}
			var derr error
			event, derr = s.decide(tx, p, now)
			reason = p.Reason
			return derr
		})
		if err != nil {
			return fmt.Errorf("tick: %w", err)
		}
		s.rolloutEvent(event, p.Target, reason)
	}
	return nil
}
