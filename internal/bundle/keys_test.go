package bundle

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// copyTree copies a directory (files and modes) for snapshots of a
// repository's state.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(to, fi.Mode().Perm())
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(to, b, fi.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestRotationFailingBeforeRootLeavesOldKey: when the new root cannot be
// written, the role keeps its old key and the repository keeps working,
// including for the next rotation. (It used to commit the new key first:
// the repository then signed with a key no root listed.)
func TestRotationFailingBeforeRootLeavesOldKey(t *testing.T) {
	for _, role := range []string{"timestamp", "root"} {
		t.Run(role, func(t *testing.T) {
			f := newFixture(t)
			name := f.publish(t, "module one")
			// 2.root.json cannot be created: a directory is in the way.
			block := filepath.Join(f.repo.MetadataDir(), "2.root.json")
			if err := os.MkdirAll(filepath.Join(block, "x"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := f.repo.RotateKey(role); err == nil {
				t.Fatal("rotation succeeded without writing its root")
			}
			if err := os.RemoveAll(block); err != nil {
				t.Fatal(err)
			}
			if err := f.repo.Refresh(); err != nil {
				t.Fatal(err)
			}
			if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
				t.Fatalf("after a failed rotation of %s: %v", role, err)
			}
			if err := f.repo.RotateKey("timestamp"); err != nil {
				t.Fatal(err)
			}
			if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
				t.Fatalf("rotation after a failed rotation of %s: %v", role, err)
			}
		})
	}
}

// TestRotationCrashAfterRootIsFinished: a crash after the new root is on
// disk but before the new key replaced the old leaves ROLE.key.new; the
// next change of the repository (here the server's refresher) commits it
// and signs with it, and agents that already took the new root work.
func TestRotationCrashAfterRootIsFinished(t *testing.T) {
	for _, refresh := range []string{"Refresh", "RefreshIfDue"} {
		t.Run(refresh, func(t *testing.T) {
			f := newFixture(t)
			name := f.publish(t, "module one")
			if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
				t.Fatal(err)
			}
			before := filepath.Join(t.TempDir(), "before")
			copyTree(t, f.repo.Dir, before)
			if err := f.repo.RotateKey("timestamp"); err != nil {
				t.Fatal(err)
			}
			newKey, _ := os.ReadFile(f.repo.KeyPath("timestamp"))
			newRoot, _ := os.ReadFile(filepath.Join(f.repo.MetadataDir(), "2.root.json"))
			// The crash state: everything as before the rotation, plus the
			// new root and the uncommitted new key.
			if err := os.RemoveAll(f.repo.Dir); err != nil {
				t.Fatal(err)
			}
			copyTree(t, before, f.repo.Dir)
			for p, b := range map[string][]byte{
				filepath.Join(f.repo.MetadataDir(), "2.root.json"): newRoot,
				filepath.Join(f.repo.MetadataDir(), "root.json"):   newRoot,
				f.repo.KeyPath("timestamp") + ".new":               newKey,
			} {
				if err := os.WriteFile(p, b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			var err error
			if refresh == "Refresh" {
				err = f.repo.Refresh()
			} else {
				_, err = f.repo.RefreshIfDue()
			}
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := os.ReadFile(f.repo.KeyPath("timestamp")); !bytes.Equal(got, newKey) {
				t.Fatal("the new key, which the new root lists, was not committed")
			}
			if _, err := os.Stat(f.repo.KeyPath("timestamp") + ".new"); err == nil {
				t.Fatal("timestamp.key.new left behind")
			}
			if _, _, err := f.client.Fetch(context.Background(), name); err != nil {
				t.Fatalf("after recovering the rotation: %v", err)
			}
		})
	}
}

func mode(t *testing.T, p string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// TestKeyFilesPrivate: key files are 0600 in a 0700 directory, even one
// that existed wider; a key or directory others can read is refused with
// the command that fixes it; the keys can live outside the repository,
// never inside what the server serves.
func TestKeyFilesPrivate(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "keys"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := &Repo{Dir: dir}
	if err := r.Init(); err != nil {
		t.Fatal(err)
	}
	if err := r.RotateKey("targets"); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, filepath.Join(dir, "keys")); m != 0o700 {
		t.Errorf("keys directory is %04o, want 0700", m)
	}
	for _, role := range Roles {
		if m := mode(t, r.KeyPath(role)); m != 0o600 {
			t.Errorf("%s key is %04o, want 0600", role, m)
		}
	}
	if err := os.Chmod(r.KeyPath("snapshot"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Publish(testBundle(t, "module")); err == nil || !strings.Contains(err.Error(), "chmod 600 "+r.KeyPath("snapshot")) {
		t.Errorf("publish with a world-readable key: %v", err)
	}
	os.Chmod(r.KeyPath("snapshot"), 0o600)
	os.Chmod(filepath.Join(dir, "keys"), 0o755)
	if err := r.Refresh(); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("refresh with an open keys directory: %v", err)
	}

	// Keys elsewhere: nothing in the repository directory, which works.
	sep := &Repo{Dir: t.TempDir(), KeysDir: filepath.Join(t.TempDir(), "online-keys")}
	if err := sep.Init(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(sep.Dir, "keys")); err == nil {
		t.Error("keys written into the repository directory despite KeysDir")
	}
	if _, err := sep.Publish(testBundle(t, "module")); err != nil {
		t.Fatal(err)
	}
	// Keys inside a served directory are refused.
	for _, under := range []string{"metadata", "targets"} {
		bad := &Repo{Dir: t.TempDir()}
		bad.KeysDir = filepath.Join(bad.Dir, under, "keys")
		os.MkdirAll(filepath.Join(bad.Dir, under), 0o755)
		if err := bad.Init(); err == nil || !strings.Contains(err.Error(), "which the server serves") {
			t.Errorf("keys under %s/: %v", under, err)
		}
		if _, err := os.Stat(bad.KeysDir); err == nil {
			t.Errorf("keys directory created under %s/", under)
		}
	}
}
