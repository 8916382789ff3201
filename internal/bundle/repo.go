package bundle

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
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
// refuses a timestamp older than this, so the server's refresher (Repo.
// KeepFresh) re-signs it at half its life.
type Expiries struct {
	Root, Targets, Snapshot, Timestamp time.Duration
}

// DefaultExpiries: root a year (offline key), targets 90 days, snapshot a
// week, timestamp a day.
var DefaultExpiries = Expiries{Root: 365 * 24 * time.Hour, Targets: 90 * 24 * time.Hour, Snapshot: 7 * 24 * time.Hour, Timestamp: 24 * time.Hour}

// keepOldMetadata is how long superseded snapshot and targets versions stay
// on disk: a client that read the previous timestamp fetches the versions
// it names a moment later, so they must outlive any fetch in flight.
const keepOldMetadata = time.Hour

// Repo is a TUF repository on disk, with consistent snapshots: metadata
// that clients fetch by version is never rewritten, and timestamp.json,
// replaced atomically, is the one switch from one set to the next.
//
//	keys/ROLE.key              ed25519 seed, hex, mode 0600 in a 0700 directory (never exported)
//	metadata/N.root.json       every root version; root.json the newest
//	metadata/N.targets.json    targets by version; targets.json the newest
//	metadata/N.snapshot.json   snapshot by version; snapshot.json the newest
//	metadata/timestamp.json    the current timestamp
//	targets/REL/NAME           bundles, also as targets/REL/SHA256.NAME (the same file)
//
// Every change holds the lock file .lock, writes each file through a
// temporary file, fsync and rename, and fsyncs the directory.
type Repo struct {
	Dir string
	// KeysDir holds the signing keys; Dir/keys when empty. It must not be
	// inside metadata/ or targets/, which a server serves.
	KeysDir  string
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

func (r *Repo) keysDir() string {
	if r.KeysDir != "" {
		return r.KeysDir
	}
	return filepath.Join(r.Dir, "keys")
}

// KeyPath is where role's signing key is kept.
func (r *Repo) KeyPath(role string) string { return filepath.Join(r.keysDir(), role+".key") }

// MetadataDir and TargetsDir are what a server serves.
func (r *Repo) MetadataDir() string { return filepath.Join(r.Dir, "metadata") }
func (r *Repo) TargetsDir() string  { return filepath.Join(r.Dir, "targets") }

// state is the repository's current metadata.
type state struct {
	root      *metadata.Metadata[metadata.RootType]
	targets   *metadata.Metadata[metadata.TargetsType]
	snapshot  *metadata.Metadata[metadata.SnapshotType]
	timestamp *metadata.Metadata[metadata.TimestampType]
}

// Init creates a new repository with a fresh key per role. It refuses a
// directory that already holds one, and a keys directory that holds keys.
func (r *Repo) Init() error {
	if _, err := os.Stat(r.metaPath("root.json")); err == nil {
		return fmt.Errorf("init %s: %w: a repository is already there (use `stitch keys rotate` to change keys)", r.Dir, ErrExists)
	}
	unlock, err := r.lock()
	if err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	defer unlock()
	if _, err := os.Stat(r.metaPath("root.json")); err == nil {
		return fmt.Errorf("init %s: %w: a repository is already there", r.Dir, ErrExists)
	}
	for _, d := range []string{r.MetadataDir(), r.TargetsDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("init %s: %w", r.Dir, err)
		}
	}
	if err := r.makeKeysDir(); err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	for _, role := range Roles {
		for _, p := range []string{r.KeyPath(role), r.KeyPath(role) + ".new"} {
			if _, err := os.Lstat(p); err == nil {
				return fmt.Errorf("init %s: %w: %s is there already (keys of another repository?): use another --keys directory or remove it", r.Dir, ErrExists, p)
			}
		}
	}
	now, e := r.now(), r.exp()
	root := metadata.Root(now.Add(e.Root))
	// Consistent snapshots: clients fetch N.snapshot.json and N.targets.json
	// by the version the timestamp names, so a fetch during a publish
	// never mixes two sets.
	root.Signed.ConsistentSnapshot = true
	var rootKey ed25519.PrivateKey
	for _, role := range Roles {
		priv, err := r.newKey(role, &root.Signed)
		if err != nil {
			return fmt.Errorf("init %s: %w", r.Dir, err)
		}
		if role == metadata.ROOT {
			rootKey = priv
		}
	}
	// Nothing trusts any older key: commit the new ones at once.
	for _, role := range Roles {
		if err := renameSync(r.KeyPath(role)+".new", r.KeyPath(role)); err != nil {
			return fmt.Errorf("init %s: %w", r.Dir, err)
		}
	}
	// Version 0 stands for "none yet": the first signing makes version 1.
	st := &state{root: root, targets: metadata.Targets(now.Add(e.Targets)),
		snapshot: metadata.Snapshot(now), timestamp: metadata.Timestamp(now)}
	st.targets.Signed.Version, st.snapshot.Signed.Version, st.timestamp.Signed.Version = 0, 0, 0
	if err := r.cascade(st, metadata.TARGETS); err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	// root.json last: its presence is what says a repository is here.
	s, err := signature.LoadED25519Signer(rootKey)
	if err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	if err := r.writeRoot(root, s); err != nil {
		return fmt.Errorf("init %s: %w", r.Dir, err)
	}
	return nil
}

