package server

import (
	"cmp"
	"context"
	"errors"
	"net/http"
	"slices"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// Coverage: which kernels have a patch for a fix, which already contain
// it in their source (a published contained record), and which kernels
// the fleet runs that have neither, with the machines on each.

// kernelID is a kernel as machines, patches and records name it.
type kernelID struct{ release, buildID string }

func (k kernelID) coverage() api.KernelCoverage {
	return api.KernelCoverage{Release: k.release, BuildID: k.buildID}
}

// fleetKernels groups the machines that checked in by the kernel they run.
func fleetKernels(ms []store.Machine) map[kernelID][]string {
	out := map[kernelID][]string{}
	for _, m := range ms {
		if m.KernelRelease == "" { // never checked in: its kernel is unknown
			continue
		}
		k := kernelID{m.KernelRelease, m.KernelBuildID}
		out[k] = append(out[k], m.ID)
	}
	return out
}

// byKernel orders kernels by release, then build-id.
func byKernel(a, b api.KernelCoverage) int {
	return cmp.Or(cmp.Compare(a.Release, b.Release), cmp.Compare(a.BuildID, b.BuildID))
}

// fixGroups sorts the registered patches and contained records into
// fixes: two that share a patch name or an upstream commit are one fix,
// so a fix ported to many kernels is one, even where its backports were
// named otherwise, and a kernel that contains it joins the same fix. It
// returns, per fix, the patches' and the records' indexes.
func fixGroups(ps []store.Patch, cs []store.Contained) [][2][]int {
	n := len(ps) + len(cs)
	parent := make([]int, n)
	for i := range parent {
		parent[i] = i
	}
	find := func(i int) int {
		for parent[i] != i {
			parent[i] = parent[parent[i]]
			i = parent[i]
		}
		return i
	}
	first := map[string]int{} // "name:N" or "upstream:U" → the first item with it
	join := func(i int, key string) {
		if j, ok := first[key]; ok {
			parent[find(i)] = find(j)
			return
		}
		first[key] = i
	}
	for i, p := range ps {
		join(i, "name:"+p.Name)
		for _, u := range p.Upstream {
			join(i, "upstream:"+u)
		}
	}
	for i, c := range cs {
		join(len(ps)+i, "name:"+c.Name)
		for _, u := range c.Upstream {
			join(len(ps)+i, "upstream:"+u)
		}
	}
	index := map[int]int{}
	var out [][2][]int
	for i := range n {
		r := find(i)
		g, ok := index[r]
		if !ok {
			g = len(out)
			index[r] = g
			out = append(out, [2][]int{})
		}
		if i < len(ps) {
			out[g][0] = append(out[g][0], i)
		} else {
			out[g][1] = append(out[g][1], i-len(ps))
		}
	}
	return out
}

// sortedSet sorts ss and drops repeats; never nil, so JSON shows [].
func sortedSet(ss []string) []string {
	out := append([]string{}, ss...)
	slices.Sort(out)
	return slices.Compact(out)
}

// fixReports computes every fix's coverage over the fleet.
func fixReports(ps []store.Patch, cs []store.Contained, machines []store.Machine, applied map[string]map[string]bool) []api.FixReport {
	fleet := fleetKernels(machines)
	out := []api.FixReport{}
	for _, g := range fixGroups(ps, cs) {
		rep := api.FixReport{Patched: []api.KernelCoverage{}, Contained: []api.KernelCoverage{}, NotCovered: []api.KernelCoverage{}}
		kernels := map[kernelID]*api.KernelCoverage{}
		at := func(k kernelID) *api.KernelCoverage {
			if kernels[k] == nil {
				kc := k.coverage()
				kernels[k] = &kc
			}
			return kernels[k]
		}
		for _, i := range g[0] {
			p := ps[i]
			rep.Names, rep.Upstream, rep.CVEs = append(rep.Names, p.Name), append(rep.Upstream, p.Upstream...), append(rep.CVEs, p.CVEs...)
			kc := at(kernelID{p.KernelRelease, p.KernelBuildID})
			kc.Patches = append(kc.Patches, api.PatchRef{Target: p.Target, State: p.State})
		}
		for _, i := range g[1] {
			c := cs[i]
			rep.Names, rep.Upstream, rep.CVEs = append(rep.Names, c.Name), append(rep.Upstream, c.Upstream...), append(rep.CVEs, c.CVEs...)
			kc := at(kernelID{c.KernelRelease, c.KernelBuildID})
			kc.Records = append(kc.Records, c.Target)
		}
		rep.Names, rep.Upstream, rep.CVEs = sortedSet(rep.Names), sortedSet(rep.Upstream), sortedSet(rep.CVEs)
		for k := range fleet {
			at(k)
		}
		for k, kc := range kernels {
			kc.Machines = len(fleet[k])
			for _, id := range fleet[k] {
				if slices.ContainsFunc(kc.Patches, func(p api.PatchRef) bool { return applied[id][p.Target] }) {
					kc.Applied++
				}
			}
			switch {
			case len(kc.Records) > 0:
				rep.Contained = append(rep.Contained, *kc)
				rep.ContainedMachines += kc.Machines
			case len(kc.Patches) > 0:
				rep.Patched = append(rep.Patched, *kc)
				rep.PatchedMachines += kc.Machines
				rep.AppliedMachines += kc.Applied
			default:
				rep.NotCovered = append(rep.NotCovered, *kc)
				rep.NotCoveredMachines += kc.Machines
			}
		}
		for _, l := range [][]api.KernelCoverage{rep.Patched, rep.Contained, rep.NotCovered} {
			slices.SortFunc(l, byKernel)
		}
		out = append(out, rep)
	}
	slices.SortFunc(out, func(a, b api.FixReport) int { return slices.Compare(a.Names, b.Names) })
	return out
}

// cveReports is every CVE a registered patch or a contained record
// names, across the fleet (api.CVEReport says what fixed, exposed and
// not covered mean).
func cveReports(ps []store.Patch, cs []store.Contained, machines []store.Machine, applied map[string]map[string]bool) []api.CVEReport {
	byCVE := map[string]*api.CVEReport{}
	get := func(c string) *api.CVEReport {
		if byCVE[c] == nil {
			byCVE[c] = &api.CVEReport{CVE: c, Patches: []string{}, Records: []string{}, Exposed: []string{}, NotCoveredKernels: []api.KernelCoverage{}}
		}
		return byCVE[c]
	}
	// Per kernel and CVE: the patches for it that fix the CVE, and
	// whether its source contains the fix.
	patches := map[kernelID]map[string][]string{}
	contains := map[kernelID]map[string]bool{}
	for _, p := range ps {
		k := kernelID{p.KernelRelease, p.KernelBuildID}
		for _, c := range p.CVEs {
			get(c).Patches = append(get(c).Patches, p.Target)
			if patches[k] == nil {
				patches[k] = map[string][]string{}
			}
			patches[k][c] = append(patches[k][c], p.Target)
		}
	}
	for _, r := range cs {
		k := kernelID{r.KernelRelease, r.KernelBuildID}
		for _, c := range r.CVEs {
			get(c).Records = append(get(c).Records, r.Target)
			if contains[k] == nil {
				contains[k] = map[string]bool{}
			}
			contains[k][c] = true
		}
	}
	for k, ids := range fleetKernels(machines) {
		for c, rep := range byCVE {
			switch targets := patches[k][c]; {
			case contains[k][c]:
				rep.Fixed += len(ids)
				rep.ContainedMachines += len(ids)
			case len(targets) > 0:
				for _, id := range ids {
					if slices.ContainsFunc(targets, func(t string) bool { return applied[id][t] }) {
						rep.Fixed++
					} else {
						rep.Exposed = append(rep.Exposed, id)
					}
				}
			default:
				kc := k.coverage()
				kc.Machines = len(ids)
				rep.NotCoveredKernels = append(rep.NotCoveredKernels, kc)
				rep.NotCoveredMachines += len(ids)
			}
		}
	}
	out := []api.CVEReport{}
	for _, rep := range byCVE {
		slices.Sort(rep.Exposed)
		slices.SortFunc(rep.NotCoveredKernels, byKernel)
		out = append(out, *rep)
	}
	slices.SortFunc(out, func(a, b api.CVEReport) int { return cmp.Compare(a.CVE, b.CVE) })
	return out
}

// learnContained reads the contained records published in the repository
// that the store does not know yet, as registration reads a patch's
// bundle: verified against the signed targets metadata. A record the
// repository holds but that does not verify is logged once and left out.
func (s *Server) learnContained(ctx context.Context) error {
	names, err := s.Repo.ContainedTargets()
	if err != nil {
		return err
	}
	known, err := s.Store.Contained(ctx)
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, c := range known {
		have[c.Target] = true
	}
	for _, name := range names {
		if have[name] || s.refusedOnce(name) {
			continue
		}
		c, err := s.Repo.OpenContained(name)
		if err != nil {
			// A record that does not verify or parse stays refused; one
			// that could not be read (an I/O error) is tried again.
			if errors.Is(err, bundle.ErrVerify) || errors.Is(err, bundle.ErrBadBundle) || errors.Is(err, contract.ErrBadContained) {
				s.refuse(name)
				s.log().Error("contained record refused: it does not count", "target", name, "err", err)
			} else {
				s.log().Warn("contained record unreadable, tried again at the next report", "target", name, "err", err)
			}
			continue
		}
		added, err := s.Store.AddContained(ctx, store.Contained{Target: name, Name: c.Name, KernelRelease: c.Kernel.Release, KernelBuildID: c.Kernel.BuildID,
			CVEs: c.AllCVEs(), Upstream: c.Upstreams(), Checked: parseTime(c.Checked), LearnedAt: s.now()})
		if err != nil {
			return err
		}
		if added {
			s.log().Info("contained record learned", "target", name, "kernel", c.Kernel.Release, "build_id", c.Kernel.BuildID, "cves", c.AllCVEs())
		}
	}
	return nil
}

// refusedOnce says whether the record named was refused before.
func (s *Server) refusedOnce(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused[name]
}

func (s *Server) refuse(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refused == nil {
		s.refused = map[string]bool{}
	}
	s.refused[name] = true
}

// parseTime reads an RFC 3339 time that was validated already.
func parseTime(v string) time.Time {
	t, _ := time.Parse(time.RFC3339, v)
	return t.UTC()
}

// coverageInputs reads what the coverage reports need over ms (as
// readFleet), the contained records learned first.
func (s *Server) coverageInputs(r *http.Request, ms []store.Machine) (*fleet, []store.Contained, error) {
	if err := s.learnContained(r.Context()); err != nil {
		// The records learned before still count: report with them.
		s.log().Warn("contained records not read from the repository", "err", err)
	}
	f, err := s.readFleet(r.Context(), ms)
	if err != nil {
		return nil, nil, err
	}
	cs, err := s.Store.Contained(r.Context())
	if err != nil {
		return nil, nil, err
	}
	return f, cs, nil
}

func (s *Server) reportFixes(w http.ResponseWriter, r *http.Request) {
	f, cs, err := s.coverageInputs(r, nil)
	if err != nil {
		s.internal(w, "report", err)
		return
	}
	reply(w, http.StatusOK, fixReports(f.patches, cs, f.machines, f.applied))
}
