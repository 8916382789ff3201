package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/modsign"
)

// The agent keeps the fleet's module-signing certificates as it last
// fetched them through TUF, DER, one file per key (KEYID.der): status
// reads them without a network, and an operator enrolls them in the
// machine's firmware from there (mokutil --import takes DER).
const signingDir = "signing"

// keepSigningCerts makes the kept certificates exactly certs.
func (a *Agent) keepSigningCerts(certs []*x509.Certificate) error {
	dir := a.path(signingDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	want := map[string]bool{}
	for _, c := range certs {
		name := modsign.KeyID(c) + ".der"
		want[name] = true
		if old, err := os.ReadFile(filepath.Join(dir, name)); err == nil && string(old) == string(c.Raw) {
			continue
		}
		if err := writeFile(filepath.Join(dir, name), c.Raw, 0o644); err != nil {
			return err
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !want[e.Name()] {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	return nil
}

// FleetKey is one of the fleet's module-signing certificates as this
// machine's kernel sees it.
type FleetKey struct {
	KeyID   string `json:"key_id"`
	Subject string `json:"subject"`
	File    string `json:"file"`    // the kept DER certificate
	Trusted bool   `json:"trusted"` // the running kernel holds its key
}

// SigningStatus says whether the running kernel would load the fleet's
// signed patches.
type SigningStatus struct {
	Required bool       `json:"required"`         // the kernel loads only signed modules
	Policy   string     `json:"policy,omitempty"` // why
	Keys     []FleetKey `json:"fleet_keys"`       // empty: the repository signs no modules
	// Trusted: the kernel holds one of the fleet's keys, so signed
	// patches load.
	Trusted bool `json:"trusted"`
}

// Signing judges the kept fleet certificates against the kernel's
// policy and keys ks (nil: unknown, judged as not required).
func (a *Agent) Signing(ks *livepatch.Signing) (*SigningStatus, error) {
	out := &SigningStatus{Keys: []FleetKey{}}
	if ks != nil && ks.Required() {
		out.Required, out.Policy = true, ks.Policy()
	}
	dir := a.path(signingDir)
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".der") {
			continue
		}
		file := filepath.Join(dir, e.Name())
		c, err := modsign.ReadCert(file)
		if err != nil {
			return nil, err
		}
		k := FleetKey{KeyID: modsign.KeyID(c), Subject: c.Subject.String(), File: file, Trusted: ks != nil && ks.Trusts(c)}
		out.Trusted = out.Trusted || k.Trusted
		out.Keys = append(out.Keys, k)
	}
	slices.SortFunc(out.Keys, func(x, y FleetKey) int { return strings.Compare(x.KeyID, y.KeyID) })
	return out, nil
}

// Blocked says why the kernel would refuse the fleet's patches for their
// signature, or "" if it would not.
func (s *SigningStatus) Blocked() string {
	if !s.Required || s.Trusted {
		return ""
	}
	if len(s.Keys) == 0 {
		return fmt.Sprintf("the kernel loads only signed modules (%s) and the patch repository signs none (stitch keys signing init on the repository)", s.Policy)
	}
	return fmt.Sprintf("the kernel loads only signed modules (%s) and does not trust the fleet's module-signing certificate: enroll it (stitch agent enroll --help; mokutil --import %s)", s.Policy, s.Keys[0].File)
}

// MOKSteps are what an operator does, once per machine, so that the
// kernel trusts the certificate file: enroll it as a Machine Owner Key
// through shim's MokManager, which asks for confirmation on the console
// at the next boot (firmware keys cannot be changed from a running
// system without the owner's say).
func MOKSteps(file string) []string {
	return []string{
		"mokutil --import " + file + "   (choose a one-time password; --root-pw uses root's instead)",
		"reboot; at the blue MokManager screen choose Enroll MOK, Continue, Yes, type that password, then Reboot",
		`stitch status then says "signing key trusted: yes"`,
	}
}

// ImportMOK asks shim to enroll the certificate file at the next boot,
// with root's password as the one-time password so that nothing is
// asked now: the unattended half of MOKSteps. Someone still confirms it
// on the console at the next boot.
func ImportMOK(ctx context.Context, file string) error {
	bin, err := exec.LookPath("mokutil")
	if err != nil {
		return fmt.Errorf("import %s as a Machine Owner Key: mokutil not found (apt-get install mokutil)", file)
	}
	out, err := exec.CommandContext(ctx, bin, "--import", file, "--root-pw").CombinedOutput()
	if err != nil {
		return fmt.Errorf("mokutil --import %s: %w: %s", file, err, strings.TrimSpace(string(out)))
	}
	return nil
}
