package bundle

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// testManifest is a complete manifest such as stitch build writes; the
// module hash is left for Pack to fill.
func testManifest() contract.Manifest {
	return contract.Manifest{
		Version: contract.ManifestVersion, Name: "stitch_fix_1", Module: "stitch_fix_1.ko",
		Kernel: contract.KernelID{Release: "6.1.0-28-amd64", BuildID: "0123456789abcdef0123456789abcdef01234567"},
		Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{
			Name: "load_misc_binary", Fingerprint: fingerprint.Fingerprint{Size: 64, SHA256: strings.Repeat("ab", 32)},
		}}}},
		CVEs: []string{"CVE-2024-1234"}, Description: "test fix",
	}
}

// testModule is a stand-in module for testManifest, told apart by ballast.
func testModule(t testing.TB, ballast string) []byte {
	t.Helper()
	m := testManifest()
	return testutils.StandInModule(t, m.Name, m.Kernel.Release, ballast)
}

func testBundle(t testing.TB, ballast string) []byte {
	t.Helper()
	b, err := Pack(testManifest(), testModule(t, ballast))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestPackOpenRoundTrip(t *testing.T) {
	data := testBundle(t, "\x7fELF module bytes")
	again := testBundle(t, "\x7fELF module bytes")
	if !bytes.Equal(data, again) {
		t.Fatal("Pack is not deterministic: same inputs gave different bytes, so the content address would change")
	}
	b, err := Open(data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.Module, testModule(t, "\x7fELF module bytes")) || b.Manifest.ModuleHash != SHA256Hex(b.Module) {
		t.Fatalf("round trip lost data: %+v", b.Manifest)
	}
	name := TargetName(&b.Manifest, data)
	if !strings.HasPrefix(name, "6.1.0-28-amd64/stitch_fix_1-") {
		t.Fatalf("target name %q", name)
	}
}

func TestOpenRefusesBadBundles(t *testing.T) {
	good := testBundle(t, "module")
	// Flip one byte of the module (the last 'e' of "module" in the tar body).
	i := bytes.LastIndex(good, []byte("module"))
	tampered := bytes.Clone(good)
	tampered[i+5] ^= 1
	for name, data := range map[string][]byte{
		"empty": nil, "garbage": []byte("not a tar"), "truncated": good[:600], "tampered module": tampered,
	} {
		_, err := Open(data)
		if !errors.Is(err, ErrBadBundle) && !errors.Is(err, contract.ErrBadManifest) {
			t.Errorf("%s: got %v, want ErrBadBundle", name, err)
		}
	}
	if _, err := Open(tampered); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("tampered module error should name the hash mismatch: %v", err)
	}
}

func TestPackRefusesBadManifests(t *testing.T) {
	other := testManifest()
	other.ModuleHash = SHA256Hex([]byte("another build's module"))
	if _, err := Pack(other, testModule(t, "module")); !errors.Is(err, ErrBadBundle) || !strings.Contains(err.Error(), "module_sha256") {
		t.Errorf("manifest of another module: %v", err)
	}
	bad := testManifest()
	bad.Kernel.BuildID = "xyz"
	if _, err := Pack(bad, testModule(t, "module")); !errors.Is(err, contract.ErrBadManifest) {
		t.Errorf("bad build-id: %v", err)
	}
	// A bundle whose manifest has an unknown field is refused on Open.
	data := testBundle(t, "module")
	i := bytes.Index(data, []byte(`"name"`))
	tampered := bytes.Clone(data)
	copy(tampered[i:], `"typo"`)
	if _, err := Open(tampered); !errors.Is(err, contract.ErrBadManifest) {
		t.Errorf("unknown manifest field: %v", err)
	}
}

// A bundle's module must be what its manifest says: a livepatch module,
// for the manifest's kernel, by the manifest's name. Each is refused by
// Pack (stitch publish --module --manifest) and by Open (a bundle file,
// and every fetch), naming the disagreement.
func TestModuleMustMatchManifest(t *testing.T) {
	m := testManifest()
	for name, c := range map[string]struct {
		module []byte
		want   string
	}{
		"not a livepatch": {testutils.StandInPlainModule(t, m.Name, m.Kernel.Release), "livepatch=Y"},
		"other kernel":    {testutils.StandInModule(t, m.Name, "6.1.0-27-amd64", ""), "vermagic names 6.1.0-27-amd64"},
		"other name":      {testutils.StandInModule(t, "stitch_other", m.Kernel.Release, ""), "calls itself stitch_other"},
		"not a module":    {[]byte("\x7fELF but no module"), "module.ko"},
	} {
		if _, err := Pack(m, c.module); !errors.Is(err, ErrBadBundle) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Pack, %s: %v, want ErrBadBundle naming %q", name, err, c.want)
		}
		// The same module in a bundle packed by hand: Open refuses it.
		mm := m
		mm.ModuleHash = SHA256Hex(c.module)
		mj, _ := json.Marshal(&mm)
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, e := range []struct {
			name string
			data []byte
		}{{"manifest.json", mj}, {"module.ko", c.module}} {
			tw.WriteHeader(&tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.data)), Typeflag: tar.TypeReg})
			tw.Write(e.data)
		}
		tw.Close()
		if _, err := Open(buf.Bytes()); !errors.Is(err, ErrBadBundle) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Open, %s: %v, want ErrBadBundle naming %q", name, err, c.want)
		}
	}
}

