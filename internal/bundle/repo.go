package bundle

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// Roles are TUF's four top-level roles, each with its own ed25519 key so the
// online timestamp key can be rotated without touching the offline root key.
var Roles = []string{metadata.ROOT, metadata.TARGETS, metadata.SNAPSHOT, metadata.TIMESTAMP}

// Expiries says how long each role's metadata stays valid after signing.
// Short timestamp expiry is what makes frozen metadata detectable: an agent
// refuses a timestamp older than this, so `stitch repo refresh` must run
// more often than Timestamp.
type Expiries struct {
	Root, Targets, Snapshot, Timestamp time.Duration
}

// DefaultExpiries: root a year (offline key), targets 90 days, snapshot a
// week, timestamp a day.
var DefaultExpiries = Expiries{Root: 365 * 24 * time.Hour, Targets: 90 * 24 * time.Hour, Snapshot: 7 * 24 * time.Hour, Timestamp: 24 * time.Hour}

// Repo is a TUF repository on disk:
//
//	keys/<role>.key        ed25519 seed, hex, mode 0600 (never exported)
//	metadata/<role>.json   current metadata; metadata/N.root.json every root version
//	targets/<name>         bundles
type Repo struct {
	Dir      string
	Now      func() time.Time // injectable for tests; time.Now when nil
	Expiries Expiries
}

func (r *Repo) now() time.Time {
	if r.Now != nil {
		return r.Now().UTC()
	}
	return time.Now().UTC()
}

func (r *Repo) exp() Expiries {
	if r.Expiries == (Expiries{}) {
		return DefaultExpiries
	}
	return r.Expiries
}

func (r *Repo) metaPath(name string) string { return filepath.Join(r.Dir, "metadata", name) }
func (r *Repo) keyPath(role string) string  { return filepath.Join(r.Dir, "keys", role+".key") }

// MetadataDir and TargetsDir are what a server serves.
func (r *Repo) MetadataDir() string { return filepath.Join(r.Dir, "metadata") }
func (r *Repo) TargetsDir() string  { return filepath.Join(r.Dir, "targets") }

// Init creates a new repository with a fresh key per role. It refuses a
// directory that already holds one.
func (r *Repo) Init() error {
	if _, err := os.Stat(r.metaPath("root.json")); err == nil {
		return fmt.Errorf("init %s: %w: a repository is already there (use `stitch keys rotate` to change keys)", r.Dir, ErrExists)
	}
	for _, d := range []string{"keys", "metadata", "targets"} {
		mode := os.FileMode(0o755)
		if d == "keys" {
			mode = 0o700
		}
		if err := os.MkdirAll(filepath.Join(r.Dir, d), mode); err != nil {
			return fmt.Errorf("init %s: %w", r.Dir, err)
		}
	}
	now, e := r.now(), r.exp()
	root := metadata.Root(now.Add(e.Root))
	// Plain file names: the server replaces metadata atomically, so consistent
	// snapshots (hash-prefixed copies) are not needed.
	root.Signed.ConsistentSnapshot = false
	for _, role := range Roles {
		if _, err := r.newKey(role, &root.Signed); err != nil {
			return fmt.Errorf("init %s: %w", r.Dir, err)
		}
	}
	if err := r.signRoot(root, nil); err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	targets := metadata.Targets(now.Add(e.Targets))
	if err := r.writeTargets(targets); err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	return nil
}

// newKey makes a key for role, stores its seed and puts it in root in place
// of the role's previous keys.
func (r *Repo) newKey(role string, root *metadata.RootType) (ed25519.PrivateKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	key, err := metadata.KeyFromPublicKey(pub)
	if err != nil {
		return nil, err
	}
	for _, id := range slices.Clone(root.Roles[role].KeyIDs) {
		if err := root.RevokeKey(id, role); err != nil {
			return nil, err
		}
	}
	if err := root.AddKey(key, role); err != nil {
		return nil, err
	}
	tmp := r.keyPath(role) + ".new"
	if err := os.WriteFile(tmp, []byte(hex.EncodeToString(priv.Seed())+"\n"), 0o600); err != nil {
		return nil, err
	}
	return priv, nil
}

// commitKey replaces role's key file with the one newKey wrote, after the
// metadata that trusts it is on disk.
func (r *Repo) commitKey(role string) error {
	return os.Rename(r.keyPath(role)+".new", r.keyPath(role))
}

