package bundle

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// serveLikeServer serves the repository the way internal/server does:
// metadata and targets directories under /v1/repo with http.FileServer.
func serveLikeServer(t *testing.T, r *Repo) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle("GET /v1/repo/metadata/", http.StripPrefix("/v1/repo/metadata/", http.FileServer(http.Dir(r.MetadataDir()))))
	mux.Handle("GET /v1/repo/targets/", http.StripPrefix("/v1/repo/targets/", http.FileServer(http.Dir(r.TargetsDir()))))
	srv := httptest.NewUnstartedServer(mux)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// TestNoRefusalDuringPublishAndRefresh: agents fetching while the
// repository publishes and refreshes in a loop are never refused. With
// files swapped one by one (no consistent snapshots) a fetch that read
// the old timestamp and then the new snapshot was refused as a rollback.
func TestNoRefusalDuringPublishAndRefresh(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	repo := &Repo{Dir: t.TempDir(), Now: clk.now}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	first, err := repo.Publish(testBundle(t, "module 0"))
	if err != nil {
		t.Fatal(err)
	}
	srv := serveLikeServer(t, repo)
	root, err := repo.TrustedRoot()
	if err != nil {
		t.Fatal(err)
	}
	newClient := func() *Client {
		return &Client{BaseURL: srv.URL + "/v1/repo", TrustedRoot: root, CacheDir: t.TempDir(), HTTP: srv.Client(), Now: clk.now}
	}
	hammer(t, newClient, first, func(i int) error {
		if _, err := repo.Publish(testBundle(t, fmt.Sprintf("module %d", i))); err != nil {
			return err
		}
		return repo.Refresh()
	})
}

// hammer runs six clients fetching target in a loop while write runs in a
// loop, for three seconds, and fails if any fetch was refused.
func hammer(t *testing.T, newClient func() *Client, target string, write func(i int) error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var writes sync.WaitGroup
	writes.Add(1)
	go func() {
		defer writes.Done()
		for i := 1; ctx.Err() == nil; i++ {
			if err := write(i); err != nil {
				t.Errorf("write %d: %v", i, err)
				return
			}
		}
	}()
	var fetches, refused atomic.Int64
	var firstErr atomic.Value
	var clients sync.WaitGroup
	for c := range 6 {
		clients.Add(1)
		go func() {
			defer clients.Done()
			cl := newClient()
			for ctx.Err() == nil {
				_, _, err := cl.Fetch(context.Background(), target)
				fetches.Add(1)
				if err != nil {
					refused.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("client %d: %v", c, err))
				}
			}
		}()
	}
	clients.Wait()
	writes.Wait()
	t.Logf("%d fetches, %d refused", fetches.Load(), refused.Load())
	if fetches.Load() < 50 {
		t.Fatalf("only %d fetches: the test proves nothing", fetches.Load())
	}
	if n := refused.Load(); n > 0 {
		t.Fatalf("%d of %d fetches refused during publishes and refreshes; first: %v", n, fetches.Load(), firstErr.Load())
	}
}

// TestNoRefusalDuringMirrorImport: agents reading a file:// mirror while
// newer exports are imported over it in a loop are never refused.
func TestNoRefusalDuringMirrorImport(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	online := &Repo{Dir: t.TempDir(), Now: clk.now}
	if err := online.Init(); err != nil {
		t.Fatal(err)
	}
	first, err := online.Publish(testBundle(t, "module 0"))
	if err != nil {
		t.Fatal(err)
	}
	mirror := &Repo{Dir: filepath.Join(t.TempDir(), "mirror"), Now: clk.now}
	if err := mirror.Import(bytes.NewReader(exportValid(t, online))); err != nil {
		t.Fatal(err)
	}
	root, _ := online.TrustedRoot()
	hammer(t, func() *Client { return fileClient(t, mirror.Dir, root, clk.now) }, first, func(i int) error {
		if _, err := online.Publish(testBundle(t, fmt.Sprintf("module %d", i))); err != nil {
			return err
		}
		var b bytes.Buffer
		if err := online.ExportValid(&b, DefaultExportValid); err != nil {
			return err
		}
		return mirror.Import(&b)
	})
}
