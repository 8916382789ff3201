// Package modsign reads and writes kernel module signatures: the PKCS#7
// (CMS) SignedData blob that the kernel's scripts/sign-file appends to a
// module, followed by struct module_signature and the
// "~Module signature appended~\n" marker. A kernel with module signing
// (and one locked down by UEFI Secure Boot, which refuses everything
// else) loads a module only when that blob verifies with a key in one of
// its trusted keyrings.
//
// Sign writes exactly what sign-file writes by default (detached
// SignedData, no certificates, no authenticated attributes, the signer
// named by issuer and serial number); Split parses what sign-file or
// another signer wrote; Verify says which of a set of certificates signed
// a module. Standard library only: encoding/asn1 for the DER, crypto/rsa
// and crypto/ecdsa for the signature.
package modsign

import (
	"bytes"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
)

// Magic ends every signed module (MODULE_SIG_STRING).
const Magic = "~Module signature appended~\n"

// infoSize is sizeof(struct module_signature): algo, hash, id_type,
// signer_len, key_id_len, __pad[3], __be32 sig_len.
const infoSize = 12

// idPKCS7 is PKEY_ID_PKCS7, the only id_type the kernel accepts.
const idPKCS7 = 2

// Sentinel errors; Split and Verify wrap them with the detail.
var (
	// ErrUnsigned: the module has no signature trailer.
	ErrUnsigned = errors.New("module is not signed")
	// ErrCorrupt: a trailer is there but struct module_signature or the
	// PKCS#7 message in it is malformed or not what the kernel accepts.
	ErrCorrupt = errors.New("module signature is corrupt")
	// ErrUntrusted: the signer is none of the given certificates.
	ErrUntrusted = errors.New("module signed by an untrusted key")
	// ErrBadSignature: the signer is one of the certificates, but the
	// signature does not verify (the module was changed after signing).
	ErrBadSignature = errors.New("module signature does not verify")
)

// Signature is a module's parsed signature: one signer, as the kernel's
// PKCS#7 parser sees it.
type Signature struct {
	// RawIssuer is the DER of the signer certificate's issuer Name and
	// Issuer its readable form; empty when the signer is named by
	// SubjectKeyID instead (sign-file -k).
	RawIssuer []byte
	Issuer    string
	// Serial is the signer certificate's serial number (nil with
	// SubjectKeyID); RawSerial its DER INTEGER content, as compared.
	Serial    *big.Int
	RawSerial []byte
	// SubjectKeyID is the signer certificate's subject key identifier,
	// when the signer is named by it.
	SubjectKeyID []byte
	// DigestAlgorithm is "sha256", "sha384", ...; PublicKeyAlgorithm is
	// "rsa" or "ecdsa".
	DigestAlgorithm    string
	PublicKeyAlgorithm string
	// Value is the signature itself (PKCS#1 v1.5 for RSA, ASN.1 (r, s)
	// for ECDSA); AuthAttrs the DER of the authenticated attributes when
	// there are any (sign-file writes none).
	Value     []byte
	AuthAttrs []byte
	// PKCS7 is the whole DER message.
	PKCS7 []byte
}

// Signer names the signer for messages: "CN=… serial 0a1b…" or
// "subject key id 0a1b…".
func (s *Signature) Signer() string {
	if s.SubjectKeyID != nil {
		return "subject key id " + hex.EncodeToString(s.SubjectKeyID)
	}
	return fmt.Sprintf("%s serial %s", s.Issuer, hex.EncodeToString(s.RawSerial))
}

// Object identifiers of the PKCS#7 structures and algorithms.
var (
	oidData       = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidSignedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 2}
	oidRSA        = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 1}
	oidECDSA      = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3} // + .2 sha256, .3 sha384, .4 sha512; .1 alone is sha224
	oidECDSASHA1  = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 1}
	oidMsgDigest  = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 4}
	oidCT         = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 3}
)

// digests are the digest algorithms the kernel's PKCS#7 parser accepts
// that the standard library has.
var digests = []struct {
	name string
	oid  asn1.ObjectIdentifier
}{
	{"sha1", asn1.ObjectIdentifier{1, 3, 14, 3, 2, 26}},
	{"sha224", asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 4}},
	{"sha256", asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}},
	{"sha384", asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 2}},
	{"sha512", asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 3}},
}

func digestName(oid asn1.ObjectIdentifier) string {
	for _, d := range digests {
		if d.oid.Equal(oid) {
			return d.name
		}
	}
	return ""
}

func digestOID(name string) asn1.ObjectIdentifier {
	for _, d := range digests {
		if d.name == name {
			return d.oid
		}
	}
	return nil
}