func (r *Repo) loadKey(role string) (signature.Signer, error) {
	b, err := os.ReadFile(r.keyPath(role))
	if err != nil {
		return nil, fmt.Errorf("%w: key for %s: %v (is this a repository made by `stitch repo init`?)", ErrNoRepo, role, err)
	}
	seed, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("key %s: not a hex ed25519 seed", r.keyPath(role))
	}
	return signature.LoadED25519Signer(ed25519.NewKeyFromSeed(seed))
}

// signRoot signs root with its role's new key (and old, when rotating root:
// clients accept a new root only if the previous root's keys signed it) and
// writes root.json and N.root.json, then the other keys' new files.
func (r *Repo) signRoot(root *metadata.Metadata[metadata.RootType], oldRoot signature.Signer) error {
	root.ClearSignatures()
	signers := []signature.Signer{}
	if oldRoot != nil {
		signers = append(signers, oldRoot)
	}
	for _, role := range Roles {
		if _, err := os.Stat(r.keyPath(role) + ".new"); err == nil {
			if err := r.commitKey(role); err != nil {
				return err
			}
		}
	}
	s, err := r.loadKey(metadata.ROOT)
	if err != nil {
		return err
	}
	signers = append(signers, s)
	for _, s := range signers {
		if _, err := root.Sign(s); err != nil {
			return fmt.Errorf("sign root: %w", err)
		}
	}
	if err := writeMeta(root, r.metaPath(fmt.Sprintf("%d.root.json", root.Signed.Version))); err != nil {
		return err
	}
	return writeMeta(root, r.metaPath("root.json"))
}

// writeMeta writes through a temporary file and rename, so a server reading
// the directory never sees half a file.
func writeMeta[T metadata.Roles](md *metadata.Metadata[T], path string) error {
	b, err := md.ToBytes(true)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func (r *Repo) sign(md interface {
	Sign(signature.Signer) (*metadata.Signature, error)
	ClearSignatures()
}, role string) error {
	s, err := r.loadKey(role)
	if err != nil {
		return err
	}
	md.ClearSignatures()
	_, err = md.Sign(s)
	return err
}

// writeTargets signs targets and then a new snapshot and timestamp over it.
func (r *Repo) writeTargets(t *metadata.Metadata[metadata.TargetsType]) error {
	if err := r.sign(t, metadata.TARGETS); err != nil {
		return err
	}
	if err := writeMeta(t, r.metaPath("targets.json")); err != nil {
		return err
	}
	return r.writeSnapshot(t.Signed.Version)
}

func (r *Repo) writeSnapshot(targetsVersion int64) error {
	now, e := r.now(), r.exp()
	snap := metadata.Snapshot(now.Add(e.Snapshot))
	if old, err := metadata.Snapshot().FromFile(r.metaPath("snapshot.json")); err == nil {
		snap.Signed.Version = old.Signed.Version + 1
	}
	snap.Signed.Meta["targets.json"] = metadata.MetaFile(targetsVersion)
	if err := r.sign(snap, metadata.SNAPSHOT); err != nil {
		return err
	}
	if err := writeMeta(snap, r.metaPath("snapshot.json")); err != nil {
		return err
	}
	return r.writeTimestamp(snap.Signed.Version)
}

func (r *Repo) writeTimestamp(snapVersion int64) error {
	now, e := r.now(), r.exp()
	ts := metadata.Timestamp(now.Add(e.Timestamp))
	if old, err := metadata.Timestamp().FromFile(r.metaPath("timestamp.json")); err == nil {
		ts.Signed.Version = old.Signed.Version + 1
	}
	ts.Signed.Meta["snapshot.json"] = metadata.MetaFile(snapVersion)
	if err := r.sign(ts, metadata.TIMESTAMP); err != nil {
		return err
	}
	return writeMeta(ts, r.metaPath("timestamp.json"))
}

func (r *Repo) loadTargets() (*metadata.Metadata[metadata.TargetsType], error) {
	t, err := metadata.Targets().FromFile(r.metaPath("targets.json"))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v (run `stitch repo init` first)", ErrNoRepo, r.Dir, err)
	}
	return t, nil
}