// makeKeysDir creates the keys directory 0700 (and narrows an existing
// one), and checks that the server does not serve it.
func (r *Repo) makeKeysDir() error {
	dir := r.keysDir()
	if err := r.checkServed(dir, filepath.Abs); err != nil {
		return err // before creating anything there
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return err
	}
	return r.checkKeysDir()
}

// checkKeysDir refuses a keys directory that others can read or that lies
// inside what the server serves.
func (r *Repo) checkKeysDir() error {
	dir := r.keysDir()
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%w: keys directory: %v (is this a repository made by `stitch repo init`?)", ErrNoRepo, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("keys directory %s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("keys directory %s is mode %04o, open to other users: run `chmod 700 %s`", dir, fi.Mode().Perm(), dir)
	}
	return r.checkServed(dir, realPath)
}

// checkServed refuses a keys directory inside metadata/ or targets/, with
// paths made absolute by abs (lexically, or resolving symbolic links).
func (r *Repo) checkServed(dir string, abs func(string) (string, error)) error {
	kd, err := abs(dir)
	if err != nil {
		return err
	}
	for _, served := range []string{r.MetadataDir(), r.TargetsDir()} {
		sd, err := abs(served)
		if err != nil {
			continue // not there yet: nothing served
		}
		if rel, err := filepath.Rel(sd, kd); err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return fmt.Errorf("keys directory %s is inside %s, which the server serves to anyone: keep the keys elsewhere (--keys DIR)", dir, served)
		}
	}
	return nil
}

func realPath(p string) (string, error) {
	a, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(a)
}

func keyID(pub ed25519.PublicKey) (string, error) {
	k, err := metadata.KeyFromPublicKey(pub)
	if err != nil {
		return "", err
	}
	return k.ID()
}

func parseSeed(b []byte) (ed25519.PrivateKey, bool) {
	seed, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, false
	}
	return ed25519.NewKeyFromSeed(seed), true
}

// newKey makes a key for role, stores it as ROLE.key.new (0600) and puts it
// in root in place of the role's previous keys. The key becomes ROLE.key
// only once a root that lists it is on disk (see recoverKeys).
func (r *Repo) newKey(role string, root *metadata.RootType) (ed25519.PrivateKey, error) {
	if err := r.makeKeysDir(); err != nil {
		return nil, err
	}
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
	if err := writeFileAtomic(r.KeyPath(role)+".new", []byte(hex.EncodeToString(priv.Seed())+"\n"), 0o600); err != nil {
		return nil, err
	}
	return priv, nil
}

