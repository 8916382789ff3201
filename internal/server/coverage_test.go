package server

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/testutils/buildout"
)

// The kernels of the coverage tests: 6.1.0-47 and -53 get patches, -57
// already contains the fix, -50 has nothing, and one machine runs -53 of
// another build (another kernel, as far as patches go).
var (
	cov47  = buildout.Kernel{Release: "6.1.0-47-amd64", BuildID: "4747474747474747474747474747474747474747"}
	cov50  = buildout.Kernel{Release: "6.1.0-50-amd64", BuildID: "5050505050505050505050505050505050505050"}
	cov53  = buildout.Kernel{Release: "6.1.0-53-amd64", BuildID: "5353535353535353535353535353535353535353"}
	cov53b = buildout.Kernel{Release: "6.1.0-53-amd64", BuildID: "53b53b53b53b53b53b53b53b53b53b53b53b53b5"}
	cov57  = buildout.Kernel{Release: "6.1.0-57-amd64", BuildID: "5757575757575757575757575757575757575757", Contains: true}

	// cmdline is the fix the build ported: its 6.1.0-47 backport was
	// built under another name, and is the same fix by its upstream commit.
	cmdline   = buildout.Fix{Name: "stitch_cmdline", CVEs: []string{"CVE-2026-1111"}, Upstream: "0123456789abcdef0123456789abcdef01234567"}
	cmdline47 = buildout.Fix{Name: "stitch_cmdline_47", CVEs: []string{"CVE-2026-1111"}, Upstream: cmdline.Upstream}
	// other is a second fix, built for -53 (registered) and -47
	// (published, never registered: no patch as far as the server knows).
	other = buildout.Fix{Name: "stitch_other", CVEs: []string{"CVE-2026-2222"}}
)

// coverageFleet publishes a many-kernel OUT/ tree into e's repository,
// registers the patches the operator starts, and checks machines in on
// each kernel. It returns the machines' clients by kernel.
func coverageFleet(t *testing.T, e *env) map[string][]*api.Client {
	t.Helper()
	ctx := context.Background()
	out := t.TempDir()
	buildout.Write(t, out, cmdline, cov53, cov57)
	buildout.Write(t, out, cmdline47, cov47)
	buildout.Write(t, out, other, cov53, cov47)
	tree, err := bundle.ReadTree(out)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := e.repo.PublishAll(tree.Bundles, tree.Contained)
	if err != nil {
		t.Fatal(err)
	}
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	targets := map[string]string{} // name@release → target
	for _, p := range pub {
		targets[p.Name+"@"+p.Release] = p.Target
		if p.Kind != bundle.KindPatch || p.Name == other.Name && p.Release == cov47.Release {
			continue
		}
		if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: p.Target}, nil); err != nil {
			t.Fatalf("register %s: %v", p.Target, err)
		}
	}
	// A contained record has no rollout.
	rec := targets[cmdline.Name+"@"+cov57.Release]
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: rec}, nil); !errors.Is(err, api.ErrBadRequest) || !strings.Contains(err.Error(), "contained record") {
		t.Fatalf("registering a contained record: %v", err)
	}

	// Machines by kernel, and how many of them applied the kernel's patch
	// of cmdline.
	fleet := []struct {
		k       buildout.Kernel
		n, took int
		patch   string
	}{
		{cov47, 3, 2, cmdline47.Name}, {cov53, 2, 1, cmdline.Name}, {cov57, 4, 0, ""}, {cov50, 1, 0, ""}, {cov53b, 1, 0, ""},
	}
	byKernel := map[string][]*api.Client{}
	ms := e.enroll(t, 12, "")
	for _, k := range fleet {
		for i := range k.n {
			c := ms[0]
			ms = ms[1:]
			var held []api.PatchState
			if i < k.took {
				held = append(held, api.PatchState{Target: targets[k.patch+"@"+k.k.Release], Name: k.patch, State: contract.StateApplied, Since: time.Now()})
			}
			if _, err := c.CheckIn(ctx, api.CheckIn{KernelRelease: k.k.Release, KernelBuildID: k.k.BuildID, AgentVersion: "t", Patches: held}); err != nil {
				t.Fatal(err)
			}
			byKernel[k.k.Release+"/"+k.k.BuildID] = append(byKernel[k.k.Release+"/"+k.k.BuildID], c)
		}
	}
	// ms[0], the twelfth, never checks in: its kernel is unknown and it
	// counts nowhere.
	return byKernel
}