// Publish checks a bundle, stores it under its content-addressed target name
// and signs new targets, snapshot and timestamp metadata. It returns the
// target name. Publishing the same bytes again is a no-op.
func (r *Repo) Publish(data []byte) (string, error) {
	b, err := Open(data)
	if err != nil {
		return "", fmt.Errorf("publish: %w", err)
	}
	t, err := r.loadTargets()
	if err != nil {
		return "", fmt.Errorf("publish: %w", err)
	}
	name := TargetName(&b.Manifest, data)
	if _, ok := t.Signed.Targets[name]; ok {
		return name, nil
	}
	tf, err := metadata.TargetFile().FromBytes(name, data, "sha256")
	if err != nil {
		return "", fmt.Errorf("publish %s: %w", name, err)
	}
	path := filepath.Join(r.TargetsDir(), filepath.FromSlash(name))
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", fmt.Errorf("publish %s: %w", name, err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return "", fmt.Errorf("publish %s: %w", name, err)
	}
	t.Signed.Targets[name] = tf
	t.Signed.Version++
	t.Signed.Expires = r.now().Add(r.exp().Targets)
	if err := r.writeTargets(t); err != nil {
		return "", fmt.Errorf("publish %s: %w", name, err)
	}
	return name, nil
}

// Targets lists the published target names, sorted.
func (r *Repo) Targets() ([]string, error) {
	t, err := r.loadTargets()
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(t.Signed.Targets))
	for n := range t.Signed.Targets {
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// Refresh re-signs snapshot and timestamp with new expiry dates. Run it
// (e.g. hourly from a timer) so that agents do not see stale metadata.
func (r *Repo) Refresh() error {
	t, err := r.loadTargets()
	if err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	if t.Signed.Expires.Before(r.now().Add(r.exp().Targets / 2)) {
		// Targets also expire; extend them when half their life is gone.
		t.Signed.Version++
		t.Signed.Expires = r.now().Add(r.exp().Targets)
		return r.writeTargets(t)
	}
	return r.writeSnapshot(t.Signed.Version)
}

// RotateKey replaces role's key: root gets a new version listing the new
// key (signed by the old and new root keys when role is root) and the
// role's metadata is signed again with the new key.
func (r *Repo) RotateKey(role string) error {
	if !slices.Contains(Roles, role) {
		return fmt.Errorf("rotate: %w: role %q, want one of %s", ErrBadBundle, role, strings.Join(Roles, ", "))
	}
	root, err := metadata.Root().FromFile(r.metaPath("root.json"))
	if err != nil {
		return fmt.Errorf("rotate %s: %w: %v", role, ErrNoRepo, err)
	}
	var oldRoot signature.Signer
	if role == metadata.ROOT {
		if oldRoot, err = r.loadKey(metadata.ROOT); err != nil {
			return fmt.Errorf("rotate %s: %w", role, err)
		}
	}
	if _, err := r.newKey(role, &root.Signed); err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	root.Signed.Version++
	root.Signed.Expires = r.now().Add(r.exp().Root)
	if err := r.signRoot(root, oldRoot); err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	// Re-sign everything below root: a new key for any role invalidates
	// signatures by the old one, and new versions tell clients to fetch.
	t, err := r.loadTargets()
	if err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	t.Signed.Version++
	if err := r.writeTargets(t); err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	return nil
}

// TrustedRoot is the root.json agents pin at enrollment.
func (r *Repo) TrustedRoot() ([]byte, error) {
	b, err := os.ReadFile(r.metaPath("1.root.json"))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoRepo, err)
	}
	return b, nil
}

// Open reads a published target from the repository, checks it against
// the signed targets metadata (length and hash) and opens the bundle: what
// a server reads when it starts a patch's rollout.
func (r *Repo) Open(name string) (*Bundle, error) {
	t, err := r.loadTargets()
	if err != nil {
		return nil, err
	}
	tf, ok := t.Signed.Targets[name]
	if !ok {
		return nil, fmt.Errorf("target %s: %w in %s (see `stitch repo list`)", name, ErrNotFound, r.Dir)
	}
	data, err := os.ReadFile(filepath.Join(r.TargetsDir(), filepath.FromSlash(name)))
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", name, err)
	}
	if err := tf.VerifyLengthHashes(data); err != nil {
		return nil, fmt.Errorf("target %s: %w: the file differs from the signed metadata: %v", name, ErrVerify, err)
	}
	return Open(data)
}
