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
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// benchMachines is the fleet the load benchmark registers.
const benchMachines = 100_000

// BenchmarkCheckIn measures check-ins per second and their p99 latency
// over loopback HTTP with 100,000 registered machines, each check-in from a
// random machine that holds one patch, on SQLite and (with
// STITCH_TEST_POSTGRES) PostgreSQL:
//
//	go test -run '^$' -bench CheckIn -benchtime 20000x ./internal/server
//
// Registering the machines takes a while; it happens once per store.
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
			b.Run(fmt.Sprintf("machines=%d", benchMachines), func(b *testing.B) {
				benchCheckIns(b, url, tokens, target)
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
	data, err := bundle.Pack(testManifest("stitch_bench", simRelease, simBuildID, "CVE-2026-4000"), []byte("module"))
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

func benchCheckIns(b *testing.B, url string, tokens []string, target string) {
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var mu sync.Mutex
	var lat []time.Duration
	var next atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		ctx := context.Background()
		for pb.Next() {
			i := int(next.Add(7919)) % len(tokens) // a prime stride visits machines in a scattered order
			c := &api.Client{BaseURL: url, Token: tokens[i], HTTP: hc}
			t0 := time.Now()
			_, err := c.CheckIn(ctx, api.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID, AgentVersion: "bench",
				Patches: []api.PatchState{{Target: target, Name: "stitch_bench", State: api.StateApplied, Since: t0}}})
			if err != nil {
				b.Error(err)
				return
			}
			mine = append(mine, time.Since(t0))
		}
		mu.Lock()
		lat = append(lat, mine...)
		mu.Unlock()
	})
	elapsed := time.Since(start)
	b.StopTimer()
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "checkins/s")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
}
