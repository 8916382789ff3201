package bundle

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"
	"github.com/theupdateframework/go-tuf/v2/metadata/trustedmetadata"
)

// maxExportFile bounds one file read back by Import.
const maxExportFile = MaxModuleSize + 1<<20

// An air-gapped mirror has no keys, so it cannot renew its timestamp: the
// export carries a timestamp (and snapshot) valid for longer than the
// online one's day. DefaultExportValid is a week: with a daily export and
// import, a mirror survives six missed days (a long weekend, a holiday)
// before its agents refuse it. MaxExportValid bounds it: a captured export
// can freeze an agent that saw nothing newer for at most that long, and an
// online agent not at all (it already holds a newer timestamp version,
// and the online repository moves on to one with the short expiry at once).
const (
	DefaultExportValid = 7 * 24 * time.Hour
	MaxExportValid     = 31 * 24 * time.Hour
)

// CheckExportValid refuses an export validity outside 1h to
// MaxExportValid; 0 means the metadata as it is.
func CheckExportValid(valid time.Duration) error {
	if valid != 0 && (valid < time.Hour || valid > MaxExportValid) {
		return fmt.Errorf("validity %s: want 1h to %s, or 0 to export the metadata as it is", valid, MaxExportValid)
	}
	return nil
}

// Export writes the public part of the repository (metadata and targets,
// never keys) as a tar, as it is: its timestamp expires when the online
// one does. ExportValid is what an air-gapped mirror needs.
func (r *Repo) Export(w io.Writer) error { return r.ExportValid(w, 0) }

// ExportFile writes ExportValid's tar to path, through a temporary file,
// so that a failed export never leaves a partial tar under that name.
func (r *Repo) ExportFile(path string, valid time.Duration) error {
	return writeAtomic(path, 0o644, func(w io.Writer) error { return r.ExportValid(w, valid) })
}

