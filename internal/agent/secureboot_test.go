package agent

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/modsign"
)

// TestSigningStatus: the kept fleet certificates judged against a
// kernel's policy and keys, and what status and enroll make of it.
func TestSigningStatus(t *testing.T) {
	var certs []*x509.Certificate
	for _, name := range []string{"Fleet key A", "Fleet key B"} {
		_, c, err := modsign.NewKey(modsign.ECDSA, name, time.Now().Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	a := &Agent{Dir: t.TempDir()}
	lockdown := &livepatch.Signing{SecureBoot: true, Lockdown: "integrity", Keys: []string{"Debian Secure Boot CA: 6ccece7e"}}

	// Before the repository signs anything: a locked-down kernel cannot
	// load the fleet's patches, and status says why.
	s, err := a.Signing(lockdown)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Required || s.Trusted || !strings.Contains(s.Blocked(), "signs none") {
		t.Errorf("no fleet keys under lockdown: %+v, %q", s, s.Blocked())
	}
	if s, _ := a.Signing(&livepatch.Signing{Lockdown: "none"}); s.Blocked() != "" {
		t.Errorf("no lockdown: blocked %q", s.Blocked())
	}

	// Two keys kept (a rotation's overlap), neither enrolled.
	if err := a.keepSigningCerts(certs); err != nil {
		t.Fatal(err)
	}
	s, err = a.Signing(lockdown)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Keys) != 2 || s.Trusted || !strings.Contains(s.Blocked(), "mokutil --import "+filepath.Join(a.Dir, "signing")) {
		t.Errorf("keys not enrolled: %+v, %q", s, s.Blocked())
	}
	// The kernel holds B: trusted, not blocked.
	lockdown.Keys = append(lockdown.Keys, modsign.KeyDescription(certs[1]))
	s, _ = a.Signing(lockdown)
	if !s.Trusted || s.Blocked() != "" {
		t.Errorf("key B enrolled: %+v, %q", s, s.Blocked())
	}
	for _, k := range s.Keys {
		if k.Trusted != (k.KeyID == modsign.KeyID(certs[1])) {
			t.Errorf("key %s trusted = %v", k.Subject, k.Trusted)
		}
		if _, err := os.Stat(k.File); err != nil {
			t.Errorf("kept certificate: %v", err)
		}
	}
	// A retired key's certificate is dropped from the kept set.
	if err := a.keepSigningCerts(certs[1:]); err != nil {
		t.Fatal(err)
	}
	if s, _ := a.Signing(lockdown); len(s.Keys) != 1 || s.Keys[0].KeyID != modsign.KeyID(certs[1]) {
		t.Errorf("after retiring A: %+v", s.Keys)
	}
}
