package bundle

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// makeLegacy turns a repository into what Stitch made before consistent
// snapshots: root version 1 without consistent_snapshot, no versioned
// snapshot or targets files, no hash-prefixed bundles.
func makeLegacy(t *testing.T, r *Repo) {
	t.Helper()
	root, err := metadata.Root().FromFile(r.metaPath("root.json"))
	if err != nil {
		t.Fatal(err)
	}
	root.Signed.ConsistentSnapshot = false
	priv, err := r.loadKey("root")
	if err != nil {
		t.Fatal(err)
	}
	s, _ := signature.LoadED25519Signer(priv)
	root.ClearSignatures()
	if _, err := root.Sign(s); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"1.root.json", "root.json"} {
		if err := root.ToFile(r.metaPath(n), true); err != nil {
			t.Fatal(err)
		}
	}
	versioned := regexp.MustCompile(`^[0-9]+\.(snapshot|targets)\.json$`)
	entries, _ := os.ReadDir(r.MetadataDir())
	for _, e := range entries {
		if versioned.MatchString(e.Name()) {
			os.Remove(r.metaPath(e.Name()))
		}
	}
	prefixed := regexp.MustCompile(`^[0-9a-f]{64}\.`)
	filepath.WalkDir(r.TargetsDir(), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && prefixed.MatchString(d.Name()) {
			os.Remove(p)
		}
		return nil
	})
}

// TestLegacyRepositoryKeepsWorkingThenMigrates: a repository made before
// consistent snapshots serves agents as before, the refresher warns, and
// `stitch repo refresh` with the root key switches it (root version 2,
// hash-prefixed bundles) without losing an agent.
func TestLegacyRepositoryKeepsWorkingThenMigrates(t *testing.T) {
	f := newFixture(t)
	one := f.publish(t, "module one")
	makeLegacy(t, f.repo)
	root, _ := f.repo.TrustedRoot()
	agent := *f.client
	agent.TrustedRoot, agent.CacheDir = root, t.TempDir()
	if _, _, err := agent.Fetch(context.Background(), one); err != nil {
		t.Fatalf("legacy repository: %v", err)
	}
	fr, err := f.repo.RefreshIfDue()
	if err != nil {
		t.Fatal(err)
	}
	if len(fr.Warnings) != 1 || fr.Warnings[0].Role != "layout" {
		t.Fatalf("warnings on a legacy repository: %+v", fr.Warnings)
	}
	two := f.publish(t, "module two")
	if _, _, err := agent.Fetch(context.Background(), two); err != nil {
		t.Fatalf("publish into a legacy repository: %v", err)
	}
	if err := f.repo.Refresh(); err != nil {
		t.Fatal(err)
	}
	st, err := f.repo.Status()
	if err != nil {
		t.Fatal(err)
	}
	if !st.ConsistentSnapshot || st.Roles["root"].Version != 2 {
		t.Fatalf("after refresh with the root key: %+v", st)
	}
	fresh := agent
	fresh.CacheDir = t.TempDir()
	for _, c := range []*Client{&agent, &fresh} {
		for _, name := range []string{one, two} {
			if _, _, err := c.Fetch(context.Background(), name); err != nil {
				t.Fatalf("after the switch, %s: %v", name, err)
			}
		}
	}
	if fr, err := f.repo.RefreshIfDue(); err != nil || len(fr.Warnings) != 0 {
		t.Fatalf("after the switch: %v %+v", err, fr.Warnings)
	}
}
