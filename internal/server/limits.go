package server

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/stitchpatch/stitch/internal/server/store"
)

// Limits bound what clients may hold of the server. Zero fields take
// DefaultLimits' values.
type Limits struct {
	// ReadTimeout bounds reading a request, headers and body (the API's
	// bodies are at most 256 KiB), so a client trickling one is cut off.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing an API answer (small).
	WriteTimeout time.Duration
	// DownloadTimeout replaces WriteTimeout for a repository file: a
	// bundle of a few MB must reach an agent on a slow link.
	DownloadTimeout time.Duration
	// IdleTimeout closes a keep-alive connection with no request.
	IdleTimeout time.Duration
	// MaxConns bounds the open connections; more wait to be accepted.
	MaxConns int
	// ReportRate and ReportBurst are each machine's token bucket for
	// check-ins and health reports: Burst at once, then Rate a second.
	// An agent sends a few a pass, hourly; a flood is answered 429.
	ReportRate  float64
	ReportBurst int
}

// DefaultLimits: 10 minutes lets a 5 MB bundle through at 8 KB/s.
var DefaultLimits = Limits{
	ReadTimeout:     30 * time.Second,
	WriteTimeout:    30 * time.Second,
	DownloadTimeout: 10 * time.Minute,
	IdleTimeout:     90 * time.Second,
	MaxConns:        1024,
	ReportRate:      1,
	ReportBurst:     60,
}

// ErrBadLimits is a limit out of range.
var ErrBadLimits = errors.New("bad server limits")

// Validate refuses negative limits and a rate without a burst.
func (l Limits) Validate() error {
	for name, d := range map[string]time.Duration{"read timeout": l.ReadTimeout, "write timeout": l.WriteTimeout, "download timeout": l.DownloadTimeout, "idle timeout": l.IdleTimeout} {
		if d < 0 {
			return fmt.Errorf("%w: %s %s is negative", ErrBadLimits, name, d)
		}
	}
	switch {
	case l.MaxConns < 0:
		return fmt.Errorf("%w: max connections %d is negative", ErrBadLimits, l.MaxConns)
	case l.ReportRate < 0 || math.IsNaN(l.ReportRate) || math.IsInf(l.ReportRate, 0):
		return fmt.Errorf("%w: report rate %g: want a positive number of reports a second", ErrBadLimits, l.ReportRate)
	case l.ReportBurst < 0:
		return fmt.Errorf("%w: report burst %d is negative", ErrBadLimits, l.ReportBurst)
	}
	return nil
}

// withDefaults fills zero fields from DefaultLimits.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	pick := func(v, def time.Duration) time.Duration {
		if v > 0 {
			return v
		}
		return def
	}
	l.ReadTimeout, l.WriteTimeout = pick(l.ReadTimeout, d.ReadTimeout), pick(l.WriteTimeout, d.WriteTimeout)
	l.DownloadTimeout, l.IdleTimeout = pick(l.DownloadTimeout, d.DownloadTimeout), pick(l.IdleTimeout, d.IdleTimeout)
	if l.MaxConns <= 0 {
		l.MaxConns = d.MaxConns
	}
	if l.ReportRate <= 0 {
		l.ReportRate = d.ReportRate
	}
	if l.ReportBurst <= 0 {
		l.ReportBurst = d.ReportBurst
	}
	return l
}

// limitListener accepts at most n connections at a time: Accept waits
// for one to close, leaving the others in the kernel's backlog.
type limitListener struct {
	net.Listener
	slots chan struct{}
	done  chan struct{}
	once  sync.Once
}

func newLimitListener(l net.Listener, n int) *limitListener {
	return &limitListener{Listener: l, slots: make(chan struct{}, n), done: make(chan struct{})}
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitConn{Conn: c, release: func() { <-l.slots }}, nil
}

func (l *limitListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// maxBuckets bounds the limiter's memory (a bucket is about 100 bytes);
// a fleet larger than that only loses the state of idle machines.
const maxBuckets = 100_000

// reportLimiter keeps a token bucket per machine, in memory: each replica
// has its own, so N replicas allow up to N times the rate.
type reportLimiter struct {
	rate, burst float64
	max         int

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens   float64
	at       time.Time // tokens were counted then
	loggedAt time.Time // the last "throttled" log line
	refused  int       // refusals since then
}

func newReportLimiter(rate float64, burst, size int) *reportLimiter {
	return &reportLimiter{rate: rate, burst: float64(burst), max: size, buckets: map[string]*bucket{}}
}

// verdict is take's answer.
type verdict struct {
	ok    bool
	retry time.Duration // when refused: until a token is back
	// log says to log this refusal, one a minute per machine at most;
	// refused is how many refusals that line covers.
	log     bool
	refused int
}

// take spends one of machine id's tokens at now, if it has one.
func (l *reportLimiter) take(id string, now time.Time) verdict {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[id]
	if b == nil {
		if len(l.buckets) >= l.max {
			l.evict(now)
		}
		b = &bucket{tokens: l.burst, at: now}
		l.buckets[id] = b
	}
	if now.After(b.at) {
		b.tokens = min(l.burst, b.tokens+now.Sub(b.at).Seconds()*l.rate)
		b.at = now
	}
	if b.tokens >= 1 {
		b.tokens--
		return verdict{ok: true}
	}
	b.refused++
	v := verdict{retry: time.Duration(math.Ceil((1-b.tokens)/l.rate*1e9)) * time.Nanosecond}
	if now.Sub(b.loggedAt) >= time.Minute {
		v.log, v.refused = true, b.refused
		b.loggedAt, b.refused = now, 0
	}
	return v
}

// evict drops the buckets that have refilled (forgetting them changes
// nothing), and, when too few have, arbitrary ones down to 7/8 of the
// bound: one of those machines gets a full bucket a little early.
func (l *reportLimiter) evict(now time.Time) {
	for id, b := range l.buckets {
		if b.tokens+now.Sub(b.at).Seconds()*l.rate >= l.burst && now.Sub(b.loggedAt) >= time.Minute {
			delete(l.buckets, id)
		}
	}
	for id := range l.buckets {
		if len(l.buckets) < l.max-l.max/8 {
			break
		}
		delete(l.buckets, id)
	}
}

// throttled answers 429 with Retry-After to a machine past its report
// budget, logging that at most once a minute per machine (the metrics
// count every 429 by route).
func (s *Server) throttled(h func(http.ResponseWriter, *http.Request, store.Machine)) func(http.ResponseWriter, *http.Request, store.Machine) {
	return func(w http.ResponseWriter, r *http.Request, m store.Machine) {
		v := s.limiter.take(m.ID, s.now())
		if v.ok {
			h(w, r, m)
			return
		}
		secs := max(int(math.Ceil(v.retry.Seconds())), 1)
		if v.log {
			s.log().Warn("machine throttled", "machine", m.ID, "refused", v.refused, "path", r.URL.Path)
		}
		w.Header().Set("Retry-After", fmt.Sprint(secs))
		fail(w, http.StatusTooManyRequests, fmt.Sprintf("too many reports from machine %s (at most %d at once, then %g a second): retry after %d s", m.ID, int(s.limiter.burst), s.limiter.rate, secs))
	}
}

// clip bounds a string a machine sent before it goes into the log.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + fmt.Sprintf("... (%d bytes)", len(s))
}
