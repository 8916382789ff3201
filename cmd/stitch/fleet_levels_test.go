package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// Levels through the commands: two levels of a stream published and
// started (`stitch rollout start` says which level), a machine taking the
// newest, `stitch fleet levels` (table and JSON) and `stitch fleet
// machines` showing it, and a second build of a level refused as bad
// input.
func TestFleetLevelsCommand(t *testing.T) {
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
	kernel := contract.KernelID{Release: "6.1.0-54-amd64", BuildID: "887cd47f03581c5baf735611814b0308637cd7f2"}
	// publish publishes level n of stream mem carrying fixes (name:CVE).
	publish := func(n int, fixes ...string) string {
		t.Helper()
		name := contract.LevelName("mem", n)
		ko := testutils.StandInModule(t, name, kernel.Release, strings.Join(fixes, " "))
		m := contract.Manifest{Version: contract.ManifestVersion, Name: name, Module: name + ".ko", ModuleHash: bundle.SHA256Hex(ko), Kernel: kernel,
			Replace: true, Level: &contract.Level{Stream: "mem", Number: n, Supersedes: n - 1},
			Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{Name: "meminfo_proc_show", Fingerprint: fingerprint.Fingerprint{Size: 8, SHA256: strings.Repeat("ab", 32)}}}}}}
		for _, f := range fixes {
			fix, cve, _ := strings.Cut(f, ":")
			m.Fixes = append(m.Fixes, contract.Fix{Name: fix, Hash: bundle.SHA256Hex([]byte(fix)), CVEs: []string{cve}, Files: []string{"fs/proc/meminfo.c"}})
			m.CVEs = append(m.CVEs, cve)
		}
		mj, _ := json.Marshal(m)
		base := filepath.Join(dir, fmt.Sprintf("%s-%d", name, len(fixes)))
		os.WriteFile(base+".json", mj, 0o644)
		os.WriteFile(base+".ko", ko, 0o644)
		if err := cmd(runPublish, "--dir", repoDir, "--module", base+".ko", "--manifest", base+".json", "--json"); err != nil {
			t.Fatal(err)
		}
		var pub struct{ Target string }
		json.Unmarshal(out.Bytes(), &pub)
		return pub.Target
	}
	l1 := publish(1, "meminfo_a.patch:CVE-2026-1001")
	l2 := publish(2, "meminfo_a.patch:CVE-2026-1001", "meminfo_b.patch:CVE-2026-1002")

	db, err := store.OpenSQLite(ctx, filepath.Join(dir, "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	const token = "admin-token-for-the-test"
	// One stage: every machine is offered a level at once.
	pol := rollout.Policy{Stages: []float64{1}, Checks: rollout.DefaultPolicy.Checks}
	hs := httptest.NewServer((&server.Server{Store: db, Repo: &bundle.Repo{Dir: repoDir}, AdminToken: token, Log: st.log, Policy: pol}).Handler())
	defer hs.Close()
	srv := "--server=" + hs.URL
	t.Setenv("STITCH_ADMIN_TOKEN", token)
	if err := cmd(runFleet, "group", "default", "--channel", "canary", srv); err != nil {
		t.Fatal(err)
	}
	for n, target := range []string{l1, l2} {
		if err := cmd(runRollout, "start", target, srv); err != nil || !strings.Contains(out.String(), fmt.Sprintf("level %d of stream mem: running", n+1)) {
			t.Fatalf("rollout start: %v %q", err, out.String())
		}
	}
	if err := cmd(runFleet, "key", "--max-machines", "5", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var key api.KeyResponse
	json.Unmarshal(out.Bytes(), &key)
	var machines []*api.Client
	for _, host := range []string{"web1", "web2"} {
		c := &api.Client{BaseURL: hs.URL}
		enrolled, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: host})
		if err != nil {
			t.Fatal(err)
		}
		c.Token = enrolled.Token
		machines = append(machines, c)
	}
	// Both are offered level 2 only; web1 takes it, web2 does not.
	for _, c := range machines {
		r, err := c.CheckIn(ctx, api.CheckIn{KernelRelease: kernel.Release, KernelBuildID: kernel.BuildID})
		if err != nil || len(r.Actions) != 1 || r.Actions[0].Target != l2 || r.Actions[0].Level == nil || r.Actions[0].Level.Number != 2 {
			t.Fatalf("check-in: %+v %v", r.Actions, err)
		}
	}
	if _, err := machines[0].CheckIn(ctx, api.CheckIn{KernelRelease: kernel.Release, KernelBuildID: kernel.BuildID,
		Patches: []api.PatchState{{Target: l2, Name: "mem_l2", State: contract.StateApplied}}}); err != nil {
		t.Fatal(err)
	}

	if err := cmd(runFleet, "levels", srv); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "KERNEL") || !strings.Contains(lines[1], "6.1.0-54-amd64  887cd47f0358  mem     none") ||
		!strings.Contains(lines[3], "2      running  0 (100%)  1         2      CVE-2026-1001 CVE-2026-1002") {
		t.Fatalf("fleet levels:\n%s", out.String())
	}
	if err := cmd(runFleet, "levels", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var ls []api.KernelLevels
	if err := json.Unmarshal(out.Bytes(), &ls); err != nil || len(ls) != 1 || ls[0].Streams[0].NoLevel != 1 || ls[0].Streams[0].Levels[1].Machines != 1 {
		t.Fatalf("fleet levels --json: %v\n%s", err, out.String())
	}
	if err := cmd(runFleet, "machines", "--coverage", srv); err != nil || !strings.Contains(out.String(), "mem 2") {
		t.Fatalf("fleet machines: %v\n%s", err, out.String())
	}

	// Another build of level 2: refused (exit 2), naming the first.
	again := publish(2, "meminfo_b.patch:CVE-2026-1002")
	if err := cmd(runRollout, "start", again, srv); exitCode(err) != exitUsage || !strings.Contains(err.Error(), l2) {
		t.Fatalf("a second level 2: %v (exit %d)", err, exitCode(err))
	}
}
