package server

import (
	"cmp"
	"context"
	"net/http"
	"slices"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// Patch levels: a level of a patch stream is a cumulative patch (it
// replaces whatever level of its stream a machine runs, in one
// transition), registered and rolled out like any patch, one rollout per
// (kernel, level). A machine runs at most one level per stream, so the
// server offers it at most the newest level that reaches it, plus, when
// the level it runs is blocklisted, the level to fall back to.

// streams sorts the level patches of ps by stream, each by number.
func streams(ps []store.Patch) map[string][]store.Patch {
	out := map[string][]store.Patch{}
	for _, p := range ps {
		if p.Level != nil {
			out[p.Level.Stream] = append(out[p.Level.Stream], p)
		}
	}
	for _, ls := range out {
		slices.SortFunc(ls, func(a, b store.Patch) int { return cmp.Compare(a.Level.Number, b.Level.Number) })
	}
	return out
}

func levelAction(p store.Patch, op string) api.Action {
	l := *p.Level
	return api.Action{Target: p.Target, Name: p.Name, CVEs: p.CVEs, Op: op, Level: &l}
}

// levelOrders are the orders of a check-in for the levels of one stream
// for the machine's kernel (levels, by number), from what the machine
// reported of them (target → state), and the targets it offers:
//
//   - revert every level the machine reports applied that is
//     blocklisted;
//   - apply the newest level that reaches the machine (rollout running
//     or complete, its channel and stage: offered), when it is newer than
//     the level the machine runs (or falls back to) and the machine
//     never reported it (in any state: its agent decided, as for every
//     patch);
//   - when the level the machine runs is blocklisted (or it reverted a
//     blocklisted level and runs none), apply the previous good level:
//     the newest one below it that is not blocklisted, whose rollout runs
//     or completed, that reaches the machine or was offered it before
//     (it most likely ran it), and that the machine did not report failed
//     or refused. It is offered even when the machine reports it
//     reverted: that is how a level the next one replaced is reported.
//
// offeredBefore reads the machine's past offers; it is called only for a
// fallback.
func (s *Server) levelOrders(levels []store.Patch, reported map[string]string, m store.Machine, offeredBefore func() (map[string]bool, error)) ([]api.Action, []string, error) {
	var acts []api.Action
	var live, top *store.Patch // the newest level reported applied, and in any state
	for i := range levels {
		p := &levels[i]
		state, known := reported[p.Target]
		if !known {
			continue
		}
		top = p
		if state == contract.StateApplied {
			live = p
			if rollout.State(p.State).Reverts() {
				acts = append(acts, levelAction(*p, api.OpRevert))
			}
		}
	}
	fallback, err := s.fallback(levels, reported, live, top, m, offeredBefore)
	if err != nil {
		return nil, nil, err
	}
	var offers []string
	floor := 0 // what the machine runs, or will once it fell back
	switch {
	case fallback != nil:
		floor = fallback.Level.Number
	case live != nil:
		floor = live.Level.Number
	}
	// The newest level that reaches the machine; older ones are not
	// offered, nor a newer one the machine already decided on.
	for i := len(levels) - 1; i >= 0; i-- {
		p := levels[i]
		if !s.offered(p, m) {
			continue
		}
		if _, known := reported[p.Target]; !known && p.Level.Number > floor {
			acts = append(acts, levelAction(p, api.OpApply))
			offers = append(offers, p.Target)
		}
		break
	}
	if fallback != nil {
		acts = append(acts, levelAction(*fallback, api.OpApply))
		offers = append(offers, fallback.Target)
	}
	return acts, offers, nil
}

// fallback is the level a machine goes back to from a blocklisted level
// (see levelOrders), nil when it runs none (or runs a good one, or there
// is none to go back to).
func (s *Server) fallback(levels []store.Patch, reported map[string]string, live, top *store.Patch, m store.Machine, offeredBefore func() (map[string]bool, error)) (*store.Patch, error) {
	var from *store.Patch // the blocklisted level the machine is sent back from
	switch {
	case live != nil && rollout.State(live.State).Reverts():
		from = live
	case live == nil && top != nil && rollout.State(top.State).Reverts() && reported[top.Target] == contract.StateReverted:
		from = top
	default:
		return nil, nil
	}
	before, err := offeredBefore()
	if err != nil {
		return nil, err
	}
	for i := len(levels) - 1; i >= 0; i-- {
		p := &levels[i]
		state := reported[p.Target]
		switch {
		case p.Level.Number >= from.Level.Number, !rollout.State(p.State).Offers():
			continue
		case state == contract.StateFailed || state == contract.StateRefused:
			continue
		case !before[p.Target] && !s.offered(*p, m):
			continue
		case state == contract.StateApplied:
			// It runs this one too (it should run one level only):
			// nothing to go back to.
			return nil, nil
		}
		return p, nil
	}
	return nil, nil
}

// machineOffers reads the targets a machine was offered, as a set.
func (s *Server) machineOffers(ctx context.Context, id string) func() (map[string]bool, error) {
	var set map[string]bool
	return func() (map[string]bool, error) {
		if set != nil {
			return set, nil
		}
		ts, err := s.Store.MachineOffers(ctx, id)
		if err != nil {
			return nil, err
		}
		set = map[string]bool{}
		for _, t := range ts {
			set[t] = true
		}
		return set, nil
	}
}

// liveLevels are the level each machine runs, per stream: the newest
// level for its kernel it reports applied that the server offered it.
// A level the machine was never offered does not count, whatever it
// reports.
func liveLevels(f *fleet, offers []store.Offer) map[string]map[string]store.Patch {
	offered := map[store.Offer]bool{}
	for _, o := range offers {
		offered[o] = true
	}
	byTarget := map[string]store.Patch{}
	for _, p := range f.patches {
		if p.Level != nil {
			byTarget[p.Target] = p
		}
	}
	out := map[string]map[string]store.Patch{}
	for _, m := range f.machines {
		for t := range f.applied[m.ID] {
			p, ok := byTarget[t]
			if !ok || p.KernelRelease != m.KernelRelease || p.KernelBuildID != m.KernelBuildID || !offered[store.Offer{Target: t, MachineID: m.ID}] {
				continue
			}
			if out[m.ID] == nil {
				out[m.ID] = map[string]store.Patch{}
			}
			if cur, ok := out[m.ID][p.Level.Stream]; !ok || p.Level.Number > cur.Level.Number {
				out[m.ID][p.Level.Stream] = p
			}
		}
	}
	return out
}

// levelReports is every kernel with a registered level: per stream, the
// machines on each level and those on none, and what each level carries.
func (s *Server) levelReports(f *fleet, live map[string]map[string]store.Patch) []api.KernelLevels {
	fleetByKernel := fleetKernels(f.machines)
	byKernel := map[kernelID][]store.Patch{}
	for _, p := range f.patches {
		if p.Level != nil {
			k := kernelID{p.KernelRelease, p.KernelBuildID}
			byKernel[k] = append(byKernel[k], p)
		}
	}
	out := []api.KernelLevels{}
	for k, ps := range byKernel {
		kl := api.KernelLevels{Release: k.release, BuildID: k.buildID, Machines: len(fleetByKernel[k]), Streams: []api.StreamLevels{}}
		for name, levels := range streams(ps) {
			sl := api.StreamLevels{Stream: name, Levels: []api.LevelReport{}}
			on := map[string]int{} // target → machines running it
			for _, id := range fleetByKernel[k] {
				if p, ok := live[id][name]; ok {
					on[p.Target]++
				} else {
					sl.NoLevel++
				}
			}
			for _, p := range levels {
				lr := api.LevelReport{Number: p.Level.Number, Supersedes: p.Level.Supersedes, Target: p.Target, Name: p.Name, RegisteredAt: p.RegisteredAt,
					State: p.State, Reason: p.Reason, Stage: p.Stage, Share: s.policy().Share(p.Stage), Machines: on[p.Target],
					Fixes: []api.LevelFix{}, CVEs: sortedSet(p.CVEs), Withdrawn: append([]string{}, p.Level.Withdrawn...)}
				for _, fx := range p.Fixes {
					lr.Fixes = append(lr.Fixes, api.LevelFix{Name: fx.Name, CVEs: append([]string{}, fx.CVEs...), Upstream: fx.Upstream})
				}
				sl.Levels = append(sl.Levels, lr)
			}
			kl.Streams = append(kl.Streams, sl)
		}
		slices.SortFunc(kl.Streams, func(a, b api.StreamLevels) int { return cmp.Compare(a.Stream, b.Stream) })
		out = append(out, kl)
	}
	slices.SortFunc(out, func(a, b api.KernelLevels) int {
		return cmp.Or(cmp.Compare(a.Release, b.Release), cmp.Compare(a.BuildID, b.BuildID))
	})
	return out
}

func (s *Server) reportLevels(w http.ResponseWriter, r *http.Request) {
	f, err := s.readFleet(r.Context(), nil)
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	offers, err := s.Store.LevelOffers(r.Context())
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	reply(w, http.StatusOK, s.levelReports(f, liveLevels(f, offers)))
}