// recoverKeys finishes or undoes a key rotation that stopped half way: a
// ROLE.key.new that the root lists replaces ROLE.key (the root that trusts
// it is on disk, clients may have it), one the root does not list is
// dropped (the root was never written).
func (r *Repo) recoverKeys(root *metadata.Metadata[metadata.RootType]) error {
	for _, role := range Roles {
		p := r.KeyPath(role) + ".new"
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("recover key %s: %w", p, err)
		}
		listed := false
		if priv, ok := parseSeed(b); ok {
			id, err := keyID(priv.Public().(ed25519.PublicKey))
			if err != nil {
				return fmt.Errorf("recover key %s: %w", p, err)
			}
			listed = root.Signed.Roles[role] != nil && slices.Contains(root.Signed.Roles[role].KeyIDs, id)
		}
		if listed {
			if err := renameSync(p, r.KeyPath(role)); err != nil {
				return fmt.Errorf("recover key %s: %w", p, err)
			}
			continue
		}
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("recover key %s: %w", p, err)
		}
	}
	return nil
}

func (r *Repo) hasKey(role string) bool {
	_, err := os.Stat(r.KeyPath(role))
	return err == nil
}

// loadKey reads role's key, refusing one that other users can read.
func (r *Repo) loadKey(role string) (ed25519.PrivateKey, error) {
	if err := r.checkKeysDir(); err != nil {
		return nil, err
	}
	p := r.KeyPath(role)
	fi, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("%w: key for %s: %v (is this a repository made by `stitch repo init`? the %s key may be kept offline: copy it in)", ErrNoRepo, role, err, role)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("key %s is mode %04o, readable by other users: run `chmod 600 %s` and consider rotating it (`stitch keys rotate %s`)", p, fi.Mode().Perm(), p, role)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", p, err)
	}
	priv, ok := parseSeed(b)
	if !ok {
		return nil, fmt.Errorf("key %s: not a hex ed25519 seed", p)
	}
	return priv, nil
}

// signer loads role's key and checks that root trusts it, so that nothing
// is signed that every client would refuse.
func (r *Repo) signer(role string, root *metadata.Metadata[metadata.RootType]) (signature.Signer, error) {
	priv, err := r.loadKey(role)
	if err != nil {
		return nil, err
	}
	id, err := keyID(priv.Public().(ed25519.PublicKey))
	if err != nil {
		return nil, err
	}
	if root.Signed.Roles[role] == nil || !slices.Contains(root.Signed.Roles[role].KeyIDs, id) {
		return nil, fmt.Errorf("key %s is not the %s key that root.json (version %d) lists: a key of another repository? restore the right one or rotate with `stitch keys rotate %s`",
			r.KeyPath(role), role, root.Signed.Version, role)
	}
	return signature.LoadED25519Signer(priv)
}

// writeRoot signs root with signers and writes N.root.json, then root.json.
// N.root.json is what clients fetch: once it is on disk the new root is in
// effect (see latestRoot).
func (r *Repo) writeRoot(root *metadata.Metadata[metadata.RootType], signers ...signature.Signer) error {
	root.ClearSignatures()
	for _, s := range signers {
		if _, err := root.Sign(s); err != nil {
			return fmt.Errorf("sign root: %w", err)
		}
	}
	return writeVersioned(r, root, metadata.ROOT, root.Signed.Version)
}

// writeVersioned writes N.ROLE.json and then ROLE.json (the repository's
// own pointer to the newest).
func writeVersioned[T metadata.Roles](r *Repo, md *metadata.Metadata[T], role string, version int64) error {
	b, err := md.ToBytes(true)
	if err != nil {
		return fmt.Errorf("encode %s: %w", role, err)
	}
	if err := writeFileAtomic(r.metaPath(fmt.Sprintf("%d.%s.json", version, role)), b, 0o644); err != nil {
		return err
	}
	return writeFileAtomic(r.metaPath(role+".json"), b, 0o644)
}

