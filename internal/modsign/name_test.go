package modsign

import (
	"crypto/x509/pkix"
	"encoding/asn1"
	"testing"
)

// TestFabricateName holds fabricateName to the kernel's
// x509_fabricate_name (crypto/asymmetric_keys/x509_cert_parser.c).
func TestFabricateName(t *testing.T) {
	cn := func(s string) pkix.AttributeTypeAndValue { return pkix.AttributeTypeAndValue{Type: oidCN, Value: s} }
	o := func(s string) pkix.AttributeTypeAndValue { return pkix.AttributeTypeAndValue{Type: oidO, Value: s} }
	email := func(s string) pkix.AttributeTypeAndValue {
		return pkix.AttributeTypeAndValue{Type: oidEmail, Value: asn1.RawValue{Tag: asn1.TagIA5String, Bytes: []byte(s)}}
	}
	ou := pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 5, 4, 11}, Value: "Unit"}
	for _, tc := range []struct {
		name []pkix.AttributeTypeAndValue
		want string
	}{
		{nil, ""},
		{[]pkix.AttributeTypeAndValue{cn("Stitch module signing")}, "Stitch module signing"},
		{[]pkix.AttributeTypeAndValue{o("Example Corp"), cn("Fleet key")}, "Example Corp: Fleet key"},
		// CN begins with O: CN alone.
		{[]pkix.AttributeTypeAndValue{o("Stitch"), cn("Stitch signing key")}, "Stitch signing key"},
		// The same first 7 bytes: CN alone.
		{[]pkix.AttributeTypeAndValue{o("Debian Secure Boot CA"), cn("Debian Secure Boot Signer 2022")}, "Debian Secure Boot Signer 2022"},
		// Shorter than 7: combined.
		{[]pkix.AttributeTypeAndValue{o("ACME"), cn("ACM")}, "ACME: ACM"},
		{[]pkix.AttributeTypeAndValue{o("Only Org"), ou}, "Only Org"},
		{[]pkix.AttributeTypeAndValue{email("a@example.org"), ou}, "a@example.org"},
		{[]pkix.AttributeTypeAndValue{email("a@example.org"), cn("Key")}, "Key"},
		// The last CN wins, as the kernel overwrites it.
		{[]pkix.AttributeTypeAndValue{cn("First"), cn("Second")}, "Second"},
		{[]pkix.AttributeTypeAndValue{ou}, ""},
	} {
		var rdn pkix.RDNSequence
		for _, a := range tc.name {
			rdn = append(rdn, pkix.RelativeDistinguishedNameSET{a})
		}
		raw, err := asn1.Marshal(rdn)
		if err != nil {
			t.Fatal(err)
		}
		if got := fabricateName(raw); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.name, got, tc.want)
		}
	}
}
