package bundle

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/modsign"
)

// openTarget reads a published bundle back from the repository.
func openTarget(t *testing.T, r *Repo, name string) *Bundle {
	t.Helper()
	b, err := r.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSigningPublish(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	unsigned := testBundle(t, "module one")
	// Without a key nothing changes: the module is published as it is.
	before := f.publish(t, "module one")
	if _, _, err := modsign.Split(openTarget(t, f.repo, before).Module); !errors.Is(err, modsign.ErrUnsigned) {
		t.Fatalf("published without a signing key: %v, want an unsigned module", err)
	}
	if certs, err := f.client.SigningCerts(ctx); err != nil || len(certs) != 0 {
		t.Fatalf("certificates of a repository without a signing key: %v, %v", certs, err)
	}

	k, err := f.repo.InitSigning(modsign.RSA, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !k.Current || k.Target != SigningTarget(k.KeyID) || k.Algorithm != modsign.RSA || !strings.HasPrefix(k.Description, DefaultSigningSubject+": ") {
		t.Errorf("new key %+v", k)
	}
	if fi, err := os.Stat(f.repo.signingPath(k.KeyID, ".key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key file: %v", err)
	}
	if _, err := f.repo.InitSigning(modsign.RSA, "", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v, want ErrExists", err)
	}
	certs, err := f.client.SigningCerts(ctx)
	if err != nil || len(certs) != 1 || modsign.KeyID(certs[0]) != k.KeyID {
		t.Fatalf("published certificates: %v, %v", certs, err)
	}

	// The same unsigned bundle again: now signed, so another target.
	out, err := f.repo.PublishAll([][]byte{unsigned}, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := out[0]
	if p.Target == before || !p.New || p.Signer != k.KeyID {
		t.Fatalf("published %+v (unsigned was %s)", p, before)
	}
	b, _, err := f.client.Fetch(ctx, p.Target)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := modsign.Verify(b.Module, certs); err != nil || modsign.KeyID(c) != k.KeyID {
		t.Fatalf("the published module: %v", err)
	}
	if b.Manifest.ModuleHash != SHA256Hex(b.Module) {
		t.Errorf("module_sha256 %s is not the signed module's", b.Manifest.ModuleHash)
	}
	body, _, _ := modsign.Split(b.Module)
	if orig, _ := Open(unsigned); !bytes.Equal(body, orig.Module) {
		t.Error("the signed module's body is not the module published")
	}
	// Publishing twice is a no-op (the signature is deterministic), also
	// when the bundle given is the signed one.
	signed, _ := f.repo.readTarget(p.Target)
	for _, data := range [][]byte{unsigned, signed} {
		again, err := f.repo.PublishAll([][]byte{data}, nil)
		if err != nil || again[0].Target != p.Target || again[0].New {
			t.Errorf("publishing again: %+v, %v", again, err)
		}
	}

	// The private key never leaves: not in an export, not served.
	var buf bytes.Buffer
	if err := f.repo.Export(&buf); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(&buf)
	sawCert := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		if bytes.Contains(data, []byte("PRIVATE KEY")) || strings.Contains(h.Name, "module-signing") || strings.HasSuffix(h.Name, ".key") {
			t.Fatalf("export carries %s", h.Name)
		}
		sawCert = sawCert || h.Name == "targets/"+k.Target
	}
	if !sawCert {
		t.Error("export lacks the published certificate")
	}
	if err := filepath.WalkDir(f.repo.TargetsDir(), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if b, _ := os.ReadFile(p); bytes.Contains(b, []byte("PRIVATE KEY")) {
				t.Errorf("served file %s holds a private key", p)
			}
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

func TestSigningRotation(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.repo.RotateSigning(modsign.ECDSA, "", 0); !errors.Is(err, ErrNoSigningKey) {
		t.Fatalf("rotate without a key: %v", err)
	}
	old, err := f.repo.InitSigning(modsign.ECDSA, "Old key", 0)
	if err != nil {
		t.Fatal(err)
	}
	byOld, err := f.repo.PublishAll([][]byte{testBundle(t, "one")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	nw, err := f.repo.RotateSigning(modsign.ECDSA, "New key", 0)
	if err != nil {
		t.Fatal(err)
	}
	// Both published, the old one still signs: machines enroll the new
	// certificate meanwhile.
	keys, err := f.repo.SigningKeys()
	if err != nil || len(keys) != 2 || keys[0].KeyID != old.KeyID || !keys[0].Current || keys[1].Current || keys[1].Target == "" {
		t.Fatalf("keys after rotate: %+v, %v", keys, err)
	}
	certs, err := f.client.SigningCerts(ctx)
	if err != nil || len(certs) != 2 {
		t.Fatalf("certificates after rotate: %d, %v", len(certs), err)
	}
	if out, err := f.repo.PublishAll([][]byte{testBundle(t, "two")}, nil); err != nil || out[0].Signer != old.KeyID {
		t.Fatalf("published during the overlap: %+v, %v", out, err)
	}
	if _, err := f.repo.RetireSigning(old.KeyID, false); err == nil || !strings.Contains(err.Error(), "signing use") {
		t.Fatalf("retiring the current key: %v", err)
	}
	if _, err := f.repo.UseSigning(nw.KeyID); err != nil {
		t.Fatal(err)
	}
	out, err := f.repo.PublishAll([][]byte{testBundle(t, "three")}, nil)
	if err != nil || out[0].Signer != nw.KeyID {
		t.Fatalf("published after use: %+v, %v", out, err)
	}
	b, _, err := f.client.Fetch(ctx, out[0].Target)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := modsign.Verify(b.Module, certs); err != nil || modsign.KeyID(c) != nw.KeyID {
		t.Fatalf("signed by %v, %v; want the new key", c, err)
	}
	// Bundles the old key signed are still published: retiring it would
	// make agents refuse them.
	still, err := f.repo.RetireSigning(old.KeyID, false)
	if err == nil || len(still) != 2 || !strings.Contains(err.Error(), byOld[0].Target) {
		t.Fatalf("retire with bundles signed by it: %v, %v", still, err)
	}
	if _, err := f.repo.RetireSigning(old.KeyID, true); err != nil {
		t.Fatal(err)
	}
	certs, err = f.client.SigningCerts(ctx)
	if err != nil || len(certs) != 1 || modsign.KeyID(certs[0]) != nw.KeyID {
		t.Fatalf("certificates after retire: %v, %v", certs, err)
	}
	if _, err := modsign.Verify(openTarget(t, f.repo, byOld[0].Target).Module, certs); !errors.Is(err, modsign.ErrUntrusted) {
		t.Errorf("a module of the retired key: %v, want ErrUntrusted", err)
	}
	if _, err := f.repo.UseSigning(old.KeyID); err == nil {
		t.Error("a retired key was made current again")
	}
	if _, err := f.repo.RetireSigning("../x", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("retire of a bad key id: %v", err)
	}
}
