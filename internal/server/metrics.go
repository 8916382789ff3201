package server

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// metrics are the server's counters, written in Prometheus's text
// exposition format by hand: a handful of series does not justify the
// client library.
type metrics struct {
	checkins atomic.Int64
	healthy  atomic.Int64
	failed   atomic.Int64
	mu       sync.Mutex
	events   map[string]int64      // rollout events: advanced, completed, blocklisted, ...
	requests map[string]*histogram // by route pattern
	codes    map[[2]string]int64   // by route and status code
	expires  map[string]time.Time  // repository metadata expiry by TUF role
	refused  map[string]int64      // refused enrollments by reason
}

// buckets of the request latency histogram, in seconds.
var buckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}

type histogram struct {
	counts []int64 // per bucket, not cumulative
	sum    float64
	n      int64
}

func newMetrics() *metrics {
	return &metrics{events: map[string]int64{}, requests: map[string]*histogram{}, codes: map[[2]string]int64{}, refused: map[string]int64{}}
}

// refusedEnrollment counts an enrollment refused for reason.
func (m *metrics) refusedEnrollment(reason string) {
	m.mu.Lock()
	m.refused[reason]++
	m.mu.Unlock()
}

// repoExpiry records when each role's repository metadata expires (what
// bundle.Repo.KeepFresh reports after each run).
func (m *metrics) repoExpiry(exp map[string]time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expires = exp
}

func (m *metrics) event(name string) {
	m.mu.Lock()
	m.events[name]++
	m.mu.Unlock()
}

func (m *metrics) observe(route string, code int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	h := m.requests[route]
	if h == nil {
		h = &histogram{counts: make([]int64, len(buckets)+1)}
		m.requests[route] = h
	}
	s := d.Seconds()
	i := sort.SearchFloat64s(buckets, s)
	h.counts[i]++
	h.sum += s
	h.n++
	m.codes[[2]string{route, fmt.Sprint(code)}]++
}

// statusWriter remembers the status code for the metrics.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection (a download
// sets its own write deadline).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// instrument times every request by its route pattern (not its path, so
// machine ids and targets do not become label values).
func (m *metrics) instrument(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(sw, r)
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		m.observe(route, sw.code, time.Since(start))
	})
}

// write prints every series; rollouts counts patches by rollout state,
// fleet the machines.
// exposure counts the CVEs a registered patch fixes that some machine is
// still exposed to, and those machines.
type exposure struct{ CVEs, Machines int }

func (m *metrics) write(w io.Writer, rollouts map[string]int, fleet store.MachineCounts, exp exposure) {
	fmt.Fprintf(w, "# HELP stitch_checkins_total Machine check-ins accepted.\n# TYPE stitch_checkins_total counter\nstitch_checkins_total %d\n", m.checkins.Load())
	fmt.Fprintf(w, "# HELP stitch_health_reports_total Health reports accepted, by result.\n# TYPE stitch_health_reports_total counter\n")
	fmt.Fprintf(w, "stitch_health_reports_total{result=\"healthy\"} %d\nstitch_health_reports_total{result=\"unhealthy\"} %d\n", m.healthy.Load(), m.failed.Load())
	fmt.Fprintf(w, "# HELP stitch_rollouts Registered patches by rollout state.\n# TYPE stitch_rollouts gauge\n")
	for _, st := range sortedKeys(rollouts) {
		fmt.Fprintf(w, "stitch_rollouts{state=%q} %d\n", st, rollouts[st])
	}
	fmt.Fprintf(w, "# HELP stitch_machines Machines enrolled.\n# TYPE stitch_machines gauge\nstitch_machines %d\n", fleet.Enrolled)
	fmt.Fprintf(w, "# HELP stitch_machines_stale Machines whose last check-in is more than %d check-in intervals old.\n# TYPE stitch_machines_stale gauge\nstitch_machines_stale %d\n", rollout.SilentIntervals, fleet.Stale)
	fmt.Fprintf(w, "# HELP stitch_machines_never_checked_in Machines enrolled that never checked in.\n# TYPE stitch_machines_never_checked_in gauge\nstitch_machines_never_checked_in %d\n", fleet.Never)
	fmt.Fprintf(w, "# HELP stitch_machines_unsupported Machines whose kernel cannot live-patch, as they last reported.\n# TYPE stitch_machines_unsupported gauge\nstitch_machines_unsupported %d\n", fleet.Unsupported)
	fmt.Fprintf(w, "# HELP stitch_cves_exposed CVEs a registered patch fixes that at least one machine is still exposed to (at most 15 s old).\n# TYPE stitch_cves_exposed gauge\nstitch_cves_exposed %d\n", exp.CVEs)
	fmt.Fprintf(w, "# HELP stitch_machines_exposed Machines exposed to at least one CVE a registered patch fixes (at most 15 s old).\n# TYPE stitch_machines_exposed gauge\nstitch_machines_exposed %d\n", exp.Machines)
	m.mu.Lock()
	defer m.mu.Unlock()
	fmt.Fprintf(w, "# HELP stitch_enrollments_refused_total Enrollments refused, by reason.\n# TYPE stitch_enrollments_refused_total counter\n")
	for _, r := range sortedKeys(m.refused) {
		fmt.Fprintf(w, "stitch_enrollments_refused_total{reason=%q} %d\n", r, m.refused[r])
	}
	fmt.Fprintf(w, "# HELP stitch_rollout_events_total Rollout transitions (started, advanced, completed, halted, blocklisted, resumed).\n# TYPE stitch_rollout_events_total counter\n")
	for _, e := range sortedKeys(m.events) {
		fmt.Fprintf(w, "stitch_rollout_events_total{event=%q} %d\n", e, m.events[e])
	}
	if len(m.expires) > 0 {
		// Absolute Unix time, so an alert is `stitch_repo_expires_seconds - time() < ...`.
		fmt.Fprintf(w, "# HELP stitch_repo_expires_seconds When each role's repository metadata expires (Unix time); the server re-signs all but root before.\n# TYPE stitch_repo_expires_seconds gauge\n")
		for _, role := range sortedKeys(m.expires) {
			fmt.Fprintf(w, "stitch_repo_expires_seconds{role=%q} %d\n", role, m.expires[role].Unix())
		}
	}
	fmt.Fprintf(w, "# HELP stitch_http_requests_total HTTP requests by route and status code.\n# TYPE stitch_http_requests_total counter\n")
	keys := make([][2]string, 0, len(m.codes))
	for k := range m.codes {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [2]string) int { return strings.Compare(a[0]+" "+a[1], b[0]+" "+b[1]) })
	for _, k := range keys {
		fmt.Fprintf(w, "stitch_http_requests_total{route=%q,code=%q} %d\n", k[0], k[1], m.codes[k])
	}
	fmt.Fprintf(w, "# HELP stitch_http_request_duration_seconds HTTP request latency by route.\n# TYPE stitch_http_request_duration_seconds histogram\n")
	for _, route := range sortedKeys(m.requests) {
		h := m.requests[route]
		var cum int64
		for i, b := range buckets {
			cum += h.counts[i]
			fmt.Fprintf(w, "stitch_http_request_duration_seconds_bucket{route=%q,le=\"%g\"} %d\n", route, b, cum)
		}
		fmt.Fprintf(w, "stitch_http_request_duration_seconds_bucket{route=%q,le=\"+Inf\"} %d\n", route, h.n)
		fmt.Fprintf(w, "stitch_http_request_duration_seconds_sum{route=%q} %g\nstitch_http_request_duration_seconds_count{route=%q} %d\n", route, h.sum, route, h.n)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
