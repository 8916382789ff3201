package server

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// registerPatch starts the rollout of a target already published in the
// server's repository: the bundle's manifest says which kernel (release
// and build-id) it is for and which CVEs it fixes.
func (s *Server) registerPatch(w http.ResponseWriter, r *http.Request) {
	var req api.PatchRequest
	if !decode(w, r, &req) {
		return
	}
	if contract.ValidContainedTarget(req.Target) {
		fail(w, http.StatusBadRequest, fmt.Sprintf("target %q is a contained record: its kernel needs no patch, so there is nothing to roll out; the server reads contained records from its repository by itself (see /v1/admin/reports/fixes)", req.Target))
		return
	}
	if !contract.ValidTarget(req.Target) {
		published, err := s.Repo.Targets()
		if err != nil {
			s.internal(w, "list targets", err)
			return
		}
		var ok bool
		if req.Target, ok = resolveTarget(w, published, req.Target, "published (see `stitch repo list`)"); !ok {
			return
		}
	}
	b, err := s.Repo.Open(req.Target)
	switch {
	case errors.Is(err, bundle.ErrNotFound):
		fail(w, http.StatusNotFound, err.Error()+": publish it first")
		return
	case err != nil:
		s.internal(w, "read target", err)
		return
	}
	now := s.now()
	m := b.Manifest
	p := store.Patch{Target: req.Target, Name: m.Name, KernelRelease: m.Kernel.Release, KernelBuildID: m.Kernel.BuildID,
		CVEs: m.CVEs, Upstream: m.Upstreams(), Description: m.Description, RegisteredAt: now, UpdatedAt: now, State: string(rollout.Running), StageStarted: []time.Time{now},
		Level: m.Level}
	for _, f := range m.Fixes {
		p.Fixes = append(p.Fixes, store.Fix{Name: f.Name, CVEs: f.CVEs, Upstream: f.Upstream})
	}
	err = s.Store.RegisterPatch(r.Context(), p)
	var taken *store.LevelTakenError
	switch {
	case errors.As(err, &taken):
		fail(w, http.StatusBadRequest, fmt.Sprintf("%s is level %d of stream %s for kernel %s (build-id %s), which is registered already as %s: "+
			"a level number stands for one build on every machine; build the next level (stitch build --stream FILE --level %d) for what changed",
			req.Target, taken.Number, taken.Stream, taken.Release, taken.BuildID, taken.Target, taken.Number+1))
		return
	case errors.Is(err, store.ErrExists):
		fail(w, http.StatusConflict, fmt.Sprintf("patch %s is already registered: see /v1/admin/reports/patches", req.Target))
		return
	case err != nil:
		s.internal(w, "register patch", err)
		return
	}
	s.metrics.event("started")
	if l := p.Level; l != nil {
		s.log().Info("rollout started", "target", p.Target, "kernel", p.KernelRelease, "build_id", p.KernelBuildID, "cves", p.CVEs, "stream", l.Stream, "level", l.Number)
	} else {
		s.log().Info("rollout started", "target", p.Target, "kernel", p.KernelRelease, "build_id", p.KernelBuildID, "cves", p.CVEs)
	}
	reply(w, http.StatusCreated, s.patchReport(p, nil, nil, nil, nil))
}

