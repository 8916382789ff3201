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
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
	"github.com/stitchpatch/stitch/internal/testutils/buildout"
)

// The many-kernel path through the commands: a build's whole OUT/ tree
// (patches for 6.1.0-47 and -53, a contained record for -57) published
// in one command, the patches started, machines on four kernels, and
// `stitch fleet patches` and `cves` showing each kernel's coverage.
func TestPublishTreeAndFleetCoverage(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	var out, errOut bytes.Buffer
	st := &stdio{out: &out, err: &errOut, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	cmd := func(run func(context.Context, *stdio, []string) error, args ...string) error {
		out.Reset()
		errOut.Reset()
		return run(ctx, st, args)
	}
	if err := cmd(runRepo, "init", "--dir", repoDir); err != nil {
		t.Fatal(err)
	}
	fix := buildout.Fix{Name: "stitch_cmdline", CVEs: []string{"CVE-2026-1111"}, Upstream: "0123456789abcdef0123456789abcdef01234567"}
	k47 := buildout.Kernel{Release: "6.1.0-47-amd64", BuildID: "4747474747474747474747474747474747474747"}
	k50 := buildout.Kernel{Release: "6.1.0-50-amd64", BuildID: "5050505050505050505050505050505050505050"}
	k53 := buildout.Kernel{Release: "6.1.0-53-amd64", BuildID: "5353535353535353535353535353535353535353"}
	k57 := buildout.Kernel{Release: "6.1.0-57-amd64", BuildID: "5757575757575757575757575757575757575757", Contains: true}
	tree := buildout.Write(t, filepath.Join(dir, "OUT"), fix, k47, k53, k57)
	os.WriteFile(filepath.Join(tree, "summary.json"), []byte(`{"built": 2}`), 0o644)

	// A broken tree is refused as bad input and publishes nothing.
	broken := buildout.Write(t, filepath.Join(dir, "BROKEN"), fix, k47, k57)
	os.Remove(filepath.Join(broken, k47.Release, "stitch_cmdline.json"))
	if err := cmd(runPublish, "--dir", repoDir, broken); exitCode(err) != exitUsage || !strings.Contains(err.Error(), "no manifest") {
		t.Fatalf("broken tree: %v (exit %d)", err, exitCode(err))
	}
	if s, _ := (&bundle.Repo{Dir: repoDir}).Status(); s.Targets != 0 {
		t.Fatalf("a refused tree published %d targets", s.Targets)
	}

	if err := cmd(runPublish, "--dir", repoDir, "--json", tree); err != nil {
		t.Fatal(err)
	}
	var pub struct {
		Published []struct {
			bundle.Published
			File string
		}
		Skipped []string
	}
	if err := json.Unmarshal(out.Bytes(), &pub); err != nil || len(pub.Published) != 3 || len(pub.Skipped) != 1 {
		t.Fatalf("publish OUT/: %v %s", err, out.String())
	}
	targets := map[string]string{}
	for _, p := range pub.Published {
		targets[p.Release] = p.Target
		if !p.New || !strings.HasPrefix(p.File, p.Release+"/") {
			t.Errorf("published %+v", p)
		}
	}
	if !strings.HasPrefix(targets[k57.Release], "contained/6.1.0-57-amd64/stitch_cmdline-") {
		t.Fatalf("the contained record's target %q", targets[k57.Release])
	}
	// Again: nothing new; the table says so, and names the skipped file.
	if err := cmd(runPublish, "--dir", repoDir, tree); err != nil {
		t.Fatal(err)
	}
	if strings.Count(out.String(), "(published before)") != 3 || !strings.Contains(out.String(), "contains the fix") || !strings.Contains(errOut.String(), "summary.json") {
		t.Fatalf("publish again:\n%s%s", out.String(), errOut.String())
	}
	// One record on its own.
	one := filepath.Join(dir, "one"+contract.ContainedSuffix)
	rec := buildout.Contained(fix, buildout.Kernel{Release: "6.1.0-56-amd64", BuildID: "5656565656565656"})
	b, _ := json.Marshal(rec)
	os.WriteFile(one, b, 0o644)
	if err := cmd(runPublish, "--dir", repoDir, one); err != nil || !strings.Contains(out.String(), "6.1.0-56-amd64 contains stitch_cmdline") {
		t.Fatalf("publish one record: %v %s", err, out.String())
	}
	rec.Checked = "last week"
	b, _ = json.Marshal(rec)
	os.WriteFile(one, b, 0o644)
	if err := cmd(runPublish, "--dir", repoDir, one); exitCode(err) != exitUsage || !strings.Contains(err.Error(), "checked") {
		t.Fatalf("a bad record: %v (exit %d)", err, exitCode(err))
	}

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
	for _, r := range []string{k47.Release, k53.Release} {
		if err := cmd(runRollout, "start", targets[r], srv); err != nil {
			t.Fatal(err)
		}
	}
	if err := cmd(runFleet, "key", "--max-machines", "10", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var key api.KeyResponse
	json.Unmarshal(out.Bytes(), &key)
	// 2 machines on -47 (one applied its patch), 1 on -53, 3 on -57, 1 on -50.
	for _, m := range []struct {
		k       buildout.Kernel
		applied bool
	}{{k47, true}, {k47, false}, {k53, false}, {k57, false}, {k57, false}, {k57, false}, {k50, false}} {
		c := &api.Client{BaseURL: hs.URL}
		e, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "h"})
		if err != nil {
			t.Fatal(err)
		}
		c.Token = e.Token
		var held []api.PatchState
		if m.applied {
			held = []api.PatchState{{Target: targets[m.k.Release], Name: fix.Name, State: contract.StateApplied}}
		}
		if _, err := c.CheckIn(ctx, api.CheckIn{KernelRelease: m.k.Release, KernelBuildID: m.k.BuildID, Patches: held}); err != nil {
			t.Fatal(err)
		}
	}

	if err := cmd(runFleet, "patches", srv); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, want := range []string{
		"stitch_cmdline  0123456789ab  CVE-2026-1111  6.1.0-47-amd64  474747474747  patch (running)   2         1",
		"                                             6.1.0-53-amd64  535353535353  patch (running)   1         0",
		"                                             6.1.0-56-amd64  565656565656  contains the fix  0         -",
		"                                             6.1.0-57-amd64  575757575757  contains the fix  3         -",
		"                                             6.1.0-50-amd64  505050505050  NOT COVERED       1         -",
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("fleet patches lacks %q:\n%s", want, text)
		}
	}
	if err := cmd(runFleet, "patches", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var pr struct {
		Patches []api.PatchReport
		Fixes   []api.FixReport
	}
	if err := json.Unmarshal(out.Bytes(), &pr); err != nil || len(pr.Patches) != 2 || len(pr.Fixes) != 1 {
		t.Fatalf("fleet patches --json: %v %s", err, out.String())
	}
	if f := pr.Fixes[0]; f.PatchedMachines != 3 || f.AppliedMachines != 1 || f.ContainedMachines != 3 || f.NotCoveredMachines != 1 {
		t.Errorf("fix machines: patched %d, applied %d, contained %d, not covered %d; want 3 1 3 1", f.PatchedMachines, f.AppliedMachines, f.ContainedMachines, f.NotCoveredMachines)
	}

	if err := cmd(runFleet, "cves", srv); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"CVE-2026-1111  4 (3 by source)  2        1            ",
		"CVE-2026-1111 not covered on 6.1.0-50-amd64 (1 machine)\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("fleet cves lacks %q:\n%s", want, out.String())
		}
	}
	if err := cmd(runFleet, "cves", "--json", srv); err != nil {
		t.Fatal(err)
	}
	var cves []api.CVEReport
	if err := json.Unmarshal(out.Bytes(), &cves); err != nil || len(cves) != 1 || cves[0].Fixed != 4 || cves[0].ContainedMachines != 3 || len(cves[0].Exposed) != 2 || cves[0].NotCoveredMachines != 1 {
		t.Fatalf("fleet cves --json: %v %s", err, out.String())
	}
}