// kernels is a coverage list as "RELEASE/BUILDID[:4] machines applied".
func kernels(l []api.KernelCoverage) []string {
	var out []string
	for _, k := range l {
		out = append(out, k.Release+"/"+k.BuildID[:4]+" "+strconv.Itoa(k.Machines)+" "+strconv.Itoa(k.Applied))
	}
	return out
}

// TestFleetCoverage: a many-kernel build published whole, the patches
// registered, the contained record learned by the server from its
// repository, and the machines on five kernels reported per fix and per
// CVE, on SQLite and on PostgreSQL.
func TestFleetCoverage(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { testFleetCoverage(t, newEnv(t, func(s *Server) { s.Policy = onePolicy })) })
	t.Run("postgres", func(t *testing.T) {
		testFleetCoverage(t, newEnvOn(t, postgresStore(t, "stitch_coverage"), func(s *Server) { s.Policy = onePolicy }))
	})
}

func testFleetCoverage(t *testing.T, e *env) {
	ctx := context.Background()
	var logs syncBuffer
	e.s.Log = slog.New(slog.NewTextHandler(&logs, nil))
	coverageFleet(t, e)
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}

	fixes, err := admin.Fixes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(fixes) != 2 {
		t.Fatalf("%d fixes, want 2: %+v", len(fixes), fixes)
	}
	c, o := fixes[0], fixes[1]
	if !reflect.DeepEqual(c.Names, []string{"stitch_cmdline", "stitch_cmdline_47"}) || !reflect.DeepEqual(c.Upstream, []string{cmdline.Upstream}) || !reflect.DeepEqual(c.CVEs, cmdline.CVEs) {
		t.Errorf("fix identity: names %v, upstream %v, cves %v", c.Names, c.Upstream, c.CVEs)
	}
	for name, tc := range map[string]struct{ got, want []string }{
		"cmdline patched":     {kernels(c.Patched), []string{"6.1.0-47-amd64/4747 3 2", "6.1.0-53-amd64/5353 2 1"}},
		"cmdline contained":   {kernels(c.Contained), []string{"6.1.0-57-amd64/5757 4 0"}},
		"cmdline not covered": {kernels(c.NotCovered), []string{"6.1.0-50-amd64/5050 1 0", "6.1.0-53-amd64/53b5 1 0"}},
		"other patched":       {kernels(o.Patched), []string{"6.1.0-53-amd64/5353 2 0"}},
		// -47's build of other was published, never registered.
		"other not covered": {kernels(o.NotCovered), []string{"6.1.0-47-amd64/4747 3 0", "6.1.0-50-amd64/5050 1 0", "6.1.0-53-amd64/53b5 1 0", "6.1.0-57-amd64/5757 4 0"}},
	} {
		if !reflect.DeepEqual(tc.got, tc.want) {
			t.Errorf("%s: %q, want %q", name, tc.got, tc.want)
		}
	}
	if got := [4]int{c.PatchedMachines, c.AppliedMachines, c.ContainedMachines, c.NotCoveredMachines}; got != [4]int{5, 3, 4, 2} {
		t.Errorf("cmdline machines (patched, applied, contained, not covered) %v, want [5 3 4 2]", got)
	}
	if got := [4]int{o.PatchedMachines, o.AppliedMachines, o.ContainedMachines, o.NotCoveredMachines}; got != [4]int{2, 0, 0, 9} {
		t.Errorf("other machines (patched, applied, contained, not covered) %v, want [2 0 0 9]", got)
	}
	if len(c.Contained) == 1 && (len(c.Contained[0].Records) != 1 || !strings.HasPrefix(c.Contained[0].Records[0], "contained/6.1.0-57-amd64/stitch_cmdline-")) {
		t.Errorf("contained record %v", c.Contained[0].Records)
	}
	if len(c.Patched) == 2 && (len(c.Patched[0].Patches) != 1 || c.Patched[0].Patches[0].State != "running") {
		t.Errorf("patch of -47: %+v", c.Patched[0].Patches)
	}

	// The CVE view counts the machines whose kernel contains the fix as
	// fixed, and the kernels with neither as not covered.
	var cves []api.CVEReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/cves", nil, &cves); err != nil {
		t.Fatal(err)
	}
	if len(cves) != 2 {
		t.Fatalf("cve report %+v", cves)
	}
	a, b := cves[0], cves[1]
	if a.CVE != "CVE-2026-1111" || a.Fixed != 7 || a.ContainedMachines != 4 || len(a.Exposed) != 2 || a.NotCoveredMachines != 2 || len(a.NotCoveredKernels) != 2 || len(a.Patches) != 2 || len(a.Records) != 1 {
		t.Errorf("%s: fixed %d (%d contained), exposed %d, not covered %d on %v, patches %v, records %v",
			a.CVE, a.Fixed, a.ContainedMachines, len(a.Exposed), a.NotCoveredMachines, kernels(a.NotCoveredKernels), a.Patches, a.Records)
	}
	if b.CVE != "CVE-2026-2222" || b.Fixed != 0 || len(b.Exposed) != 2 || b.NotCoveredMachines != 9 || len(b.NotCoveredKernels) != 4 || len(b.Records) != 0 {
		t.Errorf("%s: fixed %d, exposed %d, not covered %d on %v", b.CVE, b.Fixed, len(b.Exposed), b.NotCoveredMachines, kernels(b.NotCoveredKernels))
	}
	// And so does each machine's own line.
	var mr []api.MachineReport
	if err := admin.Do(ctx, "GET", "/v1/admin/reports/machines", nil, &mr); err != nil {
		t.Fatal(err)
	}
	fixed57 := 0
	for _, m := range mr {
		if m.KernelRelease == cov57.Release && reflect.DeepEqual(m.FixedCVEs, cmdline.CVEs) && len(m.Applied) == 0 {
			fixed57++
		}
	}
	if fixed57 != 4 {
		t.Errorf("%d machines on -57 list CVE-2026-1111 fixed, want 4", fixed57)
	}
	// The record was learned once, however many reports read it.
	if n := strings.Count(logs.String(), "contained record learned"); n != 1 {
		t.Errorf("record learned %d times:\n%s", n, logs.String())
	}
	cs, err := e.st.Contained(ctx)
	if err != nil || len(cs) != 1 || cs[0].KernelBuildID != cov57.BuildID || !reflect.DeepEqual(cs[0].Upstream, []string{cmdline.Upstream}) {
		t.Errorf("stored records %+v %v", cs, err)
	}
}

