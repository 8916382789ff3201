package server

import (
	"context"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/server/store"
)

// BenchmarkConsole100k times the console's pages over a fleet of 100,000
// machines (SQLite; STITCH_BENCH_MACHINES changes the number). Seeding
// takes a minute or two and is not timed.
//
//	go test ./internal/server -run '^$' -bench BenchmarkConsole100k -benchtime 20x
func BenchmarkConsole100k(b *testing.B) {
	n := 100_000
	if v, err := strconv.Atoi(os.Getenv("STITCH_BENCH_MACHINES")); err == nil && v > 0 {
		n = v
	}
	st, err := store.OpenSQLite(context.Background(), filepath.Join(b.TempDir(), "fleet.db"))
	if err != nil {
		b.Fatal(err)
	}
	e := newEnvOn(b, st)
	seedFleet(b, e.st, n, time.Now())
	target := publish(b, e.repo, "stitch_fix", simBuildID, "CVE-2026-0001")
	if c := e.call(b, "POST", "/v1/admin/patches", e.admin, js(map[string]string{"target": target}), nil); c != http.StatusOK && c != http.StatusCreated {
		b.Fatalf("register: %d", c)
	}
	jar, _ := cookiejar.New(nil)
	c := &http.Client{Jar: jar}
	if resp, err := c.PostForm(e.srv.URL+"/console/login", url.Values{"token": {e.admin}}); err != nil || resp.StatusCode != http.StatusOK {
		b.Fatalf("login: %v %v", err, resp)
	}
	b.Run("overview-cold", func(b *testing.B) { // the fleet-wide figures computed afresh each time
		for b.Loop() {
			e.s.forgetFigures()
			resp, err := c.Get(e.srv.URL + "/console/")
			if err != nil || resp.StatusCode != http.StatusOK {
				b.Fatalf("GET /console/: %v %v", err, resp)
			}
			resp.Body.Close()
		}
	})
	for _, page := range []struct{ name, path string }{
		{"overview", "/console/"},
		{"machines-first", "/console/machines"},
		{"machines-deep-page", "/console/machines?page=1500"},
		{"machines-search", "/console/machines?q=web0999"},
		{"machines-kernel-stale", "/console/machines?kernel=" + url.QueryEscape(simRelease) + "&state=stale&sort=last_checkin&desc=1"},
		{"machine", "/console/machines/m-00042"},
		{"patches", "/console/patches"},
		{"cves", "/console/cves"},
		{"csv-all", "/console/machines.csv"},
	} {
		b.Run(page.name, func(b *testing.B) {
			for b.Loop() {
				resp, err := c.Get(e.srv.URL + page.path)
				if err != nil || resp.StatusCode != http.StatusOK {
					b.Fatalf("GET %s: %v %v", page.path, err, resp)
				}
				resp.Body.Close()
			}
		})
	}
}
