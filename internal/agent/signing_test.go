package agent_test

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/modsign"
)

// TestModuleSignerChecked: once the repository signs modules (and so
// publishes its certificates as signed targets), the agent loads only
// modules one of the fleet's certificates signed; an unsigned module and
// one signed by a retired key are refused with the reason and the fix,
// and nothing of them is loaded.
func TestModuleSignerChecked(t *testing.T) {
	f, m := enrolled(t)
	unsigned := f.fix(t, "fix_unsigned") // published before the repository had a key
	a, err := f.repo.InitSigning(modsign.ECDSA, "Fleet key A", 0)
	if err != nil {
		t.Fatal(err)
	}
	byA := f.fix(t, "fix_by_a")
	m.pass(t)

	if !m.k.isLoaded("fix_by_a") {
		t.Fatal("the module signed by the fleet's key was not loaded")
	}
	cert, err := modsign.ReadCert(a.Cert)
	if err != nil {
		t.Fatal(err)
	}
	ko, err := os.ReadFile(filepath.Join(m.Dir, "modules", "fix_by_a.ko"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := modsign.Verify(ko, []*x509.Certificate{cert}); err != nil {
		t.Fatalf("the module handed to the kernel: %v", err)
	}
	if p := m.state(t, byA); p.State != contract.StateApplied {
		t.Fatalf("fix_by_a: %+v", p)
	}
	p := m.state(t, unsigned)
	if m.k.isLoaded("fix_unsigned") || p == nil || p.State != contract.StateRefused || p.Reason != contract.ReasonVerifyFailed ||
		!strings.Contains(p.Detail, "not signed") || !strings.Contains(p.Detail, "stitch publish") {
		t.Fatalf("unsigned module: loaded %v, state %+v", m.k.isLoaded("fix_unsigned"), p)
	}
	if r := f.patch(unsigned); r.Failed != 1 {
		t.Errorf("the server sees %+v for the unsigned module, want 1 failed", r)
	}

	// Key B takes over and A is retired: what A signed is refused by a
	// new machine, what B signs loads.
	b, err := f.repo.RotateSigning(modsign.ECDSA, "Fleet key B", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.repo.UseSigning(b.KeyID); err != nil {
		t.Fatal(err)
	}
	if _, err := f.repo.RetireSigning(a.KeyID, true); err != nil {
		t.Fatal(err)
	}
	byB := f.fix(t, "fix_by_b")
	m2 := newMachine(t)
	m2.enroll(t, f)
	m2.pass(t)
	if !m2.k.isLoaded("fix_by_b") {
		t.Fatalf("the module signed by key B was not loaded: %+v", m2.state(t, byB))
	}
	p = m2.state(t, byA)
	if m2.k.isLoaded("fix_by_a") || p == nil || p.State != contract.StateRefused ||
		!strings.Contains(p.Detail, "signed by CN=Fleet key A serial") || !strings.Contains(p.Detail, "none of the 1 trusted certificates (Fleet key B: "+b.KeyID+")") {
		t.Fatalf("module of the retired key: loaded %v, state %+v", m2.k.isLoaded("fix_by_a"), p)
	}
	if _, err := os.Stat(filepath.Join(m2.Dir, "modules", "fix_by_a.ko")); err == nil {
		t.Error("the refused module was written for loading")
	}
}