// ExportValid writes the public part of the repository as a tar whose
// timestamp is valid for valid (0: as it is). It signs, with the online
// keys, a snapshot valid at least that long and two timestamps: one valid
// that long for the export only, and the next version with the usual
// expiry for the online repository, so online agents keep their short
// freshness window.
func (r *Repo) ExportValid(w io.Writer, valid time.Duration) error {
	if err := CheckExportValid(valid); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	unlock, err := r.lock()
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	var ts []byte
	if valid == 0 {
		if ts, err = os.ReadFile(r.metaPath("timestamp.json")); err != nil {
			return fmt.Errorf("export: %w: %v", ErrNoRepo, err)
		}
	} else {
		for _, role := range []string{metadata.SNAPSHOT, metadata.TIMESTAMP} {
			if !r.hasKey(role) {
				return fmt.Errorf("export: %w: a long-lived export is signed with the snapshot and timestamp keys, and %s is not here: export where the online keys are, or as it is with --valid 0",
					ErrNoRepo, r.KeyPath(role))
			}
		}
		now, e := r.now(), r.exp()
		until := now.Add(valid)
		if exp := st.root.Signed.Expires; exp.Before(until) {
			return fmt.Errorf("export: root expires %s, before this export would (%s): renew it first with `stitch keys renew-root --dir %s` and the offline root key, or export with a shorter --valid",
				exp.Format(time.RFC3339), until.Format(time.RFC3339), r.Dir)
		}
		if st.targets.Signed.Expires.Before(until) || !verifies(st.root, metadata.TARGETS, st.targets) {
			if err := r.signTargets(st, now.Add(max(e.Targets, valid))); err != nil {
				return fmt.Errorf("export: %w", err)
			}
		}
		if err := r.signSnapshot(st, now.Add(max(e.Snapshot, valid))); err != nil {
			return fmt.Errorf("export: %w", err)
		}
		if ts, err = r.signTimestamp(st, until, false); err != nil {
			return fmt.Errorf("export: %w", err)
		}
		if _, err := r.signTimestamp(st, now.Add(e.Timestamp), true); err != nil {
			return fmt.Errorf("export: %w", err)
		}
		r.prune(st)
	}
	tw := tar.NewWriter(w)
	add := func(name string, data []byte) error {
		hdr := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	var files []string
	for v := int64(1); v <= st.root.Signed.Version; v++ {
		files = append(files, fmt.Sprintf("%d.root.json", v))
	}
	files = append(files, "root.json",
		fmt.Sprintf("%d.targets.json", st.targets.Signed.Version), "targets.json",
		fmt.Sprintf("%d.snapshot.json", st.snapshot.Signed.Version), "snapshot.json")
	for _, f := range files {
		data, err := os.ReadFile(r.metaPath(f))
		if err != nil {
			return fmt.Errorf("export: %w: %v", ErrNoRepo, err)
		}
		if err := add("metadata/"+f, data); err != nil {
			return fmt.Errorf("export: %w", err)
		}
	}
	if err := add("metadata/timestamp.json", ts); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	// The signed targets, under their plain names; Import makes the
	// hash-prefixed links.
	names := make([]string, 0, len(st.targets.Signed.Targets))
	for n := range st.targets.Signed.Targets {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		data, err := os.ReadFile(filepath.Join(r.TargetsDir(), filepath.FromSlash(n)))
		if err != nil {
			return fmt.Errorf("export: target %s: %w", n, err)
		}
		if err := add("targets/"+n, data); err != nil {
			return fmt.Errorf("export: %w", err)
		}
	}
	return tw.Close()
}

var metaNameRe = regexp.MustCompile(`^([1-9][0-9]*\.)?(root|targets|snapshot|timestamp)\.json$`)

// Import installs an export into r.Dir: a new mirror, or an update of an
// existing one. Everything is verified before anything is installed, as an
// agent would: the root chain from the mirror's own root (for a new
// mirror, from the export's first root), signatures, versions, expiry
// (an expired export is refused), and every target's length and hash. An
// export older than the mirror is refused (rollback), as is a different
// export of the same version; the same export again changes nothing. The
// update is atomic for readers: targets and versioned metadata first,
// timestamp.json last, so an agent reading the mirror meanwhile sees the
// old set or the new one.
func (r *Repo) Import(rd io.Reader) error {
	unlock, err := r.lock()
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer unlock()
	// Staging directories of imports that crashed: none is running (lock).
	old, _ := filepath.Glob(filepath.Join(r.Dir, ".import-*"))
	for _, d := range old {
		os.RemoveAll(d)
	}
	stage, err := os.MkdirTemp(r.Dir, ".import-*")
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer os.RemoveAll(stage)
	if err := untar(rd, stage); err != nil {
		return fmt.Errorf("import: %w", err)
	}
	in, err := r.verifyImport(stage)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	if in == nil {
		return nil // the mirror holds this export already
	}
	if err := r.install(stage, in); err != nil {
		return fmt.Errorf("import: %w (the mirror still serves what it had; import again)", err)
	}
	return nil
}

// untar unpacks an export into dir, refusing anything but files under
// metadata/ (metadata names only) and targets/.
func untar(rd io.Reader, dir string) error {
	tr := tar.NewReader(rd)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrBadBundle, err)
		}
		name := path.Clean(hdr.Name)
		meta, isMeta := strings.CutPrefix(name, "metadata/")
		if hdr.Typeflag != tar.TypeReg || strings.HasPrefix(name, "../") || path.IsAbs(name) ||
			!(isMeta && metaNameRe.MatchString(meta) || strings.HasPrefix(name, "targets/")) {
			return fmt.Errorf("%w: entry %q is not a metadata file or a file under targets/", ErrBadBundle, hdr.Name)
		}
		if hdr.Size > maxExportFile {
			return fmt.Errorf("%w: entry %q is %d bytes", ErrBadBundle, hdr.Name, hdr.Size)
		}
		dst := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		data, err := io.ReadAll(io.LimitReader(tr, maxExportFile))
		if err != nil {
			return fmt.Errorf("%w: %v", ErrBadBundle, err)
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			return err
		}
	}
}

// incoming is a verified export: the bytes to install, and the snapshot
// and targets they hold.
type incoming struct {
	roots          map[int64][]byte // new root versions
	root           []byte           // the newest root, when it is new
	ts, snap, tgts []byte
	snapMD         *metadata.Metadata[metadata.SnapshotType]
	targetsMD      *metadata.Metadata[metadata.TargetsType]
}