// operate is the operator's halt, resume and blocklist.
func (s *Server) operate(w http.ResponseWriter, r *http.Request) {
	target, op := r.PathValue("release")+"/"+r.PathValue("file"), rollout.Op(r.PathValue("op"))
	if r.PathValue("release") == "" { // a patch named by its NAME alone
		target = r.PathValue("name")
	}
	if !contract.ValidTarget(target) {
		ps, err := s.Store.Patches(r.Context())
		if err != nil {
			s.internal(w, "list patches", err)
			return
		}
		registered := make([]string, len(ps))
		for i, p := range ps {
			registered[i] = p.Target
		}
		var ok bool
		if target, ok = resolveTarget(w, registered, target, "registered (see `stitch fleet patches`)"); !ok {
			return
		}
	}
	var req api.RolloutRequest
	if r.ContentLength != 0 && !decode(w, r, &req) { // the reason is optional, and so is the body
		return
	}
	if len(req.Reason) > 1024 {
		fail(w, http.StatusBadRequest, "reason: at most 1024 bytes")
		return
	}
	event := opEvent(op)
	if event == "" {
		fail(w, http.StatusNotFound, fmt.Sprintf("unknown rollout operation %q: want halt, resume or blocklist", op))
		return
	}
	var out store.Patch
	now := s.now()
	err := s.Store.Rollout(r.Context(), target, func(tx store.RolloutTx, p *store.Patch) error {
		// The rule book decides which transitions are allowed.
		state, err := rollout.Operate(rollout.State(p.State), op)
		if err != nil {
			return fmt.Errorf("%w: rollout of %s: %v", errConflict, p.Target, err)
		}
		reason := req.Reason
		if reason == "" {
			reason = "by the operator"
		}
		switch state {
		case rollout.Running:
			// Resuming accepts the failures counted so far: the
			// thresholds apply to those that come after.
			pol := s.policy()
			keys, err := tx.Counts(len(pol.Checks), s.silentBefore(now))
			if err != nil {
				return err
			}
			p.Tolerated, reason = pol.Tally(keys).Counted, ""
		}
		p.State, p.Reason, p.UpdatedAt = string(state), reason, now
		out = *p
		return nil
	})
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, fmt.Sprintf("patch %s is not registered", target))
		return
	case errors.Is(err, errConflict):
		fail(w, http.StatusConflict, err.Error())
		return
	case err != nil:
		s.internal(w, "rollout "+string(op), err)
		return
	}
	s.metrics.event(event)
	s.log().Warn("rollout "+string(op)+" by the operator", "target", target, "reason", req.Reason, "operator", actorOf(r.Context()).Name)
	reply(w, http.StatusOK, s.patchReport(out, nil, nil, nil, nil))
}

// opEvent is the rollout event an operator's op counts as, "" for an
// unknown op.
func opEvent(op rollout.Op) string {
	switch op {
	case rollout.OpHalt:
		return "halted"
	case rollout.OpResume:
		return "resumed"
	case rollout.OpBlocklist:
		return "blocklisted"
	}
	return ""
}

var errConflict = errors.New("conflict")

// resolveTarget finds the one target among ts that query names (the
// target, RELEASE/NAME or NAME), or answers why not: none (404), several
// (409, listing them). which says what ts are, for the answer.
func resolveTarget(w http.ResponseWriter, ts []string, query, which string) (string, bool) {
	release, name, two := strings.Cut(query, "/")
	if !two {
		name = release
	}
	if !contract.ValidName(name) || two && !contract.ValidRelease(release) {
		fail(w, http.StatusBadRequest, fmt.Sprintf("patch %q: want a target (RELEASE/NAME-HASH.stitch), RELEASE/NAME or NAME", query))
		return "", false
	}
	switch m := contract.TargetsNamed(ts, query); len(m) {
	case 1:
		return m[0], true
	case 0:
		fail(w, http.StatusNotFound, fmt.Sprintf("no target %s is named %q: give the target (RELEASE/NAME-HASH.stitch), RELEASE/NAME or NAME", which, query))
	default:
		fail(w, http.StatusConflict, fmt.Sprintf("%q names %d targets: %s; give RELEASE/NAME or the whole target", query, len(m), strings.Join(m, ", ")))
	}
	return "", false
}

func (s *Server) channels(w http.ResponseWriter, r *http.Request) {
	cs, err := s.Store.Channels(r.Context())
	if err != nil {
		s.internal(w, "channels", err)
		return
	}
	out := []api.Channel{}
	for _, c := range cs {
		out = append(out, api.Channel{Name: c.Name, DelaySeconds: int64(c.Delay / time.Second), Cutoff: c.Cutoff})
	}
	reply(w, http.StatusOK, out)
}

func (s *Server) putChannel(w http.ResponseWriter, r *http.Request) {
	var c api.Channel
	if !decode(w, r, &c) {
		return
	}
	if c.Name == "" {
		c.Name = r.PathValue("name")
	}
	switch {
	case c.Name != r.PathValue("name") || !nameRe.MatchString(c.Name):
		fail(w, http.StatusBadRequest, "channel name: want a-z, 0-9, _ and -, the same in the path and the body")
		return
	case c.DelaySeconds < 0 || c.DelaySeconds > 366*86400:
		fail(w, http.StatusBadRequest, "delay_seconds: want 0 to a year")
		return
	}
	if err := s.Store.PutChannel(r.Context(), store.Channel{Name: c.Name, Delay: time.Duration(c.DelaySeconds) * time.Second, Cutoff: c.Cutoff}); err != nil {
		s.internal(w, "put channel", err)
		return
	}
	s.log().Info("channel set", "channel", c.Name, "delay", c.DelaySeconds, "cutoff", c.Cutoff)
	reply(w, http.StatusOK, c)
}