// pkeyName is pkcs7_sig_note_pkey_algo: rsaEncryption, or ECDSA with any
// hash (the kernel takes the hash from the digest algorithm).
func pkeyName(oid asn1.ObjectIdentifier) string {
	switch {
	case oid.Equal(oidRSA):
		return "rsa"
	case oid.Equal(oidECDSASHA1):
		return "ecdsa"
	case len(oid) == len(oidECDSA)+1 && slicesEqual(oid[:len(oidECDSA)], oidECDSA) && oid[len(oidECDSA)] >= 1 && oid[len(oidECDSA)] <= 4:
		return "ecdsa"
	}
	return ""
}

func slicesEqual(a, b asn1.ObjectIdentifier) bool { return a.Equal(b) }

// Strip returns the module without its signature trailer, or the module
// itself when it has none. A trailer that is there but malformed is an
// error (ErrCorrupt): what follows the body cannot be told from it.
func Strip(module []byte) ([]byte, error) {
	body, _, err := split(module)
	if errors.Is(err, ErrUnsigned) {
		return module, nil
	}
	return body, err
}

// split separates body, PKCS#7 message and struct module_signature,
// checking the trailer as mod_check_sig does.
func split(module []byte) (body, msg []byte, err error) {
	if len(module) < len(Magic) || !bytes.HasSuffix(module, []byte(Magic)) {
		return nil, nil, ErrUnsigned
	}
	rest := module[:len(module)-len(Magic)]
	if len(rest) < infoSize {
		return nil, nil, fmt.Errorf("%w: %d bytes before the marker, struct module_signature alone is %d", ErrCorrupt, len(rest), infoSize)
	}
	info := rest[len(rest)-infoSize:]
	sigLen := uint64(binary.BigEndian.Uint32(info[8:]))
	// The kernel's own bound (mod_check_sig): the message and at least
	// one byte of module before it.
	if sigLen >= uint64(len(rest)-infoSize) {
		return nil, nil, fmt.Errorf("%w: sig_len %d, but only %d bytes precede struct module_signature", ErrCorrupt, sigLen, len(rest)-infoSize)
	}
	if info[2] != idPKCS7 {
		return nil, nil, fmt.Errorf("%w: id_type %d, the kernel accepts only PKCS#7 (%d)", ErrCorrupt, info[2], idPKCS7)
	}
	if info[0] != 0 || info[1] != 0 || info[3] != 0 || info[4] != 0 || info[5] != 0 || info[6] != 0 || info[7] != 0 {
		return nil, nil, fmt.Errorf("%w: struct module_signature has non-zero algo/hash/signer_len/key_id_len/pad % x, which the kernel refuses", ErrCorrupt, info[:8])
	}
	end := len(rest) - infoSize
	start := end - int(sigLen)
	return module[:start], module[start:end], nil
}

// Split separates a signed module into its body (the bytes that were
// signed) and its parsed signature. It never panics: every malformed
// input is ErrUnsigned or ErrCorrupt.
func Split(module []byte) ([]byte, *Signature, error) {
	body, msg, err := split(module)
	if err != nil {
		return nil, nil, err
	}
	sig, err := parsePKCS7(msg)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: PKCS#7: %v", ErrCorrupt, err)
	}
	return body, sig, nil
}

// der walks a DER sequence's elements one by one: encoding/asn1's
// struct decoding lets an optional RawValue swallow any element, so the
// optional fields of SignedData are read by hand.
type der struct{ rest []byte }

func (d *der) next(what string) (asn1.RawValue, error) {
	if len(d.rest) == 0 {
		return asn1.RawValue{}, fmt.Errorf("%s: missing", what)
	}
	var v asn1.RawValue
	rest, err := asn1.Unmarshal(d.rest, &v)
	if err != nil {
		return asn1.RawValue{}, fmt.Errorf("%s: %v", what, err)
	}
	d.rest = rest
	return v, nil
}

// peek says whether the next element has context-specific tag tag.
func (d *der) peek(tag int) bool {
	if len(d.rest) == 0 {
		return false
	}
	var v asn1.RawValue
	if _, err := asn1.Unmarshal(d.rest, &v); err != nil {
		return false
	}
	return v.Class == asn1.ClassContextSpecific && v.Tag == tag
}

func (d *der) end(what string) error {
	if len(d.rest) != 0 {
		return fmt.Errorf("%s: %d bytes of trailing data", what, len(d.rest))
	}
	return nil
}

func expect(v asn1.RawValue, class, tag int, what string) error {
	if v.Class != class || v.Tag != tag {
		return fmt.Errorf("%s: tag class %d number %d, want class %d number %d", what, v.Class, v.Tag, class, tag)
	}
	return nil
}

