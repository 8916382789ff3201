package modsign

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Sign appends a module signature by key, whose certificate is cert: the
// bytes `scripts/sign-file sha256 KEY CERT MODULE` appends (CMS_NOCERTS,
// CMS_BINARY, CMS_DETACHED, CMS_NOATTR: a detached SignedData without
// certificates or authenticated attributes, the signer named by issuer
// and serial number), then struct module_signature and Magic. A module
// that is signed already is signed anew (its old signature dropped), so
// signing twice gives what signing once gives (the signature is
// deterministic for both RSA and ECDSA keys); one with a corrupt
// trailer is refused, since its body cannot be told apart.
func Sign(module []byte, key crypto.Signer, cert *x509.Certificate) ([]byte, error) {
	body, err := Strip(module)
	if err != nil {
		return nil, fmt.Errorf("sign: %w: re-sign only an unsigned module or one with a valid signature", err)
	}
	if len(body) == 0 {
		return nil, errors.New("sign: empty module")
	}
	if err := matchKey(key, cert); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	serial, err := rawSerial(cert)
	if err != nil {
		return nil, fmt.Errorf("sign: certificate: %w", err)
	}
	digest := sha256.Sum256(body)
	var pkeyAlg []byte
	switch key.Public().(type) {
	case *rsa.PublicKey:
		// rsaEncryption with NULL parameters, as OpenSSL writes it.
		pkeyAlg = mustSeq(mustMarshal(oidRSA), asn1.NullBytes)
	case *ecdsa.PublicKey:
		pkeyAlg = mustSeq(mustMarshal(append(oidECDSA[:len(oidECDSA):len(oidECDSA)], 2))) // ecdsa-with-SHA256
	default:
		return nil, fmt.Errorf("sign: %T key: the kernel verifies RSA and ECDSA", key.Public())
	}
	// Deterministic signatures, so that signing the same module twice
	// gives the same bytes (publishing is idempotent): RSA PKCS#1 v1.5
	// is, and an ECDSA key given no random source signs per RFC 6979.
	var random io.Reader = rand.Reader
	if _, ok := key.(*ecdsa.PrivateKey); ok {
		random = nil
	}
	value, err := key.Sign(random, digest[:], crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	sha256Alg := mustSeq(mustMarshal(digestOID("sha256"))) // no parameters
	signerInfo := mustSeq(
		mustMarshal(1), // version 1: issuerAndSerialNumber
		mustSeq(cert.RawIssuer, tlv(asn1.ClassUniversal, asn1.TagInteger, false, serial)),
		sha256Alg,
		pkeyAlg,
		tlv(asn1.ClassUniversal, asn1.TagOctetString, false, value),
	)
	signedData := mustSeq(
		mustMarshal(1),
		tlv(asn1.ClassUniversal, asn1.TagSet, true, sha256Alg),
		mustSeq(mustMarshal(oidData)), // detached: no content
		tlv(asn1.ClassUniversal, asn1.TagSet, true, signerInfo),
	)
	msg := mustSeq(mustMarshal(oidSignedData), tlv(asn1.ClassContextSpecific, 0, true, signedData))
	out := make([]byte, 0, len(body)+len(msg)+infoSize+len(Magic))
	out = append(out, body...)
	out = append(out, msg...)
	info := [infoSize]byte{2: idPKCS7}
	binary.BigEndian.PutUint32(info[8:], uint32(len(msg)))
	out = append(out, info[:]...)
	return append(out, Magic...), nil
}

// matchKey refuses a key that is not the certificate's: the signature
// would name a certificate whose key cannot verify it.
func matchKey(key crypto.Signer, cert *x509.Certificate) error {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	pub, ok := key.Public().(equaler)
	if !ok || !pub.Equal(cert.PublicKey) {
		return fmt.Errorf("the key is not the one of certificate %s", KeyDescription(cert))
	}
	return nil
}

func tlv(class, tag int, compound bool, content ...[]byte) []byte {
	b, err := asn1.Marshal(asn1.RawValue{Class: class, Tag: tag, IsCompound: compound, Bytes: bytes.Join(content, nil)})
	if err != nil {
		panic(err) // a RawValue always encodes
	}
	return b
}

func mustSeq(content ...[]byte) []byte {
	return tlv(asn1.ClassUniversal, asn1.TagSequence, true, content...)
}

// mustMarshal encodes the constant values Sign writes (OIDs, small
// integers), which cannot fail.
func mustMarshal(v any) []byte {
	b, err := asn1.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// Verify checks a module's signature against certs and returns the
// certificate that signed it. Errors: ErrUnsigned and ErrCorrupt (from
// Split), ErrUntrusted when the signer is none of certs, ErrBadSignature
// when it is one but the signature does not verify; each names the
// signer.
func Verify(module []byte, certs []*x509.Certificate) (*x509.Certificate, error) {
	body, sig, err := Split(module)
	if err != nil {
		return nil, err
	}
	var matched *x509.Certificate
	var verr error
	for _, c := range certs {
		if c == nil || !identifies(sig, c) {
			continue
		}
		matched = c
		if verr = check(body, sig, c); verr == nil {
			return c, nil
		}
	}
	if matched == nil {
		return nil, fmt.Errorf("%w: signed by %s, which is none of the %d trusted certificates%s", ErrUntrusted, sig.Signer(), len(certs), describe(certs))
	}
	return nil, fmt.Errorf("%w: signed by %s (certificate %q) but %v: the module was changed after it was signed", ErrBadSignature, sig.Signer(), KeyDescription(matched), verr)
}

func describe(certs []*x509.Certificate) string {
	var b bytes.Buffer
	for i, c := range certs {
		if c == nil {
			continue
		}
		if i == 0 {
			b.WriteString(" (")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(KeyDescription(c))
	}
	if b.Len() > 0 {
		b.WriteString(")")
	}
	return b.String()
}

// identifies says whether sig names cert as its signer, as the kernel's
// pkcs7_find_key compares: issuer and serial byte for byte, or the
// subject key identifier.
func identifies(sig *Signature, c *x509.Certificate) bool {
	if sig.SubjectKeyID != nil {
		return len(c.SubjectKeyId) > 0 && bytes.Equal(sig.SubjectKeyID, c.SubjectKeyId)
	}
	serial, err := rawSerial(c)
	return err == nil && bytes.Equal(sig.RawIssuer, c.RawIssuer) && bytes.Equal(sig.RawSerial, serial)
}

func newHash(name string) (crypto.Hash, hash.Hash) {
	switch name {
	case "sha1":
		return crypto.SHA1, sha1.New()
	case "sha224":
		return crypto.SHA224, sha256.New224()
	case "sha256":
		return crypto.SHA256, sha256.New()
	case "sha384":
		return crypto.SHA384, sha512.New384()
	case "sha512":
		return crypto.SHA512, sha512.New()
	}
	return 0, nil
}

// check verifies sig over body with c's public key.
func check(body []byte, sig *Signature, c *x509.Certificate) error {
	h, hh := newHash(sig.DigestAlgorithm)
	if hh == nil {
		return fmt.Errorf("digest algorithm %s is not supported", sig.DigestAlgorithm)
	}
	hh.Write(body)
	digest := hh.Sum(nil)
	if sig.AuthAttrs != nil {
		// With authenticated attributes the signature covers them (as a
		// SET), and they carry the content's digest.
		if err := checkAttrs(sig.AuthAttrs, digest); err != nil {
			return err
		}
		_, hh = newHash(sig.DigestAlgorithm)
		hh.Write([]byte{0x31})
		hh.Write(sig.AuthAttrs[1:])
		digest = hh.Sum(nil)
	}
	switch pub := c.PublicKey.(type) {
	case *rsa.PublicKey:
		if sig.PublicKeyAlgorithm != "rsa" {
			return fmt.Errorf("the signature is %s, the certificate's key RSA", sig.PublicKeyAlgorithm)
		}
		if err := rsa.VerifyPKCS1v15(pub, h, digest, sig.Value); err != nil {
			return fmt.Errorf("the RSA signature does not verify")
		}
	case *ecdsa.PublicKey:
		if sig.PublicKeyAlgorithm != "ecdsa" {
			return fmt.Errorf("the signature is %s, the certificate's key ECDSA", sig.PublicKeyAlgorithm)
		}
		if !ecdsa.VerifyASN1(pub, digest, sig.Value) {
			return fmt.Errorf("the ECDSA signature does not verify")
		}
	default:
		return fmt.Errorf("the certificate's %T key is not one the kernel verifies modules with", c.PublicKey)
	}
	return nil
}

// checkAttrs checks authenticated attributes: content type data and a
// message digest equal to digest.
func checkAttrs(raw []byte, digest []byte) error {
	var set asn1.RawValue
	if _, err := asn1.Unmarshal(raw, &set); err != nil {
		return fmt.Errorf("authenticated attributes: %v", err)
	}
	attrs := &der{set.Bytes}
	found := false
	for len(attrs.rest) > 0 {
		a, err := attrs.next("attribute")
		if err != nil {
			return err
		}
		var attr struct {
			Type   asn1.ObjectIdentifier
			Values asn1.RawValue
		}
		if rest, err := asn1.Unmarshal(a.FullBytes, &attr); err != nil || len(rest) != 0 {
			return fmt.Errorf("authenticated attribute: malformed")
		}
		vals := &der{attr.Values.Bytes}
		v, err := vals.next("attribute value")
		if err != nil {
			return err
		}
		switch {
		case attr.Type.Equal(oidMsgDigest):
			if v.Tag != asn1.TagOctetString || !bytes.Equal(v.Bytes, digest) {
				return fmt.Errorf("the signed message digest is not the module's")
			}
			found = true
		case attr.Type.Equal(oidCT):
			if oid, err := parseOID(v, "content type attribute"); err != nil || !oid.Equal(oidData) {
				return fmt.Errorf("the signed content type is not data")
			}
		}
	}
	if !found {
		return fmt.Errorf("authenticated attributes without a message digest")
	}
	return nil
}