// verifyImport checks the staged export against the mirror; nil, nil
// means the mirror holds it already.
func (r *Repo) verifyImport(stage string) (*incoming, error) {
	sm := func(name string) string { return filepath.Join(stage, "metadata", name) }
	readStage := func(name string) ([]byte, error) {
		b, err := os.ReadFile(sm(name))
		if err != nil {
			return nil, fmt.Errorf("%w: the export has no metadata/%s (is it made by `stitch repo export`?)", ErrBadBundle, name)
		}
		return b, nil
	}
	cur, err := r.Status()
	existing := err == nil
	var base []byte
	if existing {
		if base, err = os.ReadFile(r.metaPath("root.json")); err != nil {
			return nil, err
		}
	} else if base, err = readStage("1.root.json"); err != nil {
		return nil, err
	}
	tm, err := trustedmetadata.New(base)
	if err != nil {
		return nil, fmt.Errorf("%w: the trusted root does not verify itself: %v", ErrVerify, err)
	}
	tm.RefTime = r.now()
	in := &incoming{roots: map[int64][]byte{}}
	if !existing {
		in.roots[1] = base
	}
	for v := tm.Root.Signed.Version + 1; ; v++ {
		b, err := os.ReadFile(sm(fmt.Sprintf("%d.root.json", v)))
		if err != nil {
			break
		}
		if _, err := tm.UpdateRoot(b); err != nil {
			return nil, fmt.Errorf("root version %d of the export does not follow the mirror's root version %d (an export of another repository?): %w", v, v-1, classify(err))
		}
		in.roots[v] = b
	}
	if latest := tm.Root.Signed.Version; in.roots[latest] != nil {
		in.root = in.roots[latest]
	}
	if newest, err := metadata.Root().FromFile(sm("root.json")); err != nil || newest.Signed.Version < tm.Root.Signed.Version {
		return nil, fmt.Errorf("%w: the export's root.json is missing or older than its versioned roots", ErrBadBundle)
	} else if existing && newest.Signed.Version < cur.Roles[metadata.ROOT].Version {
		return nil, fmt.Errorf("%w: rollback: the export's root is version %d, the mirror's %d: this export is older than what the mirror holds; take a new export on the online side (`stitch repo export`)",
			ErrVerify, newest.Signed.Version, cur.Roles[metadata.ROOT].Version)
	} else if newest.Signed.Version > tm.Root.Signed.Version {
		return nil, fmt.Errorf("%w: the export lacks metadata/%d.root.json", ErrBadBundle, tm.Root.Signed.Version+1)
	}
	if in.ts, err = readStage("timestamp.json"); err != nil {
		return nil, err
	}
	// An older export is refused as such before its signatures and expiry
	// are looked at: whatever else is wrong with it, it is not wanted.
	if existing {
		unverified, err := metadata.Timestamp().FromBytes(in.ts)
		if err != nil {
			return nil, fmt.Errorf("%w: metadata/timestamp.json: %v", ErrBadBundle, err)
		}
		if v, c := unverified.Signed.Version, cur.Roles[metadata.TIMESTAMP].Version; v < c {
			return nil, fmt.Errorf("%w: rollback: the export's timestamp is version %d, the mirror's %d: the export is older than the mirror, which is unchanged; import a newer export",
				ErrVerify, v, c)
		}
	}
	timestampMD, err := tm.UpdateTimestamp(in.ts)
	if err != nil {
		return nil, fmt.Errorf("the export's metadata: %w; take a new export on the online side (`stitch repo export`)", classify(err))
	}
	snapV := timestampMD.Signed.Meta["snapshot.json"].Version
	if in.snap, err = readVersioned(sm, metadata.SNAPSHOT, snapV); err != nil {
		return nil, err
	}
	if in.snapMD, err = tm.UpdateSnapshot(in.snap, false); err != nil {
		return nil, fmt.Errorf("the export's snapshot: %w", classify(err))
	}
	tgtsV := in.snapMD.Signed.Meta["targets.json"].Version
	if in.tgts, err = readVersioned(sm, metadata.TARGETS, tgtsV); err != nil {
		return nil, err
	}
	if in.targetsMD, err = tm.UpdateTargets(in.tgts); err != nil {
		return nil, fmt.Errorf("the export's targets: %w", classify(err))
	}
	if existing {
		c := cur.Roles
		newTS := timestampMD.Signed.Version
		switch {
		case snapV < c[metadata.SNAPSHOT].Version || tgtsV < c[metadata.TARGETS].Version: // an older timestamp was refused above
			return nil, fmt.Errorf("%w: rollback: the export (timestamp version %d, snapshot %d, targets %d) is older than the mirror (timestamp %d, snapshot %d, targets %d), which is unchanged; import a newer export",
				ErrVerify, newTS, snapV, tgtsV, c[metadata.TIMESTAMP].Version, c[metadata.SNAPSHOT].Version, c[metadata.TARGETS].Version)
		case newTS == c[metadata.TIMESTAMP].Version:
			old, err := os.ReadFile(r.metaPath("timestamp.json"))
			if err == nil && bytes.Equal(old, in.ts) {
				return nil, nil
			}
			return nil, fmt.Errorf("%w: the export's timestamp version %d differs from the mirror's of the same version: not from the same repository's history; the mirror is unchanged", ErrVerify, newTS)
		}
	}
	for name, tf := range in.targetsMD.Signed.Targets {
		data, err := os.ReadFile(filepath.Join(stage, "targets", filepath.FromSlash(name)))
		if err != nil {
			data, err = os.ReadFile(filepath.Join(r.TargetsDir(), filepath.FromSlash(name)))
		}
		if err != nil {
			return nil, fmt.Errorf("%w: target %s is signed but neither in the export nor in the mirror", ErrBadBundle, name)
		}
		if err := tf.VerifyLengthHashes(data); err != nil {
			return nil, fmt.Errorf("%w: target %s: content does not match its signed length and hash (tampered): %v", ErrVerify, name, err)
		}
	}
	return in, nil
}

