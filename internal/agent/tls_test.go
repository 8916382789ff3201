package agent_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// newTLSFleet serves a fleet over TLS, as `stitch server --tls-cert
// --tls-key` does (Server.ServeListener on a real listener), with a
// server certificate ca signed; the operator's client trusts ca.
func newTLSFleet(t *testing.T, ca *testutils.CA) *fleet {
	t.Helper()
	st, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	repo := &bundle.Repo{Dir: t.TempDir()}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, key := ca.Issue(t, testutils.CertOptions{})
	must(os.WriteFile(filepath.Join(dir, "cert.pem"), cert, 0o644))
	must(os.WriteFile(filepath.Join(dir, "key.pem"), key, 0o600))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	certs, err := server.NewCertReloader(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), log)
	if err != nil {
		t.Fatal(err)
	}
	const token = "admin-token-for-tests"
	s := &server.Server{Store: st, Repo: repo, AdminToken: token, Policy: policy(40*time.Millisecond, 80*time.Millisecond, 120*time.Millisecond),
		CheckInEvery: time.Minute, Log: log, TLS: certs.TLSConfig()}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ServeListener(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	url := "https://" + l.Addr().String()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}}
	// The fleet's helpers read only the server's URL.
	f := &fleet{t: t, srv: &httptest.Server{URL: url}, repo: repo, admin: &api.Client{BaseURL: url, Token: token, HTTP: hc}}
	if err := f.admin.Do(context.Background(), "PUT", "/v1/admin/groups/default", api.Group{Name: "default", Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	return f
}

// An agent enrolled with --ca trusts that CA alone for the server and
// the repository over https: it enrolls, keeps the CA in its directory,
// and is patched through it; a server whose certificate another CA
// signed is refused at enrollment with the CA file and the fix named,
// as it is by the system's roots without --ca; a CA file that is not
// certificates, or --ca with a plain-HTTP server, is bad input.
func TestPinnedCA(t *testing.T) {
	ca, other := testutils.NewCA(t, "fleet CA"), testutils.NewCA(t, "someone else's CA")
	f := newTLSFleet(t, ca)
	caFile := filepath.Join(t.TempDir(), "fleet-ca.pem")
	must(os.WriteFile(caFile, ca.PEM, 0o644))

	m := newMachine(t)
	ctx := context.Background()
	cfg, err := m.Enroll(ctx, agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root(), Hostname: "m", CA: ca.PEM, CAFile: caFile})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(m.Dir, "ca.pem"); cfg.CA != want {
		t.Errorf("config's CA %q, want %q", cfg.CA, want)
	}
	if b, err := os.ReadFile(filepath.Join(m.Dir, "ca.pem")); err != nil || string(b) != string(ca.PEM) {
		t.Errorf("the CA is not kept in the agent's directory: %v", err)
	}
	var onDisk agent.Config
	if b, err := os.ReadFile(filepath.Join(m.Dir, "config.json")); err != nil || json.Unmarshal(b, &onDisk) != nil || onDisk.CA != cfg.CA {
		t.Errorf("config.json does not name the CA: %v %+v", err, onDisk)
	}
	// Check-ins, metadata, the bundle and the health reports go over TLS.
	f.fix(t, "fix_tls")
	m.pass(t)
	if !m.k.isLoaded("fix_tls") {
		t.Fatal("not applied over TLS with the pinned CA")
	}

	// Another CA: refused, naming the CA file and what to do.
	otherFile := filepath.Join(t.TempDir(), "other-ca.pem")
	must(os.WriteFile(otherFile, other.PEM, 0o644))
	m2 := newMachine(t)
	_, err = m2.Enroll(ctx, agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root(), CA: other.PEM, CAFile: otherFile})
	if !errors.Is(err, agent.ErrCertificate) || !strings.Contains(err.Error(), otherFile) || !strings.Contains(err.Error(), "give --ca the CA that issued") {
		t.Fatalf("enroll against a server another CA signed: %v", err)
	}
	for _, name := range []string{"config.json", "root.json", "ca.pem", "tuf"} {
		if _, err := os.Stat(filepath.Join(m2.Dir, name)); err == nil {
			t.Errorf("a refused enrollment left %s behind", name)
		}
	}
	// The system's roots (no --ca) do not know the fleet's CA either.
	if _, err := newMachine(t).Enroll(ctx, agent.EnrollOptions{Server: f.srv.URL, Key: f.key(), Root: f.root()}); !errors.Is(err, agent.ErrCertificate) || !strings.Contains(err.Error(), "--ca FILE") {
		t.Errorf("enroll without --ca against a private CA: %v", err)
	}
	// The server only (repository elsewhere over https): the same check.
	if _, err := newMachine(t).Enroll(ctx, agent.EnrollOptions{Server: f.srv.URL, Repo: f.srv.URL + "/v1/repo", Key: f.key(), Root: f.root(), CA: other.PEM, CAFile: otherFile}); !errors.Is(err, agent.ErrCertificate) {
		t.Errorf("enroll with the repository named: %v", err)
	}

	// Bad CA files and a CA for plain HTTP are bad input.
	plain := newFleet(t)
	for name, o := range map[string]agent.EnrollOptions{
		"a key, not a certificate": {Server: f.srv.URL, CA: []byte("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")},
		"not PEM":                  {Server: f.srv.URL, CA: []byte("hello")},
		"plain HTTP":               {Server: plain.srv.URL, CA: ca.PEM},
	} {
		o.Key, o.Root, o.CAFile = f.key(), f.root(), "bad.pem"
		if _, err := newMachine(t).Enroll(ctx, o); !errors.Is(err, agent.ErrBadCA) || !strings.Contains(err.Error(), "bad.pem") {
			t.Errorf("%s: %v", name, err)
		}
	}

	// The pinned CA gone: the agent fails to reach the server, never
	// falling back to the system's roots, and says why.
	must(os.Remove(filepath.Join(m.Dir, "ca.pem")))
	if err := m.Once(ctx); err == nil || !strings.Contains(err.Error(), "pinned CA") {
		t.Errorf("a pass without the pinned CA file: %v", err)
	}
}
