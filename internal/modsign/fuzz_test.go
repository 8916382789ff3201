package modsign_test

import (
	"bytes"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// FuzzSplit feeds arbitrary bytes to Split, Verify, Strip and Sign: a
// module from anywhere (a repository, a disk, an attacker) gives an
// error or a signature, never a panic, and what Sign writes verifies.
func FuzzSplit(f *testing.F) {
	// ECDSA only: every fuzz worker runs this, and an RSA-4096 key
	// takes seconds to make. Debian's RSA signature is a seed instead.
	ek, ec := key(f, modsign.ECDSA)
	body := []byte("\x7fELF\x02\x01\x01\x00 a module body")
	es, err := modsign.Sign(body, ek, ec)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(es)
	if deb, err := os.ReadFile(filepath.Join(testutils.ModulesDir, "kernel/fs/binfmt_misc.ko")); err == nil {
		if b, _, err := modsign.Split(deb); err == nil {
			f.Add(append(bytes.Clone(body), deb[len(b):]...))
		}
	}
	f.Add(body)
	f.Add([]byte(modsign.Magic))
	f.Add(append([]byte("\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01"), modsign.Magic...))
	f.Add(es[len(body)-1:])
	// The signer named by subject key id (sign-file -k's form): [0]
	// IMPLICIT OCTET STRING in place of issuerAndSerialNumber.
	if i := bytes.Index(es, ec.RawIssuer); i > 2 {
		skid := append([]byte{0x80, byte(len(ec.SubjectKeyId))}, ec.SubjectKeyId...)
		f.Add(append(append(bytes.Clone(es[:i-2]), skid...), es[i+len(ec.RawIssuer)+2+int(es[i+len(ec.RawIssuer)+1]):]...))
	}
	certs := []*x509.Certificate{ec}
	f.Fuzz(func(t *testing.T, data []byte) {
		b, sig, err := modsign.Split(data)
		switch {
		case err == nil:
			if sig == nil || !bytes.HasPrefix(data, b) || len(b) == 0 {
				t.Fatalf("Split: body of %d bytes, signature %v", len(b), sig)
			}
			_ = sig.Signer()
		case !errors.Is(err, modsign.ErrUnsigned) && !errors.Is(err, modsign.ErrCorrupt):
			t.Fatalf("Split: %v is neither ErrUnsigned nor ErrCorrupt", err)
		}
		if c, err := modsign.Verify(data, certs); err == nil && c == nil {
			t.Fatal("Verify: no error and no certificate")
		}
		if _, err := modsign.Strip(data); err != nil && !errors.Is(err, modsign.ErrCorrupt) {
			t.Fatalf("Strip: %v", err)
		}
		signed, err := modsign.Sign(data, ek, ec)
		if err != nil {
			return
		}
		if c, err := modsign.Verify(signed, certs); err != nil || c != ec {
			t.Fatalf("Verify of what Sign wrote: %v", err)
		}
	})
}
