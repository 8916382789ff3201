package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// `stitch fleet keys|revoke|delete` (finding 7), the command the limit
// error names, and the server's limit flags.
func TestFleetKeysRevokeAndDelete(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	var out bytes.Buffer
	st := &stdio{out: &out, err: io.Discard, log: slog.New(slog.DiscardHandler)}
	cmd := func(run func(context.Context, *stdio, []string) error, args ...string) error {
		out.Reset()
		return run(ctx, st, args)
	}
	repo := &bundle.Repo{Dir: filepath.Join(dir, "repo")}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	db, err := store.OpenSQLite(ctx, filepath.Join(dir, "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	const token = "admin-token-for-the-test"
	hs := httptest.NewServer((&server.Server{Store: db, Repo: repo, AdminToken: token, Log: st.log}).Handler())
	defer hs.Close()
	srv := "--server=" + hs.URL
	t.Setenv("STITCH_ADMIN_TOKEN", token)

	if err := cmd(runFleet, "key", "--max-machines", "1", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var key api.KeyResponse
	json.Unmarshal(out.Bytes(), &key)
	c := &api.Client{BaseURL: hs.URL}
	m, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "web2"})
	var se *api.StatusError
	if !errors.As(err, &se) || !strings.Contains(se.Message, "stitch fleet delete MACHINE") {
		t.Fatalf("over the limit: %v", err)
	}

	if err := cmd(runFleet, "keys", srv); err != nil || !strings.Contains(out.String(), key.ID) || !strings.Contains(out.String(), "1 of 1") {
		t.Fatalf("fleet keys: %v\n%s", err, out.String())
	}
	if err := cmd(runFleet, "machines", "--coverage", srv); err != nil || !strings.Contains(out.String(), key.ID) {
		t.Fatalf("fleet machines names no key: %v\n%s", err, out.String())
	}
	// The command the limit error names frees the slot.
	if err := cmd(runFleet, "delete", m.MachineID, srv); err != nil || !strings.Contains(out.String(), "deleted") {
		t.Fatalf("fleet delete: %v %q", err, out.String())
	}
	if _, err := (&api.Client{BaseURL: hs.URL, Token: m.Token}).Self(ctx); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("a deleted machine's token: %v", err)
	}
	if _, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "web2"}); err != nil {
		t.Fatalf("enrollment after fleet delete: %v", err)
	}
	if err := cmd(runFleet, "revoke", key.ID, srv); err != nil || !strings.Contains(out.String(), "revoked") {
		t.Fatalf("fleet revoke: %v %q", err, out.String())
	}
	if err := cmd(runFleet, "keys", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var keys []api.KeyInfo
	if err := json.Unmarshal(out.Bytes(), &keys); err != nil || len(keys) != 1 || keys[0].RevokedAt.IsZero() || keys[0].Machines != 1 {
		t.Fatalf("fleet keys --json after the revocation: %v %s", err, out.String())
	}
	if _, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "web3"}); !errors.Is(err, api.ErrForbidden) {
		t.Fatalf("enrollment with a revoked key: %v", err)
	}
	if err := cmd(runFleet, "revoke", key.ID, "--delete-machines", srv); err != nil || !strings.Contains(out.String(), "1 machines deleted") {
		t.Fatalf("fleet revoke --delete-machines: %v %q", err, out.String())
	}

	for name, args := range map[string][]string{
		"delete unknown":  {"delete", "m-nope", srv},
		"revoke unknown":  {"revoke", "k-nope", srv},
		"delete no id":    {"delete", srv},
		"revoke two keys": {"revoke", "a", "b", srv},
	} {
		if err := cmd(runFleet, args...); exitCode(err) != exitUsage {
			t.Errorf("%s: %v, exit %d, want %d", name, err, exitCode(err), exitUsage)
		}
	}
	for _, flag := range []string{"--max-conns=0", "--report-rate=-1", "--read-timeout=0s", "--report-burst=0"} {
		if err := cmd(runServer, flag, "--dir", repo.Dir, "--db", filepath.Join(dir, "x.db")); exitCode(err) != exitUsage {
			t.Errorf("stitch server %s: %v, exit %d, want %d", flag, err, exitCode(err), exitUsage)
		}
	}
}
