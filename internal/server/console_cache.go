package server

import (
	"net/http"
	"sync"
	"time"

	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// consoleFresh is how long the console reuses fleet-wide figures: with
// 100,000 machines they take seconds to compute, and an operator paging
// through the console need not recompute them for every view. A console
// action clears them, so its own result shows at once; the pages say how
// old the figures are.
const consoleFresh = 15 * time.Second

// fleetFigures are the fleet-wide figures of the console's pages.
type fleetFigures struct {
	At      time.Time
	Kernels []store.KernelCount
	Patches []api.PatchReport
	CVEs    []api.CVEReport
}

// figuresCache holds the last fleetFigures; one computation at a time.
type figuresCache struct {
	mu   sync.Mutex
	last *fleetFigures
}

// figures returns fleet-wide figures at most consoleFresh old.
func (s *Server) figures(r *http.Request) (*fleetFigures, error) {
	c := &s.figuresCache
	c.mu.Lock()
	defer c.mu.Unlock()
	now := s.now()
	if c.last != nil && now.Sub(c.last.At) < consoleFresh && !now.Before(c.last.At) {
		return c.last, nil
	}
	f := &fleetFigures{At: now}
	var err error
	if f.Kernels, err = s.Store.KernelCounts(r.Context(), s.silentBefore(now)); err != nil {
		return nil, err
	}
	// The fleet is read once for both.
	ms, err := s.Store.FleetMachines(r.Context())
	if err != nil {
		return nil, err
	}
	if f.Patches, err = s.patchReports(r.Context(), ms); err != nil {
		return nil, err
	}
	if f.CVEs, err = s.cveReports(r, ms); err != nil {
		return nil, err
	}
	c.last = f
	return f, nil
}

// forgetFigures makes the next page compute the figures again (after an
// action changed them).
func (s *Server) forgetFigures() {
	s.figuresCache.mu.Lock()
	s.figuresCache.last = nil
	s.figuresCache.mu.Unlock()
}