// A record that does not verify against the signed metadata does not
// count: its kernel's machines stay not covered, and the refusal is
// logged once.
func TestTamperedContainedRecordDoesNotCount(t *testing.T) {
	e := newEnv(t)
	var logs syncBuffer
	e.s.Log = slog.New(slog.NewTextHandler(&logs, nil))
	out := buildout.Write(t, t.TempDir(), cmdline, cov53, cov57)
	tree, err := bundle.ReadTree(out)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := e.repo.PublishAll(tree.Bundles, tree.Contained)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(e.repo.TargetsDir(), filepath.FromSlash(pub[1].Target))
	data, _ := os.ReadFile(p)
	// Another kernel now claims the fix: the bytes no longer match.
	forged := bytes.Replace(data, []byte(cov57.BuildID), []byte(cov50.BuildID), 1)
	os.Remove(p) // a new file: the hash-prefixed link keeps the signed bytes
	if err := os.WriteFile(p, forged, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	c := e.enroll(t, 1, "")[0]
	if _, err := c.CheckIn(ctx, api.CheckIn{KernelRelease: cov50.Release, KernelBuildID: cov50.BuildID}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		fixes, err := admin.Fixes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(fixes) != 0 {
			t.Fatalf("a forged record made a fix: %+v", fixes)
		}
	}
	if n := strings.Count(logs.String(), "contained record refused"); n != 1 || !strings.Contains(logs.String(), "verification refused") {
		t.Errorf("refusal logged %d times:\n%s", n, logs.String())
	}
	if cs, _ := e.st.Contained(ctx); len(cs) != 0 {
		t.Errorf("forged record stored: %+v", cs)
	}
}

// syncBuffer is a log sink the server's goroutines may share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
