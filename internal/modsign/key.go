package modsign

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// Key algorithms NewKey makes.
const (
	// RSA is RSA-4096, what the kernel's own build-time key is
	// (certs/default_x509.genkey) and the only kind Debian 6.1 kernels
	// verify (CONFIG_CRYPTO_ECDSA is off there).
	RSA = "rsa"
	// ECDSA is P-384; kernels with CONFIG_CRYPTO_ECDSA (Debian's 6.12)
	// verify it, Debian's 6.1 refuses it (ENOPKG).
	ECDSA = "ecdsa"
)

// rsaBits is the RSA key size NewKey makes.
const rsaBits = 4096

// NewKey makes a module-signing key and its self-signed certificate: the
// subject as common name, valid from now until notAfter, key usage
// digitalSignature, extended key usage codeSigning, not a CA, and an
// explicit subject key identifier (SHA-1 of the public key bits, RFC
// 5280's method 1: the id the kernel shows in /proc/keys and that
// sign-file -k would name). alg is RSA ("" too) or ECDSA.
func NewKey(alg, subject string, notAfter time.Time) (crypto.Signer, *x509.Certificate, error) {
	if subject == "" {
		return nil, nil, errors.New("new signing key: empty subject")
	}
	now := time.Now()
	if !notAfter.After(now) {
		return nil, nil, fmt.Errorf("new signing key: expiry %s is not in the future", notAfter.Format(time.RFC3339))
	}
	var key crypto.Signer
	var err error
	switch alg {
	case RSA, "":
		key, err = rsa.GenerateKey(rand.Reader, rsaBits)
	case ECDSA:
		key, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	default:
		return nil, nil, fmt.Errorf("new signing key: algorithm %q, want %s or %s", alg, RSA, ECDSA)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("new signing key: %w", err)
	}
	skid, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, nil, fmt.Errorf("new signing key: %w", err)
	}
	// A positive serial below 2^159 (X.509's 20-octet limit).
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return nil, nil, fmt.Errorf("new signing key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial.Add(serial, big.NewInt(1)),
		Subject:               pkix.Name{CommonName: subject},
		NotBefore:             now.Add(-time.Minute).UTC().Truncate(time.Second),
		NotAfter:              notAfter.UTC().Truncate(time.Second),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning},
		BasicConstraintsValid: true,
		IsCA:                  false,
		SubjectKeyId:          skid,
	}
	if _, ok := key.(*rsa.PrivateKey); ok {
		// PKCS#1 v1.5: the kernel's X.509 parser (6.1) has no RSA-PSS.
		tmpl.SignatureAlgorithm = x509.SHA256WithRSA
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("new signing key: certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("new signing key: certificate: %w", err)
	}
	return key, cert, nil
}

// subjectKeyID is the SHA-1 of the subjectPublicKey BIT STRING's bits.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	var info struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(spki, &info); err != nil {
		return nil, err
	}
	sum := sha1.Sum(info.PublicKey.Bytes)
	return sum[:], nil
}

// KeyID is the hex id the kernel gives the certificate's key: its
// subject key identifier, or its serial number (the DER integer's bytes)
// when it has none.
func KeyID(cert *x509.Certificate) string {
	if len(cert.SubjectKeyId) > 0 {
		return hex.EncodeToString(cert.SubjectKeyId)
	}
	serial, err := rawSerial(cert)
	if err != nil {
		return ""
	}
	return hex.EncodeToString(serial)
}

// KeyDescription is the description the kernel gives the certificate's
// key in its keyrings (/proc/keys, keyctl): "SUBJECT: KEYID", the subject
// made from the common name and organization as x509_fabricate_name
// does, and KeyID.
func KeyDescription(cert *x509.Certificate) string {
	return fabricateName(cert.RawSubject) + ": " + KeyID(cert)
}

var (
	oidCN    = asn1.ObjectIdentifier{2, 5, 4, 3}
	oidO     = asn1.ObjectIdentifier{2, 5, 4, 10}
	oidEmail = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 1}
)

type attrValue struct {
	Type  asn1.ObjectIdentifier
	Value asn1.RawValue
}

// attrSET is one RDN; encoding/asn1 reads a type named …SET as a SET OF.
type attrSET []attrValue

