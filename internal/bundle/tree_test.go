package bundle

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/testutils/buildout"
)

var (
	treeFix = buildout.Fix{Name: "stitch_cmdline", CVEs: []string{"CVE-2026-1111"}, Upstream: "0123456789abcdef0123456789abcdef01234567"}
	k47     = buildout.Kernel{Release: "6.1.0-47-amd64", BuildID: "4747474747474747474747474747474747474747"}
	k53     = buildout.Kernel{Release: "6.1.0-53-amd64", BuildID: "5353535353535353535353535353535353535353"}
	k57     = buildout.Kernel{Release: "6.1.0-57-amd64", BuildID: "5757575757575757575757575757575757575757", Contains: true}
)

// A many-kernel build's output: two patches and a contained record are
// read, other files are skipped, and the set publishes as one.
func TestReadTree(t *testing.T) {
	out := buildout.Write(t, t.TempDir(), treeFix, k47, k53, k57)
	os.WriteFile(filepath.Join(out, "summary.json"), []byte(`{"kernels": 3}`), 0o644)
	os.WriteFile(filepath.Join(out, k47.Release, "build.log"), []byte("log"), 0o644)
	tr, err := ReadTree(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"6.1.0-47-amd64/stitch_cmdline.json", "6.1.0-53-amd64/stitch_cmdline.json", "6.1.0-57-amd64/stitch_cmdline.contained.json"}
	if len(tr.Bundles) != 2 || len(tr.Contained) != 1 || !reflect.DeepEqual(tr.Files, want) {
		t.Fatalf("tree: %d bundles, %d records, files %v", len(tr.Bundles), len(tr.Contained), tr.Files)
	}
	if !reflect.DeepEqual(tr.Skipped, []string{"6.1.0-47-amd64/build.log", "summary.json"}) {
		t.Errorf("skipped %v", tr.Skipped)
	}
	if b, err := Open(tr.Bundles[1]); err != nil || b.Manifest.Kernel != (contract.KernelID{Release: k53.Release, BuildID: k53.BuildID}) {
		t.Fatalf("second bundle: %+v %v", b, err)
	}
	r := &Repo{Dir: t.TempDir()}
	if err := r.Init(); err != nil {
		t.Fatal(err)
	}
	pub, err := r.PublishAll(tr.Bundles, tr.Contained)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, p := range pub {
		kinds = append(kinds, p.Kind+" "+p.Release)
	}
	if !reflect.DeepEqual(kinds, []string{"patch 6.1.0-47-amd64", "patch 6.1.0-53-amd64", "contained 6.1.0-57-amd64"}) {
		t.Fatalf("published %v", kinds)
	}

	// A one-kernel build's output directory (-o OUT) is a tree too.
	flat := t.TempDir()
	buildout.Write(t, flat, treeFix, k47)
	for _, f := range []string{"stitch_cmdline.ko", "stitch_cmdline.json"} {
		os.Rename(filepath.Join(flat, k47.Release, f), filepath.Join(flat, f))
	}
	if tr, err := ReadTree(flat); err != nil || len(tr.Bundles) != 1 || tr.Files[0] != "stitch_cmdline.json" {
		t.Fatalf("flat tree: %+v %v", tr, err)
	}
}

// What a tree must not be: each refused as bad input, naming the file.
func TestReadTreeRefuses(t *testing.T) {
	for name, tc := range map[string]struct {
		mutate func(out string)
		want   error
		says   string
	}{
		"module without manifest": {func(out string) { os.Remove(filepath.Join(out, k47.Release, "stitch_cmdline.json")) }, ErrBadBundle, "no manifest"},
		"manifest without module": {func(out string) { os.Remove(filepath.Join(out, k47.Release, "stitch_cmdline.ko")) }, ErrBadBundle, "without its module"},
		"another build's module": {func(out string) {
			os.Rename(filepath.Join(out, k53.Release, "stitch_cmdline.ko"), filepath.Join(out, k47.Release, "stitch_cmdline.ko"))
		}, ErrBadBundle, "module_sha256"},
		"record in another kernel's directory": {func(out string) {
			os.Rename(filepath.Join(out, k57.Release, "stitch_cmdline.contained.json"), filepath.Join(out, k53.Release, "other.contained.json"))
		}, contract.ErrBadContained, "not 6.1.0-53-amd64"},
		"patch and record for one kernel": {func(out string) {
			buildout.Write(t, out, treeFix, buildout.Kernel{Release: k47.Release, BuildID: k47.BuildID, Contains: true})
		}, ErrBadBundle, "not both"},
		"record with an unknown field": {func(out string) {
			p := filepath.Join(out, k57.Release, "stitch_cmdline.contained.json")
			b, _ := os.ReadFile(p)
			os.WriteFile(p, []byte(strings.Replace(string(b), `"name"`, `"patched": true, "name"`, 1)), 0o644)
		}, contract.ErrBadContained, "unknown field"},
		"manifest for another kernel": {func(out string) {
			for _, f := range []string{"stitch_cmdline.ko", "stitch_cmdline.json"} {
				os.Rename(filepath.Join(out, k53.Release, f), filepath.Join(out, k47.Release, f))
			}
		}, contract.ErrBadManifest, "not 6.1.0-47-amd64"},
	} {
		out := buildout.Write(t, t.TempDir(), treeFix, k47, k53, k57)
		tc.mutate(out)
		_, err := ReadTree(out)
		if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want %v saying %q", name, err, tc.want, tc.says)
		}
	}
	if _, err := ReadTree(t.TempDir()); !errors.Is(err, ErrBadBundle) || !strings.Contains(err.Error(), "no module") {
		t.Errorf("empty tree: %v", err)
	}
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o644)
	if _, err := ReadTree(f); !errors.Is(err, ErrBadBundle) {
		t.Errorf("a file as the tree: %v", err)
	}
}
