package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The operator's path end to end through the commands: a repository, a
// published build, a server on loopback, a key, a machine checking in, a
// rollout started and reported, and the exit codes of refused requests.
func TestPublishRolloutAndFleetCommands(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	var out bytes.Buffer
	st := &stdio{out: &out, err: io.Discard, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	cmd := func(run func(context.Context, *stdio, []string) error, args ...string) error {
		out.Reset()
		return run(ctx, st, args)
	}
	if err := cmd(runRepo, "init", "--dir", repoDir); err != nil {
		t.Fatal(err)
	}
	ko := testutils.StandInModule(t, "stitch_fix", "6.1.0-54-amd64", "")
	m := contract.Manifest{Version: contract.ManifestVersion, Name: "stitch_fix", Module: "stitch_fix.ko", ModuleHash: bundle.SHA256Hex(ko),
		Kernel: contract.KernelID{Release: "6.1.0-54-amd64", BuildID: "887cd47f03581c5baf735611814b0308637cd7f2"}, CVEs: []string{"CVE-2026-12345"},
		Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{Name: "f", Fingerprint: fingerprint.Fingerprint{Size: 8, SHA256: strings.Repeat("ab", 32)}}}}}}
	mj, _ := json.Marshal(m)
	os.WriteFile(filepath.Join(dir, "fix.json"), mj, 0o644)
	os.WriteFile(filepath.Join(dir, "fix.ko"), ko, 0o644)
	// Modules that disagree with the manifest are refused as bad input:
	// another build's (hash), an ordinary module, one for another kernel,
	// one that calls itself otherwise.
	for name, other := range map[string][]byte{
		"another build's module":   []byte("another module"),
		"a module not a livepatch": testutils.StandInPlainModule(t, "stitch_fix", "6.1.0-54-amd64"),
		"a module for 6.1.0-27":    testutils.StandInModule(t, "stitch_fix", "6.1.0-27-amd64", ""),
		"a module named otherwise": testutils.StandInModule(t, "stitch_other", "6.1.0-54-amd64", ""),
	} {
		m := m
		m.ModuleHash = bundle.SHA256Hex(other)
		mj, _ := json.Marshal(m)
		os.WriteFile(filepath.Join(dir, "other.json"), mj, 0o644)
		os.WriteFile(filepath.Join(dir, "other.ko"), other, 0o644)
		manifest := filepath.Join(dir, "other.json")
		if name == "another build's module" {
			manifest = filepath.Join(dir, "fix.json")
		}
		if err := cmd(runPublish, "--dir", repoDir, "--module", filepath.Join(dir, "other.ko"), "--manifest", manifest); exitCode(err) != exitUsage {
			t.Fatalf("%s published: %v (exit %d)", name, err, exitCode(err))
		}
	}
	if err := cmd(runPublish, "--dir", repoDir, "--module", filepath.Join(dir, "fix.ko"), "--manifest", filepath.Join(dir, "fix.json"), "--json"); err != nil {
		t.Fatal(err)
	}
	var pub struct{ Target string }
	json.Unmarshal(out.Bytes(), &pub)

	db, err := store.OpenSQLite(ctx, filepath.Join(dir, "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	const token = "admin-token-for-the-test"
	hs := httptest.NewServer((&server.Server{Store: db, Repo: &bundle.Repo{Dir: repoDir}, AdminToken: token, Log: st.log}).Handler())
	defer hs.Close()
	srv := "--server=" + hs.URL
	t.Setenv("STITCH_ADMIN_TOKEN", token)

	if err := cmd(runFleet, "group", "default", "--channel", "canary", srv); err != nil {
		t.Fatal(err)
	}
	// The server and the token from the environment; flags after the
	// arguments.
	t.Setenv("STITCH_ADMIN_TOKEN", "")
	t.Setenv(envToken, token)
	t.Setenv(envServer, hs.URL)
	if err := cmd(runFleet, "channel", "canary", "--delay", "90m"); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runFleet, "groups"); err != nil || !regexp.MustCompile(`(?m)^default\s+canary\s+-$`).MatchString(out.String()) {
		t.Fatalf("fleet groups: %v\n%s", err, out.String())
	}
	if err := cmd(runFleet, "channels", "--json"); err != nil || !strings.Contains(out.String(), `"name": "canary",
    "delay_seconds": 5400`) {
		t.Fatalf("fleet channels: %v\n%s", err, out.String())
	}
	t.Setenv(envToken, "")
	t.Setenv(envServer, "")
	t.Setenv("STITCH_ADMIN_TOKEN", token)
	if err := cmd(runFleet, "key", "--max-machines", "5", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var key api.KeyResponse
	json.Unmarshal(out.Bytes(), &key)
	c := &api.Client{BaseURL: hs.URL}
	enrolled, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	c.Token = enrolled.Token
	if _, err := c.CheckIn(ctx, api.CheckIn{KernelRelease: m.Kernel.Release, KernelBuildID: m.Kernel.BuildID}); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runRollout, "start", pub.Target, srv); err != nil || !strings.Contains(out.String(), "running at stage 0") {
		t.Fatalf("rollout start: %v %q", err, out.String())
	}
	if err := cmd(runFleet, "patches", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var pr struct {
		Patches []api.PatchReport
		Fixes   []api.FixReport
	}
	if err := json.Unmarshal(out.Bytes(), &pr); err != nil || len(pr.Patches) != 1 || pr.Patches[0].Eligible != 1 || pr.Patches[0].CVEs[0] != "CVE-2026-12345" ||
		len(pr.Fixes) != 1 || pr.Fixes[0].PatchedMachines != 1 {
		t.Fatalf("fleet patches: %v %s", err, out.String())
	}
	if err := cmd(runFleet, "cves", srv); err != nil || !strings.Contains(out.String(), "CVE-2026-12345  0      1") {
		t.Fatalf("fleet cves: %v\n%s", err, out.String())
	}

	// A read-only operator reads the reports but may not halt; the
	// refusal is in the audit log under its name.
	if err := cmd(runFleet, "operator", "viewer", "--role", "read-only", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var viewer api.OperatorResponse
	json.Unmarshal(out.Bytes(), &viewer)
	t.Setenv("STITCH_ADMIN_TOKEN", "")
	t.Setenv(envToken, viewer.Token)
	if err := cmd(runFleet, "machines", srv, "--search", "WEB", "--state", "stale"); err != nil || !strings.Contains(out.String(), "no machine on this page (0 in all)") {
		t.Errorf("read-only operator: fleet machines --search WEB --state stale: %v\n%s", err, out.String())
	}
	if err := cmd(runFleet, "machines", srv, "--search", "WEB", "--json"); err != nil || !strings.Contains(out.String(), `"hostname": "web1"`) || !strings.Contains(out.String(), `"total": 1`) {
		t.Errorf("read-only operator: fleet machines --search WEB: %v\n%s", err, out.String())
	}
	if err := cmd(runFleet, "machines", srv, "--state", "asleep"); exitCode(err) != exitUsage || !strings.Contains(err.Error(), "want one of stale") {
		t.Errorf("fleet machines --state asleep: %v", err)
	}
	if err := cmd(runRollout, "halt", "stitch_fix", "--reason", "x", srv); exitCode(err) != exitUsage || !strings.Contains(err.Error(), "may not rollout halt") {
		t.Errorf("read-only operator: rollout halt: %v", err)
	}
	t.Setenv(envToken, token)
	if err := cmd(runFleet, "audit", "--actor", "viewer", srv); err != nil || !strings.Contains(out.String(), "rollout halt") || !strings.Contains(out.String(), "403 Forbidden") {
		t.Errorf("fleet audit: %v\n%s", err, out.String())
	}
	t.Setenv(envToken, "")

	for name, tc := range map[string]struct {
		run  func(context.Context, *stdio, []string) error
		args []string
		env  string
		code int
	}{
		"resume a running rollout": {runRollout, []string{"resume", pub.Target, srv}, token, exitUsage},
		"unknown target":           {runRollout, []string{"halt", "6.1.0-54-amd64/stitch_x-0123456789abcdef.stitch", srv}, token, exitUsage},
		"wrong admin token":        {runFleet, []string{"machines", srv}, "not-the-admin-token", exitUsage},
		"no admin token":           {runFleet, []string{"machines", srv}, "", exitUsage},
		"server down":              {runFleet, []string{"machines", "--server=http://127.0.0.1:1"}, token, exitFailed},
		"bad date":                 {runFleet, []string{"channel", "slow", "--cutoff", "tomorrow", srv}, token, exitUsage},
	} {
		t.Setenv("STITCH_ADMIN_TOKEN", tc.env)
		if err := cmd(tc.run, tc.args...); exitCode(err) != tc.code {
			t.Errorf("%s: %v, exit %d, want %d", name, err, exitCode(err), tc.code)
		}
	}
}
