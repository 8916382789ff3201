package bundle

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fileClient reads a repository from a directory, as an agent set up with
// a file:// mirror does.
func fileClient(t *testing.T, dir string, root []byte, now func() time.Time) *Client {
	tr := &http.Transport{}
	tr.RegisterProtocol("file", http.NewFileTransport(http.Dir("/")))
	return &Client{BaseURL: "file://" + dir, TrustedRoot: root, CacheDir: t.TempDir(), HTTP: &http.Client{Transport: tr}, Now: now}
}

func exportValid(t *testing.T, r *Repo) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := r.ExportValid(&b, DefaultExportValid); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestAirGappedMirrorCycle is the supported cycle: the online side runs
// its refresher and exports (valid a week); the mirror imports. An agent
// on the mirror works until the export's week is over, is refused with a
// clear error past it, and works again once a newer export is imported
// over the old one. An older export is refused (rollback) and leaves the
// mirror as it was.
func TestAirGappedMirrorCycle(t *testing.T) {
	f := newFixture(t)
	one := f.publish(t, "module one")
	root, _ := f.repo.TrustedRoot()
	old := exportValid(t, f.repo)
	// The online repository keeps its day-long timestamp.
	st, err := f.repo.Status()
	if err != nil {
		t.Fatal(err)
	}
	if exp := st.Roles["timestamp"].Expires; exp.After(f.clk.t.Add(DefaultExpiries.Timestamp)) {
		t.Fatalf("online timestamp expires %s after an export: the export's week leaked online", exp)
	}
	if _, _, err := f.client.Fetch(context.Background(), one); err != nil {
		t.Fatalf("online agent after an export: %v", err)
	}
	mirror := &Repo{Dir: filepath.Join(t.TempDir(), "mirror"), Now: f.clk.now}
	if err := mirror.Import(bytes.NewReader(old)); err != nil {
		t.Fatal(err)
	}
	agent := fileClient(t, mirror.Dir, root, f.clk.now)
	if _, _, err := agent.Fetch(context.Background(), one); err != nil {
		t.Fatalf("agent on the mirror: %v", err)
	}
	// Six days on, nobody imported anything (the online side refreshed).
	for range 6 * 4 {
		f.clk.t = f.clk.t.Add(6 * time.Hour)
		if _, err := f.repo.RefreshIfDue(); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := agent.Fetch(context.Background(), one); err != nil {
		t.Fatalf("agent on the mirror after six days: %v", err)
	}
	// Eight days: the export's timestamp has expired.
	f.clk.t = f.clk.t.Add(2 * 24 * time.Hour)
	if _, err := f.repo.RefreshIfDue(); err != nil {
		t.Fatal(err)
	}
	_, _, err = agent.Fetch(context.Background(), one)
	wantVerify(t, err, "a mirror was not updated from a newer export")
	// The online side publishes and exports again; the mirror imports it
	// over the old one.
	two := f.publish(t, "module two")
	newer := exportValid(t, f.repo)
	if err := mirror.Import(bytes.NewReader(newer)); err != nil {
		t.Fatalf("import a newer export over the mirror: %v", err)
	}
	for _, name := range []string{one, two} {
		if _, _, err := agent.Fetch(context.Background(), name); err != nil {
			t.Fatalf("agent on the updated mirror, %s: %v", name, err)
		}
	}
	// The old export again: rollback, refused, the mirror unchanged.
	before, _ := os.ReadFile(filepath.Join(mirror.MetadataDir(), "timestamp.json"))
	err = mirror.Import(bytes.NewReader(old))
	if !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), "older than the mirror") {
		t.Fatalf("import of an older export: %v", err)
	}
	after, _ := os.ReadFile(filepath.Join(mirror.MetadataDir(), "timestamp.json"))
	if !bytes.Equal(before, after) {
		t.Fatal("a refused import changed the mirror")
	}
	if _, _, err := agent.Fetch(context.Background(), two); err != nil {
		t.Fatalf("agent after a refused import: %v", err)
	}
	// The same export twice is fine.
	if err := mirror.Import(bytes.NewReader(newer)); err != nil {
		t.Fatalf("the same export again: %v", err)
	}
	// Keys rotated and root renewed online: the mirror follows the chain of
	// roots, and so do its agents.
	if err := f.repo.RotateKey("timestamp"); err != nil {
		t.Fatal(err)
	}
	if err := f.repo.RenewRoot(); err != nil {
		t.Fatal(err)
	}
	if err := mirror.Import(bytes.NewReader(exportValid(t, f.repo))); err != nil {
		t.Fatalf("import after a rotation: %v", err)
	}
	if _, _, err := agent.Fetch(context.Background(), two); err != nil {
		t.Fatalf("agent on the mirror after a rotation: %v", err)
	}
	if st, err := mirror.Status(); err != nil || st.Roles["root"].Version != 3 {
		t.Fatalf("mirror root after a rotation and a renewal: %+v %v", st, err)
	}
	// A new agent that pinned the first root follows the mirror too.
	if _, _, err := fileClient(t, mirror.Dir, root, f.clk.now).Fetch(context.Background(), two); err != nil {
		t.Fatalf("new agent on the mirror: %v", err)
	}
}

// TestImportRefusesStaleAndForeign: an expired export and one of another
// repository are refused before anything is installed.
func TestImportRefusesStaleAndForeign(t *testing.T) {
	f := newFixture(t)
	f.publish(t, "module one")
	var plain bytes.Buffer
	if err := f.repo.Export(&plain); err != nil { // as it is: a day of validity
		t.Fatal(err)
	}
	mirror := &Repo{Dir: filepath.Join(t.TempDir(), "mirror"), Now: func() time.Time { return f.clk.t.Add(2 * 24 * time.Hour) }}
	err := mirror.Import(bytes.NewReader(plain.Bytes()))
	if !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), "stitch repo export") {
		t.Fatalf("import of an expired export: %v", err)
	}
	if _, err := os.Stat(filepath.Join(mirror.MetadataDir(), "timestamp.json")); err == nil {
		t.Fatal("a refused import installed metadata")
	}
	// A mirror of this repository refuses another repository's export.
	mirror.Now = f.clk.now
	if err := mirror.Import(bytes.NewReader(plain.Bytes())); err != nil {
		t.Fatal(err)
	}
	other := &Repo{Dir: t.TempDir(), Now: f.clk.now}
	if err := other.Init(); err != nil {
		t.Fatal(err)
	}
	if err := other.RotateKey("timestamp"); err != nil { // root version 2, so the chain is checked
		t.Fatal(err)
	}
	foreign := exportValid(t, other)
	if err := mirror.Import(bytes.NewReader(foreign)); !errors.Is(err, ErrVerify) {
		t.Fatalf("import of another repository's export: %v", err)
	}
	// An older export that is still valid is refused as a rollback.
	older := exportValid(t, f.repo)
	f.publish(t, "module two")
	if err := mirror.Import(bytes.NewReader(exportValid(t, f.repo))); err != nil {
		t.Fatal(err)
	}
	if err := mirror.Import(bytes.NewReader(older)); !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("import of an older, valid export: %v", err)
	}
	if err := f.repo.ExportValid(&bytes.Buffer{}, MaxExportValid+time.Hour); err == nil {
		t.Fatal("an export valid for more than MaxExportValid was made")
	}
}