// latestRoot reads root.json and rolls it forward to the newest
// N.root.json, which a change may have written before it stopped.
func (r *Repo) latestRoot() (*metadata.Metadata[metadata.RootType], error) {
	root, err := metadata.Root().FromFile(r.metaPath("root.json"))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v (run `stitch repo init` first)", ErrNoRepo, r.Dir, err)
	}
	for {
		p := r.metaPath(fmt.Sprintf("%d.root.json", root.Signed.Version+1))
		next, err := metadata.Root().FromFile(p)
		if err != nil {
			break
		}
		if err := root.VerifyDelegate(metadata.ROOT, next); err != nil {
			return nil, fmt.Errorf("%w: %s is not signed by the root before it: %v", ErrVerify, p, err)
		}
		if err := copyFileAtomic(p, r.metaPath("root.json"), 0o644); err != nil {
			return nil, err
		}
		root = next
	}
	return root, nil
}

// prepare loads the current state under the lock, after finishing what an
// interrupted change left: the newest root, a half-rotated key, and the
// versioned copies that older repositories lack.
func (r *Repo) prepare() (*state, error) {
	root, err := r.latestRoot()
	if err != nil {
		return nil, err
	}
	if err := r.recoverKeys(root); err != nil {
		return nil, err
	}
	st, err := r.load(root)
	if err != nil {
		return nil, err
	}
	for role, v := range map[string]int64{metadata.TARGETS: st.targets.Signed.Version, metadata.SNAPSHOT: st.snapshot.Signed.Version} {
		p := r.metaPath(fmt.Sprintf("%d.%s.json", v, role))
		if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
			if err := copyFileAtomic(r.metaPath(role+".json"), p, 0o644); err != nil {
				return nil, err
			}
		}
	}
	return st, nil
}

// load reads the metadata below root.
func (r *Repo) load(root *metadata.Metadata[metadata.RootType]) (*state, error) {
	st := &state{root: root}
	var err error
	if st.targets, err = metadata.Targets().FromFile(r.metaPath("targets.json")); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoRepo, r.Dir, err)
	}
	if st.snapshot, err = metadata.Snapshot().FromFile(r.metaPath("snapshot.json")); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoRepo, r.Dir, err)
	}
	if st.timestamp, err = metadata.Timestamp().FromFile(r.metaPath("timestamp.json")); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoRepo, r.Dir, err)
	}
	return st, nil
}

// migrate switches a repository made before consistent snapshots to them:
// a new root version (the versioned files are already there, see
// prepare). It needs the root key; without it the repository keeps its
// old layout.
func (r *Repo) migrate(st *state) error {
	if st.root.Signed.ConsistentSnapshot || !r.hasKey(metadata.ROOT) {
		return nil
	}
	s, err := r.signer(metadata.ROOT, st.root)
	if err != nil {
		return err
	}
	return r.nextRoot(st, st.root.Signed.Expires, s)
}

// nextRoot writes the next root version, expiring at expires and signed by
// signers, switching the repository to consistent snapshots on the way.
func (r *Repo) nextRoot(st *state, expires time.Time, signers ...signature.Signer) error {
	if err := r.consistent(st); err != nil {
		return err
	}
	st.root.Signed.Version++
	st.root.Signed.Expires = expires
	return r.writeRoot(st.root, signers...)
}

