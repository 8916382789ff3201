package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// TestServeKeepsRepositoryFresh: a server started on a repository whose
// timestamp expired while it was down re-signs it at once by itself,
// agents fetch again, and /metrics shows each role's expiry.
func TestServeKeepsRepositoryFresh(t *testing.T) {
	signed := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	later := signed.Add(3 * 24 * time.Hour)
	repo := &bundle.Repo{Dir: t.TempDir(), Now: func() time.Time { return signed }}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	target := publish(t, repo, "stitch_fix_1", strings.Repeat("ab", 20))
	root, err := repo.TrustedRoot()
	if err != nil {
		t.Fatal(err)
	}
	repo.Now = func() time.Time { return later }
	st, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s := &Server{Store: st, Repo: repo, AdminToken: "admin-secret", Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, addr) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	gauge := regexp.MustCompile(`stitch_repo_expires_seconds\{role="timestamp"\} (\d+)`)
	var exp int64
	deadline := time.Now().Add(10 * time.Second)
	for exp == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		req, _ := http.NewRequest("GET", "http://"+addr+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer admin-secret")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if m := gauge.FindSubmatch(body); m != nil {
			exp, _ = strconv.ParseInt(string(m[1]), 10, 64)
			for _, role := range []string{"root", "targets", "snapshot"} {
				if !strings.Contains(string(body), fmt.Sprintf("stitch_repo_expires_seconds{role=%q}", role)) {
					t.Errorf("no expiry gauge for %s:\n%s", role, body)
				}
			}
		}
	}
	if want := later.Add(bundle.DefaultExpiries.Timestamp).Unix(); exp != want {
		t.Fatalf("timestamp expiry gauge %d, want %d (re-signed at the server's start)", exp, want)
	}
	// The signing keys are next to metadata/ and targets/, never served.
	for _, path := range []string{"/v1/repo/metadata/../keys/timestamp.key", "/v1/repo/metadata/..%2fkeys/timestamp.key",
		"/v1/repo/targets/..%2f..%2fkeys%2ftimestamp.key", "/v1/repo/keys/timestamp.key"} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("GET %s: 200", path)
		}
	}
	c := &bundle.Client{BaseURL: "http://" + addr + "/v1/repo", TrustedRoot: root, CacheDir: t.TempDir(), Now: func() time.Time { return later }}
	if _, _, err := c.Fetch(context.Background(), target); err != nil {
		t.Fatalf("fetch from the server after it refreshed: %v", err)
	}
}
