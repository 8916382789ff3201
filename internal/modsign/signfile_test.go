package modsign_test

import (
	"bytes"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// signFile is the kernel's scripts/sign-file from the test kernel's
// headers (linux-kbuild-6.1, which linux-headers pulls in).
const signFile = "/usr/lib/linux-kbuild-6.1/scripts/sign-file"

// kernelSign signs body with the kernel's sign-file (extra flags first,
// such as -k), keeping key and certificate in files as sign-file wants.
func kernelSign(t *testing.T, alg string, body []byte, flags ...string) []byte {
	t.Helper()
	if _, err := os.Stat(signFile); err != nil {
		testutils.Unavailable(t, "the kernel's sign-file (linux-kbuild-6.1): %v", err)
	}
	k, c := key(t, alg)
	dir := t.TempDir()
	kp, cp, in, out := filepath.Join(dir, "key.pem"), filepath.Join(dir, "cert.der"), filepath.Join(dir, "m.ko"), filepath.Join(dir, "signed.ko")
	if err := modsign.WriteKey(kp, k); err != nil {
		t.Fatal(err)
	}
	if err := modsign.WriteCert(cp, c); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in, body, 0o644); err != nil {
		t.Fatal(err)
	}
	args := append(flags, "sha256", kp, cp, in, out)
	if b, err := exec.Command(signFile, args...).CombinedOutput(); err != nil {
		t.Fatalf("sign-file %v: %v\n%s", args, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSignFileRSA: for RSA (PKCS#1 v1.5 signatures are deterministic)
// Sign writes exactly the bytes the kernel's sign-file writes, for a
// real module.
func TestSignFileRSA(t *testing.T) {
	_, body := realModule(t)
	want := kernelSign(t, modsign.RSA, body)
	k, c := key(t, modsign.RSA)
	got, err := modsign.Sign(body, k, c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		n := 0
		for n < len(got) && n < len(want) && got[n] == want[n] {
			n++
		}
		t.Fatalf("Sign wrote %d bytes, sign-file %d; first difference at %d (body is %d)", len(got), len(want), n, len(body))
	}
	t.Logf("%d-byte module: identical %d-byte signature trailer", len(body), len(got)-len(body))
	openSSLVerify(t, got, c)
}

// TestSignFileECDSA: ECDSA signatures are randomized, so each side's
// output must verify with the other's parser and with OpenSSL.
func TestSignFileECDSA(t *testing.T) {
	_, body := realModule(t)
	theirs := kernelSign(t, modsign.ECDSA, body)
	k, c := key(t, modsign.ECDSA)
	if got, err := modsign.Verify(theirs, []*x509.Certificate{c}); err != nil || got != c {
		t.Fatalf("Verify of sign-file's ECDSA signature: %v", err)
	}
	ours, err := modsign.Sign(body, k, c)
	if err != nil {
		t.Fatal(err)
	}
	// Same structure, only the signature value differs. An ECDSA
	// signature's DER length varies by a byte or two with its integers,
	// and the lengths of the structures around it with it: the bytes
	// before the value compare only when the two values are as long.
	_, st, err := modsign.Split(theirs)
	if err != nil {
		t.Fatal(err)
	}
	_, so, err := modsign.Split(ours)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(st.RawIssuer, so.RawIssuer) || !bytes.Equal(st.RawSerial, so.RawSerial) || st.DigestAlgorithm != so.DigestAlgorithm ||
		st.PublicKeyAlgorithm != so.PublicKeyAlgorithm || len(st.AuthAttrs) != 0 || len(so.AuthAttrs) != 0 {
		t.Errorf("signer differs from sign-file's: theirs %+v, ours %+v", st, so)
	}
	if len(st.Value) == len(so.Value) {
		if i := bytes.Index(st.PKCS7, st.Value); i < 0 || !bytes.Equal(st.PKCS7[:i-2], so.PKCS7[:i-2]) {
			t.Errorf("the PKCS#7 before the signature value differs from sign-file's")
		}
	}
	openSSLVerify(t, ours, c)
	openSSLVerify(t, theirs, c)
}

// TestSignFileKeyID: sign-file -k names the signer by subject key
// identifier; Split and Verify read that form too.
func TestSignFileKeyID(t *testing.T) {
	_, body := realModule(t)
	signed := kernelSign(t, modsign.RSA, body, "-k")
	_, c := key(t, modsign.RSA)
	_, sig, err := modsign.Split(signed)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sig.SubjectKeyID, c.SubjectKeyId) || sig.RawIssuer != nil {
		t.Fatalf("signer %s, want subject key id %x", sig.Signer(), c.SubjectKeyId)
	}
	if got, err := modsign.Verify(signed, []*x509.Certificate{c}); err != nil || got != c {
		t.Fatalf("Verify: %v", err)
	}
}

// openSSLVerify checks the module's detached signature with `openssl cms
// -verify`, when openssl is installed.
func openSSLVerify(t *testing.T, module []byte, c *x509.Certificate) {
	t.Helper()
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Log("openssl not installed: not checked with openssl cms -verify")
		return
	}
	body, sig, err := modsign.Split(module)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	files := map[string][]byte{"body": body, "sig.p7": sig.PKCS7, "cert.der": c.Raw}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pemCert := filepath.Join(dir, "cert.pem")
	if b, err := exec.Command(openssl, "x509", "-inform", "DER", "-in", filepath.Join(dir, "cert.der"), "-out", pemCert).CombinedOutput(); err != nil {
		t.Fatalf("openssl x509: %v\n%s", err, b)
	}
	cmd := exec.Command(openssl, "cms", "-verify", "-binary", "-inform", "DER", "-in", filepath.Join(dir, "sig.p7"),
		"-content", filepath.Join(dir, "body"), "-noverify", "-certfile", pemCert, "-out", os.DevNull)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("openssl cms -verify: %v\n%s", err, b)
	}
	// And a changed body fails there too.
	body = bytes.Clone(body)
	body[len(body)/2] ^= 1
	os.WriteFile(filepath.Join(dir, "body"), body, 0o644)
	if b, err := exec.Command(cmd.Args[0], cmd.Args[1:]...).CombinedOutput(); err == nil {
		t.Fatalf("openssl cms -verify accepted a changed body:\n%s", b)
	}
}