func (s *Server) groups(w http.ResponseWriter, r *http.Request) {
	gs, err := s.Store.Groups(r.Context())
	if err != nil {
		s.internal(w, "groups", err)
		return
	}
	out := []api.Group{}
	for _, g := range gs {
		out = append(out, api.Group{Name: g.Name, Channel: g.Channel, Pin: g.Pin})
	}
	reply(w, http.StatusOK, out)
}

func (s *Server) putGroup(w http.ResponseWriter, r *http.Request) {
	var g api.Group
	if !decode(w, r, &g) {
		return
	}
	if g.Name == "" {
		g.Name = r.PathValue("name")
	}
	if g.Name != r.PathValue("name") || !nameRe.MatchString(g.Name) {
		fail(w, http.StatusBadRequest, "group name: want a-z, 0-9, _ and -, the same in the path and the body")
		return
	}
	err := s.Store.PutGroup(r.Context(), store.Group{Name: g.Name, Channel: g.Channel, Pin: g.Pin})
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusBadRequest, fmt.Sprintf("channel %q does not exist: create it with PUT /v1/admin/channels/NAME", g.Channel))
		return
	case err != nil:
		s.internal(w, "put group", err)
		return
	}
	s.log().Info("group set", "group", g.Name, "channel", g.Channel, "pin", g.Pin)
	reply(w, http.StatusOK, g)
}

func (s *Server) setGroup(w http.ResponseWriter, r *http.Request) {
	var req api.MachineGroupRequest
	if !decode(w, r, &req) {
		return
	}
	id := r.PathValue("id")
	err := s.Store.SetMachineGroup(r.Context(), id, req.Group)
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, err.Error())
		return
	case err != nil:
		s.internal(w, "set group", err)
		return
	}
	s.log().Info("machine moved", "machine", id, "group", req.Group, "operator", actorOf(r.Context()).Name)
	reply(w, http.StatusOK, req)
}

func keyInfo(k store.KeyInfo) api.KeyInfo {
	return api.KeyInfo{ID: k.ID, Group: k.Group, MaxMachines: k.MaxMachines, Machines: k.Machines, CreatedAt: k.CreatedAt, ExpiresAt: k.ExpiresAt, RevokedAt: k.RevokedAt}
}

func (s *Server) listKeys(w http.ResponseWriter, r *http.Request) {
	ks, err := s.Store.Keys(r.Context())
	if err != nil {
		s.internal(w, "list keys", err)
		return
	}
	out := []api.KeyInfo{}
	for _, k := range ks {
		out = append(out, keyInfo(k))
	}
	reply(w, http.StatusOK, out)
}

// revokeKey stops a key from enrolling; its machines stay enrolled unless
// the request deletes them too (a leaked key whose machines cannot be
// told from an intruder's).
func (s *Server) revokeKey(w http.ResponseWriter, r *http.Request) {
	var req api.RevokeRequest
	if r.ContentLength != 0 && !decode(w, r, &req) { // the body is optional
		return
	}
	id := r.PathValue("id")
	n, err := s.Store.RevokeKey(r.Context(), id, s.now(), req.DeleteMachines)
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, fmt.Sprintf("key %q does not exist: see `stitch fleet keys`", id))
		return
	case err != nil:
		s.internal(w, "revoke key", err)
		return
	}
	ks, err := s.Store.Keys(r.Context())
	if err != nil {
		s.internal(w, "revoke key", err)
		return
	}
	out := api.RevokeResponse{DeletedMachines: n}
	for _, k := range ks {
		if k.ID == id {
			out.Key = keyInfo(k)
		}
	}
	s.log().Warn("enrollment key revoked", "key", id, "group", out.Key.Group, "machines_deleted", n, "operator", actorOf(r.Context()).Name, "remote", remoteHost(r))
	reply(w, http.StatusOK, out)
}

// deleteMachine forgets a machine: its token fails from the next request
// on and its reports leave every rollout's counts.
func (s *Server) deleteMachine(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	err := s.Store.DeleteMachine(r.Context(), id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, fmt.Sprintf("machine %q does not exist: see `stitch fleet machines`", id))
		return
	case err != nil:
		s.internal(w, "delete machine", err)
		return
	}
	s.log().Warn("machine deleted", "machine", id, "operator", actorOf(r.Context()).Name, "remote", remoteHost(r))
	w.WriteHeader(http.StatusNoContent)
}
