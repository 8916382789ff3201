package agent_test

import (
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// fleet is a real patch server (SQLite, loopback HTTP) with its TUF
// repository.
type fleet struct {
	t     testing.TB
	srv   *httptest.Server
	repo  *bundle.Repo
	admin *api.Client
}

// policy rolls out to everyone at once (one stage of 100%) and wants
// health checks at the given times after an apply.
func policy(checks ...time.Duration) rollout.Policy {
	return rollout.Policy{Stages: []float64{1}, Checks: checks, MaxFailures: rollout.DefaultPolicy.MaxFailures, MaxRate: rollout.DefaultPolicy.MaxRate}
}

// newFleet starts a fleet with a fast health-check schedule, which its
// agents learn from the check-in answers.
func newFleet(t testing.TB) *fleet {
	return newFleetWith(t, policy(40*time.Millisecond, 80*time.Millisecond, 120*time.Millisecond))
}

func newFleetWith(t testing.TB, pol rollout.Policy) *fleet {
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
	const token = "admin-token-for-tests"
	s := &server.Server{Store: st, Repo: repo, AdminToken: token, Policy: pol, CheckInEvery: time.Minute,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(srv.Close)
	f := &fleet{t: t, srv: srv, repo: repo, admin: &api.Client{BaseURL: srv.URL, Token: token}}
	// Machines join the default group, on the main channel a day behind
	// canary; the tests want patches at once.
	if err := f.admin.Do(context.Background(), "PUT", "/v1/admin/groups/default", api.Group{Name: "default", Channel: "canary"}, nil); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fleet) root() []byte {
	f.t.Helper()
	b, err := f.repo.TrustedRoot()
	if err != nil {
		f.t.Fatal(err)
	}
	return b
}

func (f *fleet) key() string {
	f.t.Helper()
	var k api.KeyResponse
	if err := f.admin.Do(context.Background(), "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: 10}, &k); err != nil {
		f.t.Fatal(err)
	}
	return k.Key
}

// publish packs, publishes and registers a bundle, starting its rollout.
func (f *fleet) publish(m contract.Manifest, module []byte) string {
	f.t.Helper()
	data, err := bundle.Pack(m, module)
	if err != nil {
		f.t.Fatal(err)
	}
	target, err := f.repo.Publish(data)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := f.admin.Do(context.Background(), "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		f.t.Fatal(err)
	}
	return target
}

// operate halts, resumes or blocklists a patch's rollout.
func (f *fleet) operate(target, op string) {
	f.t.Helper()
	if err := f.admin.Do(context.Background(), "POST", "/v1/admin/rollouts/"+target+"/"+op, api.RolloutRequest{Reason: "test"}, nil); err != nil {
		f.t.Fatal(err)
	}
}

// patch reads one patch's rollout report.
func (f *fleet) patch(target string) api.PatchReport {
	f.t.Helper()
	var ps []api.PatchReport
	if err := f.admin.Do(context.Background(), "GET", "/v1/admin/reports/patches", nil, &ps); err != nil {
		f.t.Fatal(err)
	}
	for _, p := range ps {
		if p.Target == target {
			return p
		}
	}
	f.t.Fatalf("no patch %s on the server", target)
	return api.PatchReport{}
}

// manifest is a valid manifest for a module patching one vmlinux
// function of the kernel release/buildID.
func manifest(name, release, buildID string, cves ...string) contract.Manifest {
	return contract.Manifest{
		Version: contract.ManifestVersion, Name: name, Module: name + ".ko",
		Kernel: contract.KernelID{Release: release, BuildID: buildID}, CVEs: cves,
		Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{
			Name: "cmdline_proc_show", Fingerprint: fingerprint.Fingerprint{Size: 16, SHA256: strings.Repeat("ab", 32)},
		}}}},
	}
}
