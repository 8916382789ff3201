package bundle

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// testContained is a record that testManifest's fix is in the source of
// another kernel, 6.1.0-57.
func testContained() *contract.Contained {
	return &contract.Contained{
		Version: contract.ManifestVersion, Name: "stitch_fix_1",
		Kernel:  contract.KernelID{Release: "6.1.0-57-amd64", BuildID: "fedcba9876543210fedcba9876543210fedcba98"},
		CVEs:    []string{"CVE-2024-1234"},
		Fixes:   []contract.Fix{{Name: "fix_1.patch", Hash: strings.Repeat("cd", 32), Files: []string{"fs/exec.c"}, Upstream: "0123456789abcdef0123456789abcdef01234567"}},
		Checked: "2026-01-01T00:00:00Z",
	}
}

// bundleFor is a bundle of testManifest's patch built for release.
func bundleFor(t *testing.T, release, buildID string) []byte {
	t.Helper()
	m := testManifest()
	m.Kernel = contract.KernelID{Release: release, BuildID: buildID}
	b, err := Pack(m, testutils.StandInModule(t, m.Name, release, ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Bundles for two kernels and a contained record for a third go out in one
// targets version, a server-side reader and an agent's client both read
// the record verified, and publishing the same set again changes nothing.
func TestPublishAllWithContained(t *testing.T) {
	f := newFixture(t)
	before, err := f.repo.Status()
	if err != nil {
		t.Fatal(err)
	}
	set := [][]byte{bundleFor(t, "6.1.0-47-amd64", "4747474747474747"), bundleFor(t, "6.1.0-53-amd64", "5353535353535353")}
	out, err := f.repo.PublishAll(set, []*contract.Contained{testContained()})
	if err != nil {
		t.Fatal(err)
	}
	after, _ := f.repo.Status()
	if len(out) != 3 || after.Targets != 3 || after.Roles["targets"].Version != before.Roles["targets"].Version+1 {
		t.Fatalf("published %+v: %d targets, targets version %d after %d (want one new version for the set)",
			out, after.Targets, after.Roles["targets"].Version, before.Roles["targets"].Version)
	}
	rec := out[2]
	if rec.Kind != KindContained || !rec.New || !strings.HasPrefix(rec.Target, "contained/6.1.0-57-amd64/stitch_fix_1-") || out[0].Kind != KindPatch {
		t.Fatalf("published %+v", out)
	}
	names, err := f.repo.ContainedTargets()
	if err != nil || len(names) != 1 || names[0] != rec.Target {
		t.Fatalf("contained targets %v %v", names, err)
	}
	c, err := f.repo.OpenContained(rec.Target)
	if err != nil || c.Kernel.BuildID != testContained().Kernel.BuildID || c.Fixes[0].Upstream == "" {
		t.Fatalf("open %s: %+v %v", rec.Target, c, err)
	}
	// An agent that asks for a bundle gets none under a record's name.
	if _, _, err := f.client.Fetch(context.Background(), rec.Target); !errors.Is(err, ErrBadBundle) {
		t.Fatalf("a record fetched as a bundle: %v", err)
	}

	again, err := f.repo.PublishAll(set, []*contract.Contained{testContained()})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := f.repo.Status(); st.Roles["targets"].Version != after.Roles["targets"].Version || again[2].New || again[2].Target != rec.Target {
		t.Fatalf("the same set again signed a new version or changed names: %+v", again)
	}
}

// One bad input refuses the whole set: the repository is as it was.
func TestPublishAllIsAllOrNothing(t *testing.T) {
	f := newFixture(t)
	before, _ := f.repo.Status()
	bad := testContained()
	bad.Kernel.BuildID = "not hex"
	_, err := f.repo.PublishAll([][]byte{bundleFor(t, "6.1.0-47-amd64", "4747474747474747")}, []*contract.Contained{bad})
	if !errors.Is(err, contract.ErrBadContained) {
		t.Fatalf("a bad record: %v", err)
	}
	_, err = f.repo.PublishAll([][]byte{[]byte("not a bundle")}, []*contract.Contained{testContained()})
	if !errors.Is(err, ErrBadBundle) {
		t.Fatalf("a bad bundle: %v", err)
	}
	if _, err := f.repo.PublishAll(nil, nil); !errors.Is(err, ErrBadBundle) {
		t.Fatalf("nothing: %v", err)
	}
	after, _ := f.repo.Status()
	if after.Targets != 0 || after.Roles["targets"].Version != before.Roles["targets"].Version {
		t.Fatalf("refused sets changed the repository: %+v", after)
	}
	entries, _ := os.ReadDir(f.repo.TargetsDir())
	if len(entries) != 0 {
		t.Fatalf("refused sets left files in targets/: %v", entries)
	}
}

// A record is trusted only as signed: a tampered file, or a valid record
// put under another record's signed name, is refused.
func TestContainedRecordTamperRefused(t *testing.T) {
	f := newFixture(t)
	name, err := publishContained(f.repo, testContained())
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(f.repo.TargetsDir(), filepath.FromSlash(name))
	data, _ := os.ReadFile(p)
	// Claim another kernel contains the fix: the bytes no longer match.
	forged := bytes.Replace(data, []byte("6.1.0-57-amd64"), []byte("6.1.0-47-amd64"), 1)
	if err := os.WriteFile(p, forged, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := f.repo.OpenContained(name); !errors.Is(err, ErrVerify) {
		t.Fatalf("tampered record opened by the server: %v", err)
	}
	// A record signed under a name that is not its own.
	other := testContained()
	other.Checked = "2026-02-01T00:00:00Z"
	odata, _ := EncodeContained(other)
	if _, err := openContained(name, odata); !errors.Is(err, ErrBadBundle) {
		t.Fatalf("a record under another's name: %v", err)
	}
	if _, err := f.repo.OpenContained("6.1.0-57-amd64/stitch_fix_1-0123456789abcdef.stitch"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a bundle's name opened as a record: %v", err)
	}
}

// Mirrors carry records with the bundles.
func TestContainedRecordsReachMirrors(t *testing.T) {
	f := newFixture(t)
	name, err := publishContained(f.repo, testContained())
	if err != nil {
		t.Fatal(err)
	}
	mirror := &Repo{Dir: t.TempDir(), Now: f.clk.now}
	if err := mirror.Import(bytes.NewReader(exportValid(t, f.repo))); err != nil {
		t.Fatal(err)
	}
	if c, err := mirror.OpenContained(name); err != nil || c.Kernel.Release != "6.1.0-57-amd64" {
		t.Fatalf("record on the mirror: %+v %v", c, err)
	}
}

// publishContained publishes one record and returns its target name.
func publishContained(r *Repo, c *contract.Contained) (string, error) {
	out, err := r.PublishAll(nil, []*contract.Contained{c})
	if err != nil {
		return "", err
	}
	return out[0].Target, nil
}
