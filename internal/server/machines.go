package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

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

// offered says whether machine m may receive patch p now: same kernel
// (release and build-id), the rollout running (or complete), the patch
// within the channel's cutoff and the group's pin, and the machine's rank
// within the share of the stage its channel has reached. A channel with a
// deploy delay follows the rollout's stages that much later, so its
// machines get a patch in stages too, after the earlier channels had it.
// anyState leaves out the rollout's state: a machine that was offered the
// patch may still report on it after the rollout stopped.
func (s *Server) offered(p store.Patch, m store.Machine, anyState bool) bool {
	switch {
	case p.KernelRelease != m.KernelRelease || p.KernelBuildID != m.KernelBuildID:
		return false
	case !anyState && p.State != string(rollout.Running) && p.State != string(rollout.Complete):
		return false
	case !m.Cutoff.IsZero() && p.RegisteredAt.After(m.Cutoff), !m.Pin.IsZero() && p.RegisteredAt.After(m.Pin):
		return false
	}
	stage := s.stageAt(p, s.now().Add(-m.Delay))
	return stage >= 0 && rollout.Rank(p.Target, m.ID) < s.shareOf(stage)
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

// shareOf is the share of machines a stage reaches. A stage past the
// policy's last (the server restarted with fewer stages) reaches everyone.
func (s *Server) shareOf(stage int) float64 {
	st := s.policy().Stages
	return st[min(max(stage, 0), len(st)-1)]
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
	ci := store.CheckIn{KernelRelease: req.KernelRelease, KernelBuildID: req.KernelBuildID, AgentVersion: req.AgentVersion}
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
	patches, err := s.Store.PatchesForKernel(r.Context(), m.KernelRelease, m.KernelBuildID)
	if err != nil {
		s.internal(w, "check-in", err)
		return
	}
	resp := api.CheckInResponse{Actions: []api.Action{}, NextCheckinSeconds: int(s.checkInEvery().Seconds())}
	for _, p := range patches {
		state, known := reported[p.Target]
		switch {
		case state == api.StateApplied && p.State == string(rollout.Blocklisted):
			resp.Actions = append(resp.Actions, api.Action{Target: p.Target, Name: p.Name, CVEs: p.CVEs, Op: api.OpRevert})
		case !known && s.offered(p, m, false):
			// A patch the machine reported in any state (failed, refused,
			// reverted) is not offered again: its agent decided.
			resp.Actions = append(resp.Actions, api.Action{Target: p.Target, Name: p.Name, CVEs: p.CVEs, Op: api.OpApply})
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

// timedChecks are the health checks that fall at the policy's times, in
// order.
var timedChecks = []string{api.Check1m, api.Check5m, api.Check15m}

// errNotOffered refuses a report about a patch the machine was never
// offered: it must not widen a rollout, nor count against one, by itself.
var errNotOffered = errors.New("not offered")

func (s *Server) health(w http.ResponseWriter, r *http.Request, m store.Machine) {
	var h api.Health
	if !decode(w, r, &h) {
		return
	}
	if err := h.Validate(); err != nil {
		fail(w, http.StatusBadRequest, "health: "+err.Error())
		return
	}
	pol, now := s.policy(), s.now()
	var event string
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
			// clock; it must have been offered the patch (perhaps just
			// before the rollout stopped).
			if !s.offered(*p, m, true) {
				return fmt.Errorf("%w: %s was not offered %s (kernel %s, stage %d, %s)", errNotOffered, m.ID, p.Target, m.KernelRelease, p.Stage, p.State)
			}
			rm.AppliedAt = now
		}
		newlyFailed := !h.Healthy && !rm.Failed
		switch {
		case newlyFailed:
			rm.Failed, rm.Reason = true, h.Reason
			logFailure = true
		case h.Healthy && !rm.Failed:
			rm.Checks = pol.ChecksPassed(rm.AppliedAt, now, rm.Checks, slices.Index(timedChecks, h.Check))
		}
		if err := tx.PutMachine(rm); err != nil {
			return err
		}
		if err := tx.PutHealth(store.HealthReport{Target: p.Target, MachineID: m.ID, Check: h.Check, Healthy: h.Healthy, Reason: h.Reason, Detail: h.Detail, At: now}); err != nil {
			return err
		}
		if !newlyFailed || p.State == string(rollout.Blocklisted) {
			return nil
		}
		// Past the threshold a patch is blocklisted whatever its state:
		// halted or complete, machines that have it must still revert.
		c, err := tx.Counts(len(pol.Checks))
		if err != nil {
			return err
		}
		if pol.Exceeded(c.Failed, c.Machines) {
			p.State = string(rollout.Blocklisted)
			p.Reason = fmt.Sprintf("%d of %d machines failed at stage %d (last: %s: %s)", c.Failed, c.Machines, p.Stage, m.ID, h.Reason)
			p.UpdatedAt, event = now, "blocklisted"
		}
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
	if event != "" {
		s.metrics.event(event)
		s.log().Warn("rollout "+event, "target", h.Target, "machine", m.ID)
	}
	w.WriteHeader(http.StatusNoContent)
}

// Tick advances every running rollout whose stage is done: the stage has
// lasted a check-in interval (so each machine in it had its chance to
// check in and take the patch) and every machine that applied the patch
// and did not fail passed every health check (failures within the
// tolerance do not hold it back; past it the patch is blocklisted). A stage nobody took after that long (a small
// fleet's 1% is often nobody) moves on too, so small fleets are not stuck;
// the last stage completes only with machines. Serve calls it every 30
// seconds; it is safe on several replicas at once, as each rollout is
// decided inside its locked transaction.
func (s *Server) Tick(ctx context.Context) error {
	ps, err := s.Store.Patches(ctx)
	if err != nil {
		return fmt.Errorf("tick: %w", err)
	}
	pol, now, soak := s.policy(), s.now(), s.checkInEvery()
	for _, p := range ps {
		if p.State != string(rollout.Running) || now.Sub(p.UpdatedAt) < soak {
			continue
		}
		var event string
		err := s.Store.Rollout(ctx, p.Target, func(tx store.RolloutTx, p *store.Patch) error {
			if p.State != string(rollout.Running) || now.Sub(p.UpdatedAt) < soak {
				return nil // another replica was first
			}
			c, err := tx.Counts(len(pol.Checks))
			if err != nil {
				return err
			}
			last := p.Stage >= len(pol.Stages)-1
			switch {
			case rollout.CanAdvance(c.Machines, c.Failed, c.Unfinished) && last:
				p.State, event = string(rollout.Complete), "completed"
			case rollout.CanAdvance(c.Machines, c.Failed, c.Unfinished), c.Machines == 0 && !last:
				p.Stage++
				p.StageStarted = append(p.StageStarted, now)
				event = "advanced"
			default:
				return nil
			}
			p.UpdatedAt = now
			return nil
		})
		if err != nil {
			return fmt.Errorf("tick: %w", err)
		}
		if event != "" {
			s.metrics.event(event)
			s.log().Info("rollout "+event, "target", p.Target)
		}
	}
	return nil
}