func FuzzOpen(f *testing.F) {
	f.Add(testBundle(f, "module"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := Open(data)
		if err == nil && SHA256Hex(b.Module) != b.Manifest.ModuleHash {
			t.Fatal("Open accepted a module whose hash does not match")
		}
	})
}

// clock is a settable time for repo and client.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// fixture: a repository served over loopback HTTP, a client with its
// own cache, and a clock both share.
type fixture struct {
	repo   *Repo
	client *Client
	clk    *clock
	srv    *httptest.Server
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	clk := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	repo := &Repo{Dir: t.TempDir(), Now: clk.now}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metadata/", http.StripPrefix("/metadata/", http.FileServer(http.Dir(repo.MetadataDir()))))
	mux.Handle("/targets/", http.StripPrefix("/targets/", http.FileServer(http.Dir(repo.TargetsDir()))))
	srv := httptest.NewUnstartedServer(mux)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	root, err := repo.TrustedRoot()
	if err != nil {
		t.Fatal(err)
	}
	c := &Client{BaseURL: srv.URL, TrustedRoot: root, CacheDir: t.TempDir(), HTTP: srv.Client(), Now: clk.now}
	return &fixture{repo: repo, client: c, clk: clk, srv: srv}
}

func (f *fixture) publish(t *testing.T, module string) string {
	t.Helper()
	name, err := f.repo.Publish(testBundle(t, module))
	if err != nil {
		t.Fatal(err)
	}
	return name
}

func TestFetchVerified(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	b, path, err := f.client.Fetch(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b.Module, []byte("module one")) {
		t.Fatalf("module %q", b.Module)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("not cached: %v", err)
	}
	if _, _, err := f.client.Fetch(context.Background(), "6.1.0-28-amd64/nope.stitch"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown target: %v", err)
	}
}

func wantVerify(t *testing.T, err error, hint string) {
	t.Helper()
	if !errors.Is(err, ErrVerify) {
		t.Fatalf("got %v, want ErrVerify", err)
	}
	if !strings.Contains(err.Error(), hint) {
		t.Fatalf("error %q does not say %q", err, hint)
	}
}

func TestTamperedBundleRefused(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	p := filepath.Join(f.repo.TargetsDir(), name)
	data, _ := os.ReadFile(p)
	i := bytes.LastIndex(data, []byte("module one"))
	data[i] = 'M'
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err := f.client.Fetch(context.Background(), name)
	wantVerify(t, err, "tampered")
}

func TestTamperedMetadataRefused(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	// An attacker points the signed target at other content without the
	// key, in the targets version that clients fetch.
	st, err := f.repo.Status()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(f.repo.MetadataDir(), fmt.Sprintf("%d.targets.json", st.Roles["targets"].Version))
	data, _ := os.ReadFile(p)
	data = bytes.Replace(data, []byte(`"length": `), []byte(`"length": 1`), 1)
	os.WriteFile(p, data, 0o644)
	_, _, err = f.client.Fetch(context.Background(), name)
	if !errors.Is(err, ErrVerify) {
		t.Fatalf("got %v, want ErrVerify", err)
	}
}

func TestExpiredMetadataRefused(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	f.clk.t = f.clk.t.Add(DefaultExpiries.Timestamp + time.Hour) // nobody ran refresh
	_, _, err := f.client.Fetch(context.Background(), name)
	wantVerify(t, err, "expired")
	// After a refresh the repository is good again.
	if err := f.repo.Refresh(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatalf("after refresh: %v", err)
	}
}

