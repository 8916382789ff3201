package server

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

type env struct {
	srv   *httptest.Server
	st    store.Store
	repo  *bundle.Repo
	admin string
	s     *Server
}

// newEnv starts a server on SQLite and loopback; opts adjust it first.
func newEnv(t *testing.T, opts ...func(*Server)) *env {
	t.Helper()
	st, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	return newEnvOn(t, st, opts...)
}

// postgresStore opens the test PostgreSQL (STITCH_TEST_POSTGRES) in a
// schema of its own, emptied first, so that this package never touches
// the tables of the store package's tests, even when packages run in
// parallel. Without the variable it skips, or fails when CI is set.
func postgresStore(tb testing.TB, schema string) *store.SQL {
	tb.Helper()
	dsn := os.Getenv("STITCH_TEST_POSTGRES")
	if dsn == "" {
		if os.Getenv("CI") != "" {
			tb.Fatal("CI is set but STITCH_TEST_POSTGRES is not: run scripts/postgres.sh and export its output")
		}
		tb.Skip("STITCH_TEST_POSTGRES unset: run `export \"$(scripts/postgres.sh)\"` to test PostgreSQL too")
	}
	if !strings.HasPrefix(dsn, "postgres://") && !strings.HasPrefix(dsn, "postgresql://") {
		tb.Fatalf("STITCH_TEST_POSTGRES: want a postgres:// URL, got %q", dsn)
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		tb.Fatal(err)
	}
	defer db.Close()
	for _, q := range []string{"DROP SCHEMA IF EXISTS " + schema + " CASCADE", "CREATE SCHEMA " + schema} {
		if _, err := db.Exec(q); err != nil {
			tb.Fatal(err)
		}
	}
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	st, err := store.OpenPostgres(context.Background(), dsn+sep+"search_path="+schema)
	if err != nil {
		tb.Fatal(err)
	}
	return st
}