func seq(v asn1.RawValue, what string) (*der, error) {
	if err := expect(v, asn1.ClassUniversal, asn1.TagSequence, what); err != nil {
		return nil, err
	}
	return &der{v.Bytes}, nil
}

func parseOID(v asn1.RawValue, what string) (asn1.ObjectIdentifier, error) {
	var oid asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(v.FullBytes, &oid); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("%s: not an object identifier", what)
	}
	return oid, nil
}

// algorithm reads an AlgorithmIdentifier's OID (parameters, NULL or
// absent, are not looked at, as the kernel does not).
func algorithm(v asn1.RawValue, what string) (asn1.ObjectIdentifier, error) {
	d, err := seq(v, what)
	if err != nil {
		return nil, err
	}
	o, err := d.next(what + " algorithm")
	if err != nil {
		return nil, err
	}
	return parseOID(o, what)
}

func parsePKCS7(msg []byte) (*Signature, error) {
	var outer asn1.RawValue
	rest, err := asn1.Unmarshal(msg, &outer)
	if err != nil {
		return nil, fmt.Errorf("ContentInfo: %v", err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%d bytes after the message", len(rest))
	}
	ci, err := seq(outer, "ContentInfo")
	if err != nil {
		return nil, err
	}
	v, err := ci.next("ContentInfo type")
	if err != nil {
		return nil, err
	}
	oid, err := parseOID(v, "ContentInfo type")
	if err != nil {
		return nil, err
	}
	if !oid.Equal(oidSignedData) {
		return nil, fmt.Errorf("content type %v, want signedData", oid)
	}
	v, err = ci.next("ContentInfo content")
	if err != nil {
		return nil, err
	}
	if err := expect(v, asn1.ClassContextSpecific, 0, "ContentInfo content"); err != nil {
		return nil, err
	}
	if err := ci.end("ContentInfo"); err != nil {
		return nil, err
	}
	explicit := &der{v.Bytes}
	v, err = explicit.next("SignedData")
	if err != nil {
		return nil, err
	}
	if err := explicit.end("SignedData"); err != nil {
		return nil, err
	}
	sd, err := seq(v, "SignedData")
	if err != nil {
		return nil, err
	}
	var version int
	if v, err = sd.next("SignedData version"); err != nil {
		return nil, err
	}
	if _, err := asn1.Unmarshal(v.FullBytes, &version); err != nil {
		return nil, fmt.Errorf("SignedData version: %v", err)
	}
	if v, err = sd.next("SignedData digestAlgorithms"); err != nil {
		return nil, err
	}
	if err := expect(v, asn1.ClassUniversal, asn1.TagSet, "SignedData digestAlgorithms"); err != nil {
		return nil, err
	}
	// The content: the kernel supplies the module body as detached data
	// and refuses a message that carries content of its own, or content
	// of another type than data.
	if v, err = sd.next("SignedData contentInfo"); err != nil {
		return nil, err
	}
	inner, err := seq(v, "SignedData contentInfo")
	if err != nil {
		return nil, err
	}
	if v, err = inner.next("contentInfo type"); err != nil {
		return nil, err
	}
	if oid, err = parseOID(v, "contentInfo type"); err != nil {
		return nil, err
	}
	if !oid.Equal(oidData) {
		return nil, fmt.Errorf("signed content type %v, want data", oid)
	}
	if len(inner.rest) != 0 {
		return nil, errors.New("the message carries the signed content: a module signature is detached")
	}
	// Certificates [0] and CRLs [1] are optional; sign-file writes
	// neither, and the kernel trusts only its keyrings anyway.
	for _, tag := range []int{0, 1} {
		if sd.peek(tag) {
			if _, err := sd.next("SignedData certificates/crls"); err != nil {
				return nil, err
			}
		}
	}
	if v, err = sd.next("SignedData signerInfos"); err != nil {
		return nil, err
	}
	if err := expect(v, asn1.ClassUniversal, asn1.TagSet, "SignedData signerInfos"); err != nil {
		return nil, err
	}
	if err := sd.end("SignedData"); err != nil {
		return nil, err
	}
	infos := &der{v.Bytes}
	v, err = infos.next("SignerInfo")
	if err != nil {
		return nil, err
	}
	if len(infos.rest) != 0 {
		return nil, errors.New("more than one SignerInfo: sign-file writes one signer")
	}
	sig, err := parseSignerInfo(v)
	if err != nil {
		return nil, err
	}
	sig.PKCS7 = msg
	return sig, nil
}

func parseSignerInfo(v asn1.RawValue) (*Signature, error) {
	si, err := seq(v, "SignerInfo")
	if err != nil {
		return nil, err
	}
	sig := &Signature{}
	if v, err = si.next("SignerInfo version"); err != nil {
		return nil, err
	}
	var version int
	if _, err := asn1.Unmarshal(v.FullBytes, &version); err != nil {
		return nil, fmt.Errorf("SignerInfo version: %v", err)
	}
	if v, err = si.next("SignerInfo sid"); err != nil {
		return nil, err
	}
	switch {
	case v.Class == asn1.ClassUniversal && v.Tag == asn1.TagSequence:
		ias := &der{v.Bytes}
		iss, err := ias.next("issuer")
		if err != nil {
			return nil, err
		}
		if err := expect(iss, asn1.ClassUniversal, asn1.TagSequence, "issuer"); err != nil {
			return nil, err
		}
		var rdn pkix.RDNSequence
		if rest, err := asn1.Unmarshal(iss.FullBytes, &rdn); err != nil || len(rest) != 0 {
			return nil, fmt.Errorf("issuer: not an X.501 name")
		}
		var name pkix.Name
		name.FillFromRDNSequence(&rdn)
		sn, err := ias.next("serial number")
		if err != nil {
			return nil, err
		}
		if err := expect(sn, asn1.ClassUniversal, asn1.TagInteger, "serial number"); err != nil {
			return nil, err
		}
		if len(sn.Bytes) == 0 {
			return nil, errors.New("serial number: empty integer")
		}
		if err := ias.end("IssuerAndSerialNumber"); err != nil {
			return nil, err
		}
		sig.RawIssuer, sig.Issuer = iss.FullBytes, name.String()
		sig.RawSerial, sig.Serial = sn.Bytes, signedInt(sn.Bytes)
	case v.Class == asn1.ClassContextSpecific && v.Tag == 0 && !v.IsCompound:
		sig.SubjectKeyID = v.Bytes
		if sig.SubjectKeyID == nil {
			sig.SubjectKeyID = []byte{}
		}
	default:
		return nil, fmt.Errorf("SignerInfo sid: tag class %d number %d, want issuerAndSerialNumber or subjectKeyIdentifier", v.Class, v.Tag)
	}
	if v, err = si.next("SignerInfo digestAlgorithm"); err != nil {
		return nil, err
	}
	oid, err := algorithm(v, "SignerInfo digestAlgorithm")
	if err != nil {
		return nil, err
	}
	if sig.DigestAlgorithm = digestName(oid); sig.DigestAlgorithm == "" {
		return nil, fmt.Errorf("digest algorithm %v: not one the kernel and this program both support (sha1, sha224, sha256, sha384, sha512)", oid)
	}
	if si.peek(0) {
		if v, err = si.next("SignerInfo authenticatedAttributes"); err != nil {
			return nil, err
		}
		if !v.IsCompound {
			return nil, errors.New("SignerInfo authenticatedAttributes: not a constructed SET")
		}
		sig.AuthAttrs = v.FullBytes
	}
	if v, err = si.next("SignerInfo digestEncryptionAlgorithm"); err != nil {
		return nil, err
	}
	if oid, err = algorithm(v, "SignerInfo digestEncryptionAlgorithm"); err != nil {
		return nil, err
	}
	if sig.PublicKeyAlgorithm = pkeyName(oid); sig.PublicKeyAlgorithm == "" {
		return nil, fmt.Errorf("public key algorithm %v: not RSA or ECDSA", oid)
	}
	if v, err = si.next("SignerInfo encryptedDigest"); err != nil {
		return nil, err
	}
	if err := expect(v, asn1.ClassUniversal, asn1.TagOctetString, "SignerInfo encryptedDigest"); err != nil {
		return nil, err
	}
	if v.IsCompound || len(v.Bytes) == 0 {
		return nil, errors.New("SignerInfo encryptedDigest: empty or constructed")
	}
	sig.Value = v.Bytes
	if si.peek(1) {
		if _, err := si.next("SignerInfo unauthenticatedAttributes"); err != nil {
			return nil, err
		}
	}
	if err := si.end("SignerInfo"); err != nil {
		return nil, err
	}
	return sig, nil
}

// signedInt reads a DER INTEGER's content (two's complement, big endian).
func signedInt(b []byte) *big.Int {
	n := new(big.Int).SetBytes(b)
	if len(b) > 0 && b[0]&0x80 != 0 {
		n.Sub(n, new(big.Int).Lsh(big.NewInt(1), uint(len(b))*8))
	}
	return n
}

// readableName is pkix.Name's string, for messages.
func readableName(raw []byte) string {
	var rdn pkix.RDNSequence
	if rest, err := asn1.Unmarshal(raw, &rdn); err != nil || len(rest) != 0 {
		return "(unparsable name " + hex.EncodeToString(raw) + ")"
	}
	var n pkix.Name
	n.FillFromRDNSequence(&rdn)
	return n.String()
}
