package modsign_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/modsign"
)

// TestKeyDescriptionKernel hands certificates to the running kernel's
// X.509 parser (add_key "asymmetric" into this process's keyring, which
// any user may do and which goes with the process) and compares the
// description it gives each key with KeyDescription: a key named by its
// subject key identifier, and one without (named by its serial, whose
// DER has a leading zero byte) whose subject combines O and CN.
func TestKeyDescriptionKernel(t *testing.T) {
	_, withSKID := key(t, modsign.RSA)
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(0x81234567), Subject: pkix.Name{CommonName: "Fleet", Organization: []string{"Example Corp"}},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), SubjectKeyId: []byte{}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	bySerial, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if len(bySerial.SubjectKeyId) != 0 {
		t.Fatalf("the certificate has a subject key id %x", bySerial.SubjectKeyId)
	}
	for _, c := range []*x509.Certificate{withSKID, bySerial} {
		id, err := unix.AddKey("asymmetric", "", c.Raw, unix.KEY_SPEC_PROCESS_KEYRING)
		if err != nil {
			// A container's seccomp profile, or a kernel without
			// asymmetric keys.
			t.Skipf("skipped: add_key asymmetric: %v (the kernel or the sandbox does not allow it)", err)
		}
		d, err := unix.KeyctlString(unix.KEYCTL_DESCRIBE, id)
		if err != nil {
			t.Fatal(err)
		}
		// type;uid;gid;perm;description
		got := d[strings.LastIndex(d, ";")+1:]
		if want := modsign.KeyDescription(c); got != want {
			t.Errorf("the kernel describes the key as %q, KeyDescription says %q", got, want)
		}
	}
	if want := "Example Corp: Fleet: 0081234567"; modsign.KeyDescription(bySerial) != want {
		t.Errorf("KeyDescription %q, want %q", modsign.KeyDescription(bySerial), want)
	}
}