// newEnvOn starts a server on st (closed at the end) and loopback.
func newEnvOn(t testing.TB, st store.Store, opts ...func(*Server)) *env {
	t.Helper()
	t.Cleanup(func() { st.Close() })
	repo := &bundle.Repo{Dir: t.TempDir()}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	s := &Server{Store: st, Repo: repo, AdminToken: "admin-secret", Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, o := range opts {
		o(s)
	}
	hs := httptest.NewServer(s.Handler()) // on 127.0.0.1
	t.Cleanup(hs.Close)
	return &env{srv: hs, st: st, repo: repo, admin: "admin-secret", s: s}
}

func (e *env) call(t testing.TB, method, path, token string, body []byte, out any) int {
	t.Helper()
	req, _ := http.NewRequest(method, e.srv.URL+path, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil {
		json.NewDecoder(resp.Body).Decode(out)
	}
	return resp.StatusCode
}

func js(v any) []byte { b, _ := json.Marshal(v); return b }

func TestEnrollmentLimitsAndAuth(t *testing.T) {
	e := newEnv(t)
	var key api.KeyResponse
	if c := e.call(t, "POST", "/v1/admin/keys", e.admin, js(api.KeyRequest{}), &key); c != 201 || key.MaxMachines != FreeTierMachines {
		t.Fatalf("create key: %d %+v", c, key)
	}
	var tokens []string
	for i := range 3 {
		var r api.EnrollResponse
		if c := e.call(t, "POST", "/v1/machines", "", js(api.EnrollRequest{Key: key.Key, Hostname: "host" + string(rune('a'+i))}), &r); c != 201 {
			t.Fatalf("enroll %d: %d", i, c)
		}
		tokens = append(tokens, r.Token)
	}
	var er api.Error
	if c := e.call(t, "POST", "/v1/machines", "", js(api.EnrollRequest{Key: key.Key, Hostname: "hostd"}), &er); c != 403 || !strings.Contains(er.Error, "machine limit") {
		t.Fatalf("fourth machine: %d %q", c, er.Error)
	}
	// A machine reads only itself and cannot act as admin.
	var me api.MachineView
	if c := e.call(t, "GET", "/v1/machines/self", tokens[1], nil, &me); c != 200 || me.Hostname != "hostb" {
		t.Fatalf("self: %d %+v", c, me)
	}
	if c := e.call(t, "POST", "/v1/admin/keys", tokens[0], js(api.KeyRequest{}), nil); c != 401 {
		t.Fatalf("machine token as admin: %d", c)
	}
	if c := e.call(t, "GET", "/v1/machines/self", e.admin, nil, nil); c != 401 {
		t.Fatalf("admin token as machine: %d", c)
	}
	if c := e.call(t, "GET", "/v1/machines/self", "", nil, nil); c != 401 {
		t.Fatalf("no token: %d", c)
	}
}

func TestBadRequestsChangeNothing(t *testing.T) {
	e := newEnv(t)
	var key api.KeyResponse
	e.call(t, "POST", "/v1/admin/keys", e.admin, js(api.KeyRequest{MaxMachines: 5}), &key)
	for name, tc := range map[string]struct {
		body []byte
		code int
	}{
		"malformed":     {[]byte(`{"key": `), 400},
		"unknown field": {[]byte(`{"key":"x","hostname":"h","admin":true}`), 400},
		"huge":          {append([]byte(`{"key":"`), bytes.Repeat([]byte("a"), 1<<20)...), 413},
		"bad host":      {js(api.EnrollRequest{Key: key.Key, Hostname: "a b"}), 400},
		"trailing data": {append(js(api.EnrollRequest{Key: key.Key, Hostname: "h"}), []byte(`{}`)...), 400},
		"another group": {js(api.EnrollRequest{Key: key.Key, Hostname: "h", Group: "nope"}), 403},
		"bad host id":   {js(api.EnrollRequest{Key: key.Key, Hostname: "h", HostID: "../etc/machine-id"}), 400},
		"wrong key":     {js(api.EnrollRequest{Key: "sk-nope", Hostname: "h"}), 401},
	} {
		if c := e.call(t, "POST", "/v1/machines", "", tc.body, nil); c != tc.code {
			t.Errorf("%s: %d, want %d", name, c, tc.code)
		}
	}
	if c := e.call(t, "POST", "/v1/admin/keys", e.admin, []byte(`{"max_machines":-1}`), nil); c != 400 {
		t.Errorf("negative limit: %d", c)
	}
	if c := e.call(t, "GET", "/v1/nope", "", nil, nil); c != 404 {
		t.Errorf("unknown path: %d", c)
	}
	var n int
	if n, _ = e.st.CountMachines(context.Background(), key.ID); n != 0 {
		t.Fatalf("%d machines enrolled by bad requests", n)
	}
}

func TestRepoServedAndVerified(t *testing.T) {
	e := newEnv(t)
	ko := testutils.StandInModule(t, "fix_a", "6.1.0", "")
	data, err := bundle.Pack(testManifest("fix_a", "6.1.0", "abcdef0123"), ko)
	if err != nil {
		t.Fatal(err)
	}
	name, err := e.repo.Publish(data)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := e.repo.TrustedRoot()
	c := &bundle.Client{BaseURL: e.srv.URL + "/v1/repo", TrustedRoot: root, CacheDir: t.TempDir(), HTTP: e.srv.Client()}
	b, _, err := c.Fetch(context.Background(), name)
	if err != nil || !bytes.Equal(b.Module, ko) {
		t.Fatalf("fetch through the server: %v", err)
	}
}

// testManifest is a minimal valid manifest for a patch to kernel
// release/buildID.
func testManifest(name, release, buildID string, cves ...string) contract.Manifest {
	return contract.Manifest{
		Version: contract.ManifestVersion, Name: name, Module: name + ".ko",
		Kernel: contract.KernelID{Release: release, BuildID: buildID}, CVEs: cves,
		Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{
			Name: "f", Fingerprint: fingerprint.Fingerprint{Size: 16, SHA256: strings.Repeat("ab", 32)},
		}}}},
	}
}
