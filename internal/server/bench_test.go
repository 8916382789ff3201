package server

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// benchMachines is the fleet the load benchmark registers.
const benchMachines = 100_000

// targetRate is a million machines checking in hourly, in check-ins a
// second.
const targetRate = 1_000_000 / 3600

// BenchmarkCheckIn measures check-ins over loopback HTTP with 100,000
// registered machines, each check-in from a scattered machine that holds
// one patch, on SQLite and (with STITCH_TEST_POSTGRES) PostgreSQL: the
// most a server takes (32 clients back to back) and the latency at the
// target rate (targetRate a second):
//
//	go test -run '^$' -bench CheckIn -benchtime 10000x ./internal/server
//
// Registering the machines takes a while; it happens once per store. The
// paced run takes b.N/targetRate seconds.
func BenchmarkCheckIn(b *testing.B) {
	stores := map[string]func(b *testing.B) store.Store{
		"sqlite": func(b *testing.B) store.Store {
			st, err := store.OpenSQLite(context.Background(), filepath.Join(b.TempDir(), "fleet.db"))
			if err != nil {
				b.Fatal(err)
			}
			return st
		},
		"postgres": func(b *testing.B) store.Store { return postgresStore(b, "server_bench") },
	}
	for _, name := range []string{"sqlite", "postgres"} {
		b.Run(name, func(b *testing.B) {
			st := stores[name](b) // closed by newEnvOn's cleanup
			url, tokens, target := benchFleet(b, st)
			hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
			b.Run(fmt.Sprintf("machines=%d/saturated", benchMachines), func(b *testing.B) {
				benchSaturated(b, &checker{url: url, target: target, tokens: tokens, hc: hc})
			})
			b.Run(fmt.Sprintf("machines=%d/rate=%d", benchMachines, targetRate), func(b *testing.B) {
				benchPaced(b, &checker{url: url, target: target, tokens: tokens, hc: hc}, targetRate)
			})
		})
	}
}

// benchFleet registers the machines and one patch for their kernel and
// starts a server; it returns the server's URL and the machines' tokens.
func benchFleet(b *testing.B, st store.Store) (string, []string, string) {
	ctx := context.Background()
	start := time.Now()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	const perKey = 1000
	tokens := make([]string, benchMachines)
	var wg sync.WaitGroup
	var failed atomic.Value
	work := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range work {
				kh := fmt.Sprintf("bench-key-%d", k)
				if err := st.CreateKey(ctx, store.Key{ID: kh, SecretHash: kh, MaxMachines: perKey, CreatedAt: now}); err != nil {
					failed.Store(err)
					return
				}
				for i := k * perKey; i < (k+1)*perKey; i++ {
					tokens[i] = fmt.Sprintf("bench-token-%d", i)
					m := store.Machine{ID: fmt.Sprintf("m-%08d", i), TokenHash: hash(tokens[i]), Hostname: "h"}
					if _, err := st.Enroll(ctx, kh, m, now); err != nil {
						failed.Store(err)
						return
					}
				}
			}
		}()
	}
	for k := range benchMachines / perKey {
		work <- k
	}
	close(work)
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	b.Logf("registered %d machines in %s", benchMachines, time.Since(start).Round(time.Second))

	e := newEnvOn(b, st)
	data, err := bundle.Pack(testManifest("stitch_bench", simRelease, simBuildID, "CVE-2026-4000"), testutils.StandInModule(b, "stitch_bench", simRelease, ""))
	if err != nil {
		b.Fatal(err)
	}
	target, err := e.repo.Publish(data)
	if err != nil {
		b.Fatal(err)
	}
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		b.Fatal(err)
	}
	return e.srv.URL, tokens, target
}

// checker sends check-ins from the fleet's machines, in a scattered order,
// and keeps their latencies.
type checker struct {
	url, target string
	tokens      []string
	hc          *http.Client
	next        atomic.Int64
	mu          sync.Mutex
	lat         []time.Duration
}

func (c *checker) checkIn(ctx context.Context) error {
	i := int(c.next.Add(7919)) % len(c.tokens) // a prime stride scatters the machines
	cl := &api.Client{BaseURL: c.url, Token: c.tokens[i], HTTP: c.hc}
	t0 := time.Now()
	_, err := cl.CheckIn(ctx, api.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID, AgentVersion: "bench",
		Patches: []api.PatchState{{Target: c.target, Name: "stitch_bench", State: contract.StateApplied, Since: t0}}})
	d := time.Since(t0)
	c.mu.Lock()
	c.lat = append(c.lat, d)
	c.mu.Unlock()
	return err
}

// report sets the benchmark's metrics: rate, p50 and p99.
func (c *checker) report(b *testing.B, elapsed time.Duration) {
	if len(c.lat) == 0 {
		return
	}
	slices.Sort(c.lat)
	b.ReportMetric(float64(len(c.lat))/elapsed.Seconds(), "checkins/s")
	b.ReportMetric(float64(c.lat[len(c.lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(c.lat[len(c.lat)*99/100].Microseconds())/1000, "p99-ms")
}

// benchSaturated sends check-ins back to back from 32 clients: the most
// the server can take.
func benchSaturated(b *testing.B, c *checker) {
	b.SetParallelism(16)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := c.checkIn(context.Background()); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	c.report(b, time.Since(start))
}

// benchPaced sends check-ins at a steady rate, as a fleet does: the
// latency a machine sees at that load.
func benchPaced(b *testing.B, c *checker, perSecond int) {
	work := make(chan struct{}, 1024)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				if err := c.checkIn(context.Background()); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(perSecond))))
		work <- struct{}{}
	}
	close(work)
	wg.Wait()
	b.StopTimer()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	c.report(b, time.Since(start))
}