// consistent prepares a switch to consistent snapshots, before the root
// that announces it is written: every published bundle gets its
// hash-prefixed name, which clients then fetch.
func (r *Repo) consistent(st *state) error {
	if st.root.Signed.ConsistentSnapshot {
		return nil
	}
	for name, tf := range st.targets.Signed.Targets {
		p := filepath.Join(r.TargetsDir(), filepath.FromSlash(name))
		data, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("target %s: %w", name, err)
		}
		if err := tf.VerifyLengthHashes(data); err != nil {
			return fmt.Errorf("target %s: %w: the file differs from the signed metadata: %v", name, ErrVerify, err)
		}
		if err := linkOrCopy(p, filepath.Join(r.TargetsDir(), filepath.FromSlash(hashPrefixed(name, data)))); err != nil {
			return err
		}
	}
	st.root.Signed.ConsistentSnapshot = true
	return nil
}

func (r *Repo) signTargets(st *state, expires time.Time) error {
	s, err := r.signer(metadata.TARGETS, st.root)
	if err != nil {
		return err
	}
	t := st.targets
	t.Signed.Version++
	t.Signed.Expires = expires
	t.ClearSignatures()
	if _, err := t.Sign(s); err != nil {
		return fmt.Errorf("sign targets: %w", err)
	}
	return writeVersioned(r, t, metadata.TARGETS, t.Signed.Version)
}

func (r *Repo) signSnapshot(st *state, expires time.Time) error {
	s, err := r.signer(metadata.SNAPSHOT, st.root)
	if err != nil {
		return err
	}
	snap := metadata.Snapshot(expires)
	snap.Signed.Version = st.snapshot.Signed.Version + 1
	snap.Signed.Meta["targets.json"] = metadata.MetaFile(st.targets.Signed.Version)
	if _, err := snap.Sign(s); err != nil {
		return fmt.Errorf("sign snapshot: %w", err)
	}
	if err := writeVersioned(r, snap, metadata.SNAPSHOT, snap.Signed.Version); err != nil {
		return err
	}
	st.snapshot = snap
	return nil
}

// signTimestamp signs the next timestamp over the current snapshot and,
// when write, installs it: the rename of timestamp.json is the moment a
// new set of metadata goes live.
func (r *Repo) signTimestamp(st *state, expires time.Time, write bool) ([]byte, error) {
	s, err := r.signer(metadata.TIMESTAMP, st.root)
	if err != nil {
		return nil, err
	}
	ts := metadata.Timestamp(expires)
	ts.Signed.Version = st.timestamp.Signed.Version + 1
	ts.Signed.Meta["snapshot.json"] = metadata.MetaFile(st.snapshot.Signed.Version)
	if _, err := ts.Sign(s); err != nil {
		return nil, fmt.Errorf("sign timestamp: %w", err)
	}
	b, err := ts.ToBytes(true)
	if err != nil {
		return nil, err
	}
	if write {
		if err := writeFileAtomic(r.metaPath("timestamp.json"), b, 0o644); err != nil {
			return nil, err
		}
	}
	st.timestamp = ts
	return b, nil
}

// cascade signs new versions from role down to the timestamp (targets,
// then snapshot, then timestamp) with the default expiries.
func (r *Repo) cascade(st *state, from string) error {
	now, e := r.now(), r.exp()
	if from == metadata.TARGETS {
		if err := r.signTargets(st, now.Add(e.Targets)); err != nil {
			return err
		}
	}
	if from == metadata.TARGETS || from == metadata.SNAPSHOT {
		if err := r.signSnapshot(st, now.Add(e.Snapshot)); err != nil {
			return err
		}
	}
	if _, err := r.signTimestamp(st, now.Add(e.Timestamp), true); err != nil {
		return err
	}
	r.prune(st)
	return nil
}

var versionedRe = regexp.MustCompile(`^([0-9]+)\.(snapshot|targets)\.json$`)