func TestRollbackRefused(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	old := map[string][]byte{}
	for _, m := range []string{"timestamp.json", "snapshot.json", "targets.json"} {
		old[m], _ = os.ReadFile(filepath.Join(f.repo.MetadataDir(), m))
	}
	f.publish(t, "module two")
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	// The server (or a mirror) now serves the older, validly signed set.
	for m, b := range old {
		os.WriteFile(filepath.Join(f.repo.MetadataDir(), m), b, 0o644)
	}
	_, _, err := f.client.Fetch(context.Background(), name)
	wantVerify(t, err, "rollback")
}

func TestWrongKeyRefused(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	// Another repository's timestamp key: the repository refuses to sign
	// with a key its root does not list, naming the problem...
	other := &Repo{Dir: t.TempDir(), Now: f.clk.now}
	if err := other.Init(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(other.KeyPath("timestamp"), f.repo.KeyPath("timestamp")); err != nil {
		t.Fatal(err)
	}
	if err := f.repo.Refresh(); err == nil || !strings.Contains(err.Error(), "not the timestamp key that root.json") {
		t.Fatalf("refresh with a foreign key: %v", err)
	}
	// ... and a client refuses a timestamp such a key signed.
	ts, err := metadata.Timestamp().FromFile(filepath.Join(f.repo.MetadataDir(), "timestamp.json"))
	if err != nil {
		t.Fatal(err)
	}
	priv, err := f.repo.loadKey("timestamp")
	if err != nil {
		t.Fatal(err)
	}
	s, _ := signature.LoadED25519Signer(priv)
	ts.Signed.Version++
	ts.ClearSignatures()
	if _, err := ts.Sign(s); err != nil {
		t.Fatal(err)
	}
	if err := ts.ToFile(filepath.Join(f.repo.MetadataDir(), "timestamp.json"), true); err != nil {
		t.Fatal(err)
	}
	_, _, err = f.client.Fetch(context.Background(), name)
	wantVerify(t, err, "signature")
}

func TestKeyRotation(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	for _, role := range Roles {
		if err := f.repo.RotateKey(role); err != nil {
			t.Fatalf("rotate %s: %v", role, err)
		}
		// A client that pinned the first root follows the chain of roots.
		if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
			t.Fatalf("after rotating %s: %v", role, err)
		}
	}
	fresh := *f.client
	fresh.CacheDir = t.TempDir()
	if _, _, err := fresh.Fetch(context.Background(), name); err != nil {
		t.Fatalf("new client after rotations: %v", err)
	}
	if err := f.repo.RotateKey("nobody"); err == nil {
		t.Fatal("unknown role accepted")
	}
}

func TestExportImport(t *testing.T) {
	f := newFixture(t)
	name := f.publish(t, "module one")
	var buf bytes.Buffer
	if err := f.repo.Export(&buf); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(buf.Bytes(), []byte("keys/")) {
		t.Fatal("export carries private keys")
	}
	// Serve the imported copy in place of the original.
	dst := &Repo{Dir: t.TempDir(), Now: f.clk.now}
	if err := dst.Import(bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(f.repo.Dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dst.Dir, f.repo.Dir); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
		t.Fatalf("fetch from imported copy: %v", err)
	}
	// The same export again changes nothing.
	if err := (&Repo{Dir: f.repo.Dir, Now: f.clk.now}).Import(bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatalf("the same export again: %v", err)
	}
}

func TestImportRefusesEscapes(t *testing.T) {
	for _, name := range []string{"../evil", "keys/root.key", "/etc/passwd", "metadata/../../evil"} {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
		tw.Write([]byte("x"))
		tw.Close()
		dir := t.TempDir()
		if err := (&Repo{Dir: filepath.Join(dir, "r")}).Import(&buf); !errors.Is(err, ErrBadBundle) {
			t.Errorf("%s: %v", name, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "evil")); err == nil {
			t.Errorf("%s: wrote outside the repository", name)
		}
	}
}

func TestRepoOpen(t *testing.T) {
	r := &Repo{Dir: t.TempDir()}
	if err := r.Init(); err != nil {
		t.Fatal(err)
	}
	name, err := r.Publish(testBundle(t, "module"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.Open(name)
	if err != nil || b.Manifest.Name != "stitch_fix_1" {
		t.Fatalf("open %s: %v", name, err)
	}
	if _, err := r.Open("6.1.0-28-amd64/nope-0123456789abcdef.stitch"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unpublished target: %v", err)
	}
	path := filepath.Join(r.TargetsDir(), filepath.FromSlash(name))
	data, _ := os.ReadFile(path)
	data[len(data)-1] ^= 1
	os.WriteFile(path, data, 0o644)
	if _, err := r.Open(name); !errors.Is(err, ErrVerify) {
		t.Errorf("tampered target on disk: %v", err)
	}
}
