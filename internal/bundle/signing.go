package bundle

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// Module signing. A repository may hold module-signing keys (kernel
// module signatures, modsign) next to its TUF role keys:
//
//	keys/module-signing/KEYID.key   PKCS#8 PEM private key, 0600 (never exported)
//	keys/module-signing/KEYID.der   its self-signed certificate
//	keys/module-signing/current     the KEYID that signs
//
// KEYID is the id the kernel gives the key (modsign.KeyID: its subject
// key identifier). Each key's certificate is published as the signed
// target signing/KEYID.der, so agents learn the fleet's certificates
// through the same TUF verification as patches; every bundle published
// while a key is current has its module signed with it.

// SigningDir is the targets directory of the published certificates.
const SigningDir = "signing"

// DefaultSigningSubject is the certificate's common name unless the
// operator gives one: what /proc/keys shows before the key id.
const DefaultSigningSubject = "Stitch module signing key"

// DefaultSigningValid is how long a new certificate is valid. The kernel
// does not look at a module-signing certificate's dates; the agent
// neither. Ten years, so that nothing expires under a fleet.
const DefaultSigningValid = 10 * 365 * 24 * time.Hour

// ErrNoSigningKey: the repository has no module-signing key.
var ErrNoSigningKey = errors.New("no module-signing key")

// SigningTarget is the target name of a certificate with key id keyID.
func SigningTarget(keyID string) string { return SigningDir + "/" + keyID + ".der" }

// isSigningTarget says whether a target name is a published certificate.
func isSigningTarget(name string) bool {
	id, ok := strings.CutPrefix(name, SigningDir+"/")
	return ok && strings.HasSuffix(id, ".der") && !strings.Contains(id, "/")
}

// SigningKey is one module-signing key of a repository.
type SigningKey struct {
	KeyID string `json:"key_id"`
	// Description is the kernel's name for the key (/proc/keys, keyctl):
	// what `stitch status` looks for on a machine.
	Description string    `json:"description"`
	Subject     string    `json:"subject"`
	Algorithm   string    `json:"algorithm"` // rsa or ecdsa
	NotAfter    time.Time `json:"not_after"`
	// Current: bundles published now are signed with this key.
	Current bool `json:"current"`
	// Target is the certificate's published target name; empty once the
	// key is retired (agents no longer trust it).
	Target string `json:"target,omitempty"`
	// Cert is the certificate's file (DER), what `mokutil --import` takes.
	Cert string `json:"cert"`

	cert *x509.Certificate
}

func (r *Repo) signingDir() string { return filepath.Join(r.keysDir(), "module-signing") }

func (r *Repo) signingPath(keyID, ext string) string {
	return filepath.Join(r.signingDir(), keyID+ext)
}

// InitSigning creates the repository's first module-signing key (alg
// modsign.RSA or modsign.ECDSA), makes it current and publishes its
// certificate. It refuses a repository that has one already.
func (r *Repo) InitSigning(alg, subject string, valid time.Duration) (*SigningKey, error) {
	return r.addSigningKey(alg, subject, valid, false)
}

// RotateSigning adds a new module-signing key and publishes its
// certificate next to the current one, which keeps signing until
// UseSigning switches: machines enroll the new certificate meanwhile,
// and agents trust both.
func (r *Repo) RotateSigning(alg, subject string, valid time.Duration) (*SigningKey, error) {
	return r.addSigningKey(alg, subject, valid, true)
}

