package server

import (
	"cmp"
	"context"
	"maps"
	"net/http"
	"slices"

	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// Reports read the whole fleet: they are for operators, a few times a
// minute at most, not for the machines' hot path.

// patchReport sums up p's rollout over machines, rms (the machines in
// it) and keys (its counts by enrollment key); nil leaves counts zero.
// For a level, newer are the newer levels of its stream and kernel: a
// machine one of them reaches is offered that one, so p is not pending
// there.
func (s *Server) patchReport(p store.Patch, machines []store.Machine, rms []store.RolloutMachine, keys []rollout.KeyCounts, newer []store.Patch) api.PatchReport {
	t := s.policy().Tally(keys)
	rep := api.PatchReport{Target: p.Target, Name: p.Name, KernelRelease: p.KernelRelease, KernelBuildID: p.KernelBuildID,
		CVEs: append([]string{}, p.CVEs...), RegisteredAt: p.RegisteredAt, State: p.State, Reason: p.Reason, Stage: p.Stage, Share: s.policy().Share(p.Stage),
		Applied: t.Healthy + t.Unfinished + t.Lost, Healthy: t.Healthy, Failed: t.Failed, Lost: t.Lost, Counted: t.Counted, Level: p.Level}
	took := map[string]bool{}
	for _, rm := range rms {
		took[rm.MachineID] = true
	}
	for _, m := range machines {
		if m.KernelRelease != p.KernelRelease || m.KernelBuildID != p.KernelBuildID || m.Unsupported != "" {
			continue
		}
		rep.Eligible++
		if took[m.ID] {
			continue
		}
		switch {
		case s.offered(p, m):
			if !slices.ContainsFunc(newer, func(q store.Patch) bool { return s.offered(q, m) }) {
				rep.Pending++
			}
		case !m.Cutoff.IsZero() && p.RegisteredAt.After(m.Cutoff), !m.Pin.IsZero() && p.RegisteredAt.After(m.Pin):
			rep.Held++
		case rollout.State(p.State).Offers() && s.stageAt(p, s.now().Add(-m.Delay)) < 0:
			rep.Waiting++
			if at := p.RegisteredAt.Add(m.Delay); rep.WaitingUntil.IsZero() || at.Before(rep.WaitingUntil) {
				rep.WaitingUntil = at
			}
		}
	}
	return rep
}

func (s *Server) reportPatches(w http.ResponseWriter, r *http.Request) {
	out, err := s.patchReports(r.Context(), nil)
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	reply(w, http.StatusOK, out)
}

// patchReports is every registered patch's rollout over ms, the fleet
// (read here if nil).
func (s *Server) patchReports(ctx context.Context, ms []store.Machine) ([]api.PatchReport, error) {
	ps, err := s.Store.Patches(ctx)
	if err != nil {
		return nil, err
	}
	if ms == nil {
		if ms, err = s.Store.FleetMachines(ctx); err != nil {
			return nil, err
		}
	}
	checks, silent := len(s.policy().Checks), s.silentBefore(s.now())
	out := []api.PatchReport{}
	for _, p := range ps {
		var newer []store.Patch
		if p.Level != nil {
			for _, q := range ps {
				if q.Level != nil && q.Level.Stream == p.Level.Stream && q.Level.Number > p.Level.Number && q.KernelRelease == p.KernelRelease && q.KernelBuildID == p.KernelBuildID {
					newer = append(newer, q)
				}
			}
		}
		rms, err := s.Store.RolloutMachines(ctx, p.Target)
		if err != nil {
			return nil, err
		}
		keys, err := s.Store.RolloutCounts(ctx, p.Target, checks, silent)
		if err != nil {
			return nil, err
		}
		out = append(out, s.patchReport(p, ms, rms, keys, newer))
	}
	return out, nil
}

// fleet is what the machine and CVE reports need.
type fleet struct {
	machines []store.Machine
	patches  []store.Patch
	applied  map[string]map[string]bool // machine → targets it reports applied
}

// readFleet reads what fleet-wide reports need, over ms, the fleet (read
// here, without what only the machines report shows, if nil).
func (s *Server) readFleet(ctx context.Context, ms []store.Machine) (*fleet, error) {
	f := &fleet{machines: ms}
	var err error
	if f.machines == nil {
		if f.machines, err = s.Store.FleetMachines(ctx); err != nil {
			return nil, err
		}
	}
	if f.patches, err = s.Store.Patches(ctx); err != nil {
		return nil, err
	}
	if f.applied, err = s.Store.AppliedTargets(ctx); err != nil {
		return nil, err
	}
	return f, nil
}

// forKernel are the registered patches for m's kernel.
func (f *fleet) forKernel(m store.Machine) []store.Patch {
	var out []store.Patch
	for _, p := range f.patches {
		if p.KernelRelease == m.KernelRelease && p.KernelBuildID == m.KernelBuildID {
			out = append(out, p)
		}
	}
	return out
}

func (s *Server) reportMachines(w http.ResponseWriter, r *http.Request) {
	ms, err := s.Store.Machines(r.Context())
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	f, cs, err := s.coverageInputs(r, ms)
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	// The CVEs each kernel's own source fixes.
	contained := map[kernelID][]string{}
	for _, c := range cs {
		k := kernelID{c.KernelRelease, c.KernelBuildID}
		contained[k] = append(contained[k], c.CVEs...)
	}
	byTarget := map[string]store.Patch{}
	for _, p := range f.patches {
		byTarget[p.Target] = p
	}
	offers, err := s.Store.LevelOffers(r.Context())
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	live := liveLevels(f, offers)
	exposed := map[string][]string{} // machine → CVEs, as the CVE report has them
	for _, c := range cveReports(f.patches, cs, f.machines, f.applied) {
		for _, id := range c.Exposed {
			exposed[id] = append(exposed[id], c.CVE)
		}
	}
	out := []api.MachineReport{}
	for _, m := range f.machines {
		rep := api.MachineReport{ID: m.ID, Hostname: m.Hostname, KeyID: m.KeyID, Group: m.Group, Channel: m.Channel, KernelRelease: m.KernelRelease,
			KernelBuildID: m.KernelBuildID, Unsupported: m.Unsupported, AgentVersion: m.AgentVersion, LastCheckIn: m.LastCheckIn, Applied: []string{}, FixedCVEs: []string{}, Missing: []string{}, Levels: []api.MachineLevel{},
			ExposedCVEs: append([]string{}, exposed[m.ID]...)}
		for stream, p := range live[m.ID] {
			rep.Levels = append(rep.Levels, api.MachineLevel{Stream: stream, Number: p.Level.Number, Target: p.Target, State: p.State})
		}
		slices.SortFunc(rep.Levels, func(a, b api.MachineLevel) int { return cmp.Compare(a.Stream, b.Stream) })
		for t := range f.applied[m.ID] {
			rep.Applied = append(rep.Applied, t)
			if p, ok := byTarget[t]; ok {
				rep.FixedCVEs = append(rep.FixedCVEs, p.CVEs...)
				if p.RegisteredAt.After(rep.PatchLevel) {
					rep.PatchLevel = p.RegisteredAt
				}
			}
		}
		if m.KernelRelease != "" {
			rep.FixedCVEs = append(rep.FixedCVEs, contained[kernelID{m.KernelRelease, m.KernelBuildID}]...)
		}
		kernel := f.forKernel(m)
		for _, p := range kernel {
			if p.Level == nil && !f.applied[m.ID][p.Target] && !rollout.State(p.State).Reverts() {
				rep.Missing = append(rep.Missing, p.Target)
			}
		}
		// Of a stream, only its newest good level is missing, on a
		// machine that runs an older one or none.
		byStream := streams(kernel)
		for _, stream := range slices.Sorted(maps.Keys(byStream)) {
			levels := byStream[stream]
			for i := len(levels) - 1; i >= 0; i-- {
				p := levels[i]
				if rollout.State(p.State).Reverts() {
					continue
				}
				if cur, ok := live[m.ID][stream]; !ok || cur.Level.Number < p.Level.Number {
					rep.Missing = append(rep.Missing, p.Target)
				}
				break
			}
		}
		rep.Level = len(rep.Applied)
		if len(rep.Levels) > 0 {
			rep.Level = rep.Levels[0].Number
		}
		slices.Sort(rep.Applied)
		slices.Sort(rep.FixedCVEs)
		rep.FixedCVEs = slices.Compact(rep.FixedCVEs)
		out = append(out, rep)
	}
	reply(w, http.StatusOK, out)
}

func (s *Server) reportCVEs(w http.ResponseWriter, r *http.Request) {
	f, cs, err := s.coverageInputs(r, nil)
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	reply(w, http.StatusOK, cveReports(f.patches, cs, f.machines, f.applied))
}

func (s *Server) writeMetrics(w http.ResponseWriter, r *http.Request) {
	ps, err := s.Store.Patches(r.Context())
	if err != nil {
		s.internal(w, "metrics", err)
		return
	}
	states := map[string]int{}
	for _, st := range []rollout.State{rollout.Running, rollout.Halted, rollout.Blocklisted, rollout.Complete} {
		states[string(st)] = 0
	}
	for _, p := range ps {
		states[p.State]++
	}
	fleet, err := s.Store.MachineCounts(r.Context(), s.silentBefore(s.now()))
	if err != nil {
		s.internal(w, "metrics", err)
		return
	}
	// Exposure comes from the CVE report, shared with the console and
	// at most consoleFresh old: it reads every machine.
	f, err := s.figures(r)
	if err != nil {
		s.internal(w, "metrics", err)
		return
	}
	var exp exposure
	machines := map[string]bool{}
	for _, c := range f.CVEs {
		if len(c.Exposed) > 0 {
			exp.CVEs++
		}
		for _, m := range c.Exposed {
			machines[m] = true
		}
	}
	exp.Machines = len(machines)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	s.metrics.write(w, states, fleet, exp)
}