// prune removes superseded snapshot and targets versions (and temporary
// files left by a crash) once no fetch can still want them. Best effort:
// a file left behind is harmless.
func (r *Repo) prune(st *state) {
	entries, err := os.ReadDir(r.MetadataDir())
	if err != nil {
		return
	}
	current := map[string]int64{metadata.SNAPSHOT: st.snapshot.Signed.Version, metadata.TARGETS: st.targets.Signed.Version}
	for _, e := range entries {
		name := e.Name()
		old := strings.HasSuffix(name, ".tmp")
		if m := versionedRe.FindStringSubmatch(name); m != nil {
			v, _ := strconv.ParseInt(m[1], 10, 64)
			old = v < current[m[2]]
		}
		if !old {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > keepOldMetadata {
			os.Remove(filepath.Join(r.MetadataDir(), name))
		}
	}
}

func (r *Repo) loadTargets() (*metadata.Metadata[metadata.TargetsType], error) {
	t, err := metadata.Targets().FromFile(r.metaPath("targets.json"))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v (run `stitch repo init` first)", ErrNoRepo, r.Dir, err)
	}
	return t, nil
}

// hashPrefixed is where a client with consistent snapshots fetches a
// target: its SHA-256 before the file name, in the same directory.
func hashPrefixed(name string, data []byte) string {
	dir, base := path.Split(name)
	return dir + SHA256Hex(data) + "." + base
}

// Publish checks a bundle, stores it under its content-addressed target name
// and signs new targets, snapshot and timestamp metadata. It returns the
// target name. Publishing the same bytes again is a no-op.
func (r *Repo) Publish(data []byte) (string, error) {
	out, err := r.PublishAll([][]byte{data}, nil)
	if err != nil {
		return "", err
	}
	return out[0].Target, nil
}