// readVersioned reads N.ROLE.json from an export, or ROLE.json from one
// made before consistent snapshots.
func readVersioned(sm func(string) string, role string, v int64) ([]byte, error) {
	if b, err := os.ReadFile(sm(fmt.Sprintf("%d.%s.json", v, role))); err == nil {
		return b, nil
	}
	b, err := os.ReadFile(sm(role + ".json"))
	if err != nil {
		return nil, fmt.Errorf("%w: the export has no metadata/%d.%s.json", ErrBadBundle, v, role)
	}
	return b, nil
}

// install puts a verified export in place, timestamp.json last.
func (r *Repo) install(stage string, in *incoming) error {
	for _, d := range []string{r.MetadataDir(), r.TargetsDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	for name, tf := range in.targetsMD.Signed.Targets {
		dst := filepath.Join(r.TargetsDir(), filepath.FromSlash(name))
		data, err := os.ReadFile(dst)
		if err != nil || tf.VerifyLengthHashes(data) != nil {
			if data, err = os.ReadFile(filepath.Join(stage, "targets", filepath.FromSlash(name))); err != nil {
				return err
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if err := writeFileAtomic(dst, data, 0o644); err != nil {
				return err
			}
		}
		pre := filepath.Join(r.TargetsDir(), filepath.FromSlash(hashPrefixed(name, data)))
		if old, err := os.ReadFile(pre); err == nil && !bytes.Equal(old, data) {
			os.Remove(pre)
		}
		if err := linkOrCopy(dst, pre); err != nil {
			return err
		}
	}
	versions := make([]int64, 0, len(in.roots))
	for v := range in.roots {
		versions = append(versions, v)
	}
	slices.Sort(versions)
	for _, v := range versions {
		if err := writeFileAtomic(r.metaPath(fmt.Sprintf("%d.root.json", v)), in.roots[v], 0o644); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		name string
		data []byte
	}{
		{fmt.Sprintf("%d.targets.json", in.targetsMD.Signed.Version), in.tgts}, {fmt.Sprintf("%d.snapshot.json", in.snapMD.Signed.Version), in.snap},
		{"root.json", in.root}, {"targets.json", in.tgts}, {"snapshot.json", in.snap},
		{"timestamp.json", in.ts},
	} {
		if f.data == nil {
			continue // the mirror's root is still the newest
		}
		if err := writeFileAtomic(r.metaPath(f.name), f.data, 0o644); err != nil {
			return err
		}
	}
	r.prune(&state{snapshot: in.snapMD, targets: in.targetsMD})
	return nil
}