// fabricateName is the kernel's x509_fabricate_name: of the name's last
// CN, O and emailAddress values (their raw bytes, whatever the string
// type), "O: CN", or CN alone when it begins with O (or with the same 7
// bytes), or whichever one exists, or "".
func fabricateName(raw []byte) string {
	var rdns []attrSET
	if rest, err := asn1.Unmarshal(raw, &rdns); err != nil || len(rest) != 0 {
		return ""
	}
	var cn, o, email []byte
	for _, set := range rdns {
		for _, a := range set {
			switch {
			case a.Type.Equal(oidCN):
				cn = a.Value.Bytes
			case a.Type.Equal(oidO):
				o = a.Value.Bytes
			case a.Type.Equal(oidEmail):
				email = a.Value.Bytes
			}
		}
	}
	switch {
	case len(cn) > 0 && len(o) > 0:
		if len(cn) >= len(o) && bytes.HasPrefix(cn, o) || len(cn) >= 7 && len(o) >= 7 && bytes.Equal(cn[:7], o[:7]) {
			return string(cn)
		}
		return string(o) + ": " + string(cn)
	case len(cn) > 0:
		return string(cn)
	case len(o) > 0:
		return string(o)
	}
	return string(email)
}

// rawSerial is the certificate's serial number as its DER INTEGER's
// content bytes, read from the TBSCertificate: what a signature's
// issuerAndSerialNumber must equal byte for byte, and the kernel's key id
// without a subject key identifier.
func rawSerial(cert *x509.Certificate) ([]byte, error) {
	var tbs asn1.RawValue
	if _, err := asn1.Unmarshal(cert.RawTBSCertificate, &tbs); err != nil {
		return nil, fmt.Errorf("TBSCertificate: %w", err)
	}
	d := &der{tbs.Bytes}
	if d.peek(0) { // [0] EXPLICIT version
		if _, err := d.next("version"); err != nil {
			return nil, err
		}
	}
	sn, err := d.next("serial number")
	if err != nil {
		return nil, err
	}
	if err := expect(sn, asn1.ClassUniversal, asn1.TagInteger, "serial number"); err != nil {
		return nil, err
	}
	return sn.Bytes, nil
}

const (
	pemKey  = "PRIVATE KEY"
	pemCert = "CERTIFICATE"
)

// WriteKey stores key at path as PKCS#8 PEM, mode 0600. It refuses to
// replace an existing file (ErrExist), and a crash leaves either no file
// or the whole key.
func WriteKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("write key %s: %w", path, err)
	}
	return writeNew(path, pem.EncodeToMemory(&pem.Block{Type: pemKey, Bytes: der}), 0o600)
}

// WriteCert stores cert at path as DER (what `mokutil --import` takes),
// mode 0644, refusing to replace an existing file.
func WriteCert(path string, cert *x509.Certificate) error {
	return writeNew(path, cert.Raw, 0o644)
}

// writeNew writes a temporary file, syncs it, and links it to path:
// link fails when path exists, so nothing is ever overwritten.
func writeNew(path string, data []byte, mode fs.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("write %s: %w: it is there already", path, fs.ErrExist)
		}
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// ReadKey reads a PKCS#8 PEM private key (RSA or ECDSA), refusing a file
// other users can read.
func ReadKey(path string) (crypto.Signer, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("read key %s: mode %04o, readable by other users: run `chmod 600 %s` and consider rotating it", path, fi.Mode().Perm(), path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != pemKey {
		return nil, fmt.Errorf("read key %s: not a PEM %q block", path, pemKey)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	switch k := k.(type) {
	case *rsa.PrivateKey:
		return k, nil
	case *ecdsa.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("read key %s: a %T key; module signing keys are RSA or ECDSA", path, k)
}

// ReadCert reads a certificate file, DER or PEM.
func ReadCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read certificate: %w", err)
	}
	c, err := ParseCert(b)
	if err != nil {
		return nil, fmt.Errorf("read certificate %s: %w", path, err)
	}
	return c, nil
}

// ParseCert parses a certificate, DER or PEM.
func ParseCert(b []byte) (*x509.Certificate, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != pemCert {
			return nil, fmt.Errorf("PEM block %q, want %q", blk.Type, pemCert)
		}
		b = blk.Bytes
	}
	return x509.ParseCertificate(b)
}