// writeTarget stores a bundle under its name and its hash-prefixed name
// (one file, two links), before any metadata names it.
func (r *Repo) writeTarget(name string, data []byte) error {
	p := filepath.Join(r.TargetsDir(), filepath.FromSlash(name))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := writeFileAtomic(p, data, 0o644); err != nil {
		return err
	}
	return linkOrCopy(p, filepath.Join(r.TargetsDir(), filepath.FromSlash(hashPrefixed(name, data))))
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

// due says whether metadata expiring at exp should be signed again: when
// half its life is gone.
func due(now, exp time.Time, life time.Duration) bool { return exp.Sub(now) < life/2 }

// verifies says whether root trusts md's signature for role.
func verifies(root *metadata.Metadata[metadata.RootType], role string, md any) bool {
	return root.VerifyDelegate(role, md) == nil
}

// targetsDue says whether targets must be signed anew: half their life is
// gone, or the root no longer trusts their signature (a rotated key).
func (r *Repo) targetsDue(st *state, now time.Time) bool {
	return due(now, st.targets.Signed.Expires, r.exp().Targets) || !verifies(st.root, metadata.TARGETS, st.targets)
}

// Refresh re-signs snapshot and timestamp with new expiry dates (and
// targets once half their life is gone), whether due or not; with the
// root key present it also moves a repository made before consistent
// snapshots to them. The server does this by itself (KeepFresh); this is
// the operator's command.
func (r *Repo) Refresh() error {
	unlock, err := r.lock()
	if err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	if err := r.migrate(st); err != nil {
		return fmt.Errorf("refresh: consistent snapshots: %w", err)
	}
	from := metadata.SNAPSHOT
	if r.targetsDue(st, r.now()) {
		from = metadata.TARGETS
	}
	if err := r.cascade(st, from); err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	return nil
}

// RotateKey replaces role's key: root gets a new version listing the new
// key (signed by the old and new root keys when role is root) and the
// role's metadata is signed again with the new key. The order makes a
// crash harmless: the new key is written as ROLE.key.new, then the root
// that lists it, and only then does it replace ROLE.key; recoverKeys
// finishes or undoes whatever a crash interrupted.
func (r *Repo) RotateKey(role string) error {
	if !slices.Contains(Roles, role) {
		return fmt.Errorf("rotate: %w: role %q, want one of %s", ErrBadBundle, role, strings.Join(Roles, ", "))
	}
	unlock, err := r.lock()
	if err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	// The current root key signs the new root in any case: for root itself
	// clients accept a new root only if the previous root's keys signed it.
	cur, err := r.signer(metadata.ROOT, st.root)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	priv, err := r.newKey(role, &st.root.Signed)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	signers := []signature.Signer{cur}
	if role == metadata.ROOT {
		s, err := signature.LoadED25519Signer(priv)
		if err != nil {
			return fmt.Errorf("rotate %s: %w", role, err)
		}
		signers = append(signers, s)
	}
	// On failure ROLE.key.new stays: recoverKeys keeps it if the new root
	// reached the disk and drops it otherwise.
	if err := r.nextRoot(st, r.now().Add(r.exp().Root), signers...); err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	if err := renameSync(r.KeyPath(role)+".new", r.KeyPath(role)); err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	// Re-sign everything below root: a new key for any role invalidates
	// signatures by the old one, and new versions tell clients to fetch.
	if err := r.cascade(st, metadata.TARGETS); err != nil {
		return fmt.Errorf("rotate %s: %w", role, err)
	}
	return nil
}

// RenewRoot signs a new root version with the current root key, valid for
// Expiries.Root from now: what the offline root key does before the root
// expires. Clients that trust the old root accept the new one (same key,
// next version).
func (r *Repo) RenewRoot() error {
	unlock, err := r.lock()
	if err != nil {
		return fmt.Errorf("renew root: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return fmt.Errorf("renew root: %w", err)
	}
	s, err := r.signer(metadata.ROOT, st.root)
	if err != nil {
		return fmt.Errorf("renew root: %w", err)
	}
	if err := r.nextRoot(st, r.now().Add(r.exp().Root), s); err != nil {
		return fmt.Errorf("renew root: %w", err)
	}
	return nil
}

// RoleStatus is one role's current metadata.
type RoleStatus struct {
	Version int64     `json:"version"`
	Expires time.Time `json:"expires"`
}

// Status is what a repository holds now.
type Status struct {
	Roles              map[string]RoleStatus `json:"roles"`
	ConsistentSnapshot bool                  `json:"consistent_snapshot"`
	Targets            int                   `json:"targets"`
}

// Expires is each role's expiry.
func (s Status) Expires() map[string]time.Time {
	m := make(map[string]time.Time, len(s.Roles))
	for role, rs := range s.Roles {
		m[role] = rs.Expires
	}
	return m
}

func (st *state) status() Status {
	return Status{
		Roles: map[string]RoleStatus{
			metadata.ROOT:      {st.root.Signed.Version, st.root.Signed.Expires},
			metadata.TARGETS:   {st.targets.Signed.Version, st.targets.Signed.Expires},
			metadata.SNAPSHOT:  {st.snapshot.Signed.Version, st.snapshot.Signed.Expires},
			metadata.TIMESTAMP: {st.timestamp.Signed.Version, st.timestamp.Signed.Expires},
		},
		ConsistentSnapshot: st.root.Signed.ConsistentSnapshot,
		Targets:            len(st.targets.Signed.Targets),
	}
}

// Status reads the current metadata's versions and expiries.
func (r *Repo) Status() (Status, error) {
	root, err := metadata.Root().FromFile(r.metaPath("root.json"))
	if err != nil {
		return Status{}, fmt.Errorf("%w: %s: %v (run `stitch repo init` or `stitch repo import` first)", ErrNoRepo, r.Dir, err)
	}
	st, err := r.load(root)
	if err != nil {
		return Status{}, err
	}
	return st.status(), nil
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
	data, err := r.readTarget(name)
	if err != nil {
		return nil, err
	}
	return Open(data)
}

// readTarget reads a published target's file and checks it against the
// signed targets metadata (length and hash).
func (r *Repo) readTarget(name string) ([]byte, error) {
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
	return data, nil
}