func (r *Repo) addSigningKey(alg, subject string, valid time.Duration, rotate bool) (*SigningKey, error) {
	op := "signing init"
	if rotate {
		op = "signing rotate"
	}
	if subject == "" {
		subject = DefaultSigningSubject
	}
	if valid == 0 {
		valid = DefaultSigningValid
	}
	unlock, err := r.lock()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	cur, err := r.currentSigning()
	switch {
	case err == nil && !rotate:
		return nil, fmt.Errorf("%s: %w: %s signs this repository's modules already (see `stitch keys signing list`; `stitch keys signing rotate` adds another)", op, ErrExists, cur)
	case errors.Is(err, ErrNoSigningKey) && rotate:
		return nil, fmt.Errorf("%s: %w: nothing to rotate; create the first with `stitch keys signing init`", op, err)
	case err != nil && !errors.Is(err, ErrNoSigningKey):
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := r.makeKeysDir(); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := os.MkdirAll(r.signingDir(), 0o700); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	key, cert, err := modsign.NewKey(alg, subject, r.now().Add(valid))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	id := modsign.KeyID(cert)
	if err := modsign.WriteKey(r.signingPath(id, ".key"), key); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := modsign.WriteCert(r.signingPath(id, ".der"), cert); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	// Published before it signs anything: an agent must never see a
	// module signed by a key whose certificate it cannot fetch.
	name := SigningTarget(id)
	tf, err := metadata.TargetFile().FromBytes(name, cert.Raw, "sha256")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := r.writeTarget(name, cert.Raw); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	st.targets.Signed.Targets[name] = tf
	if err := r.cascade(st, metadata.TARGETS); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if !rotate {
		if err := r.setCurrentSigning(id); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	return r.signingKeyInfo(id, st)
}

// UseSigning makes keyID the key that signs from now on. Its certificate
// must be published (not retired).
func (r *Repo) UseSigning(keyID string) (*SigningKey, error) {
	unlock, err := r.lock()
	if err != nil {
		return nil, fmt.Errorf("signing use: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return nil, fmt.Errorf("signing use: %w", err)
	}
	k, err := r.signingKeyInfo(keyID, st)
	if err != nil {
		return nil, fmt.Errorf("signing use: %w", err)
	}
	if k.Target == "" {
		return nil, fmt.Errorf("signing use: key %s is retired (its certificate is no longer published, agents refuse what it signs)", keyID)
	}
	if _, err := modsign.ReadKey(r.signingPath(keyID, ".key")); err != nil {
		return nil, fmt.Errorf("signing use: %w", err)
	}
	if err := r.setCurrentSigning(keyID); err != nil {
		return nil, fmt.Errorf("signing use: %w", err)
	}
	k.Current = true
	return k, nil
}

// RetireSigning unpublishes keyID's certificate, so agents no longer
// trust modules it signed. It refuses the current key, and a key that
// still signs published bundles unless force (those bundles would then
// be refused by every agent: publish them again first, which signs them
// with the current key). It returns those bundles' target names. The key
// files stay in the keys directory; the key never signs again.
func (r *Repo) RetireSigning(keyID string, force bool) ([]string, error) {
	unlock, err := r.lock()
	if err != nil {
		return nil, fmt.Errorf("signing retire: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return nil, fmt.Errorf("signing retire: %w", err)
	}
	k, err := r.signingKeyInfo(keyID, st)
	if err != nil {
		return nil, fmt.Errorf("signing retire: %w", err)
	}
	if k.Current {
		return nil, fmt.Errorf("signing retire: %s is the key that signs: switch first with `stitch keys signing use KEYID` (after `stitch keys signing rotate`)", keyID)
	}
	if k.Target == "" {
		return nil, fmt.Errorf("signing retire: %s is retired already", keyID)
	}
	var still []string
	for name := range st.targets.Signed.Targets {
		if !strings.HasSuffix(name, ".stitch") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(r.TargetsDir(), filepath.FromSlash(name)))
		if err != nil {
			continue
		}
		b, err := Open(data)
		if err != nil {
			continue
		}
		if c, err := modsign.Verify(b.Module, []*x509.Certificate{k.cert}); err == nil && c != nil {
			still = append(still, name)
		}
	}
	slices.Sort(still)
	if len(still) > 0 && !force {
		return still, fmt.Errorf("signing retire: %d published bundle(s) are signed by %s and agents would refuse them: publish them again (they are signed with the current key; `stitch repo list`) or retire with --force: %s",
			len(still), keyID, strings.Join(still, " "))
	}
	delete(st.targets.Signed.Targets, k.Target)
	if err := r.cascade(st, metadata.TARGETS); err != nil {
		return nil, fmt.Errorf("signing retire: %w", err)
	}
	return still, nil
}

// SigningKeys lists the repository's module-signing keys, the current
// one first, then by expiry.
func (r *Repo) SigningKeys() ([]SigningKey, error) {
	t, err := r.loadTargets()
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(r.signingDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("signing keys: %w", err)
	}
	var out []SigningKey
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".der")
		if !ok {
			continue
		}
		k, err := r.signingKeyInfo(id, &state{targets: t})
		if err != nil {
			return nil, err
		}
		out = append(out, *k)
	}
	slices.SortStableFunc(out, func(a, b SigningKey) int {
		switch {
		case a.Current != b.Current:
			if a.Current {
				return -1
			}
			return 1
		}
		return a.NotAfter.Compare(b.NotAfter)
	})
	return out, nil
}

// setCurrentSigning makes keyID the one in `current`: the key that signs.
func (r *Repo) setCurrentSigning(keyID string) error {
	return writeFileAtomic(filepath.Join(r.signingDir(), "current"), []byte(keyID+"\n"), 0o600)
}

// currentSigning is the key id in `current`, or ErrNoSigningKey.
func (r *Repo) currentSigning() (string, error) {
	b, err := os.ReadFile(filepath.Join(r.signingDir(), "current"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", ErrNoSigningKey
	}
	if err != nil {
		return "", fmt.Errorf("module-signing key: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func (r *Repo) signingKeyInfo(id string, st *state) (*SigningKey, error) {
	if id == "" || strings.ContainsAny(id, "/\\") || id != filepath.Base(id) {
		return nil, fmt.Errorf("%w: key id %q", ErrNotFound, id)
	}
	p := r.signingPath(id, ".der")
	cert, err := modsign.ReadCert(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: module-signing key %s in %s (see `stitch keys signing list`)", ErrNotFound, id, r.signingDir())
	}
	if err != nil {
		return nil, err
	}
	cur, _ := r.currentSigning()
	k := &SigningKey{KeyID: id, Description: modsign.KeyDescription(cert), Subject: cert.Subject.String(),
		Algorithm: algorithmName(cert), NotAfter: cert.NotAfter, Current: id == cur, Cert: p, cert: cert}
	if _, ok := st.targets.Signed.Targets[SigningTarget(id)]; ok {
		k.Target = SigningTarget(id)
	}
	return k, nil
}

func algorithmName(c *x509.Certificate) string {
	switch c.PublicKeyAlgorithm {
	case x509.RSA:
		return modsign.RSA
	case x509.ECDSA:
		return modsign.ECDSA
	}
	return c.PublicKeyAlgorithm.String()
}

// moduleSigner is the current key and certificate, or nil, nil when the
// repository signs no modules.
func (r *Repo) moduleSigner() (crypto.Signer, *x509.Certificate, error) {
	id, err := r.currentSigning()
	if errors.Is(err, ErrNoSigningKey) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	if err := r.checkKeysDir(); err != nil {
		return nil, nil, err
	}
	key, err := modsign.ReadKey(r.signingPath(id, ".key"))
	if err != nil {
		return nil, nil, fmt.Errorf("module-signing key %s: %w (is the key directory of this repository here? --keys DIR)", id, err)
	}
	cert, err := modsign.ReadCert(r.signingPath(id, ".der"))
	if err != nil {
		return nil, nil, fmt.Errorf("module-signing key %s: %w", id, err)
	}
	return key, cert, nil
}

// signBundle gives the bundle again with its module signed by key: the
// manifest's module_sha256 becomes the signed module's, so the bundle's
// hash and target name cover the signature. modsign.Sign is
// deterministic, so the same bundle published twice gives the same bytes.
func signBundle(b *Bundle, key crypto.Signer, cert *x509.Certificate) ([]byte, error) {
	signed, err := modsign.Sign(b.Module, key, cert)
	if err != nil {
		return nil, fmt.Errorf("%w: module %s: %w", ErrBadBundle, b.Manifest.Module, err)
	}
	m := b.Manifest
	m.ModuleHash = ""
	return Pack(m, signed)
}

// SigningCerts fetches the repository's published module-signing
// certificates through TUF (signed length and hash, like a bundle). None
// means the repository does not sign modules.
func (c *Client) SigningCerts(ctx context.Context) ([]*x509.Certificate, error) {
	up, err := c.updater(ctx)
	if err != nil {
		return nil, fmt.Errorf("signing certificates: %w", err)
	}
	var certs []*x509.Certificate
	for name := range up.GetTopLevelTargets() {
		if !isSigningTarget(name) {
			continue
		}
		data, _, err := c.downloadWith(up, name)
		if err != nil {
			return nil, fmt.Errorf("signing certificate %s: %w", name, err)
		}
		cert, err := modsign.ParseCert(data)
		if err != nil {
			return nil, fmt.Errorf("signing certificate %s: %w: %v", name, ErrBadBundle, err)
		}
		certs = append(certs, cert)
	}
	slices.SortFunc(certs, func(a, b *x509.Certificate) int { return bytes.Compare(a.Raw, b.Raw) })
	return certs, nil
}
