package bundle

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// maxExportFile bounds one file read back by Import.
const maxExportFile = MaxModuleSize + 1<<20

// Export writes the public part of the repository (metadata/ and targets/,
// never keys/) as a tar, for carrying to an air-gapped network.
func (r *Repo) Export(w io.Writer) error {
	tw := tar.NewWriter(w)
	for _, top := range []string{"metadata", "targets"} {
		base := filepath.Join(r.Dir, top)
		if _, err := os.Stat(base); err != nil {
			return fmt.Errorf("export: %w: %v", ErrNoRepo, err)
		}
		err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || strings.HasSuffix(p, ".tmp") {
				return err
			}
			rel, _ := filepath.Rel(r.Dir, p)
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			hdr := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			_, err = tw.Write(data)
			return err
		})
		if err != nil {
			return fmt.Errorf("export: %w", err)
		}
	}
	return tw.Close()
}

// Import unpacks an export into r.Dir (which must not hold a repository),
// refusing paths outside metadata/ and targets/, and checks that the
// metadata's root verifies itself, so a corrupt carry is caught at once.
func (r *Repo) Import(rd io.Reader) error {
	if _, err := os.Stat(filepath.Join(r.Dir, "metadata", "root.json")); err == nil {
		return fmt.Errorf("import into %s: %w: a repository is already there", r.Dir, ErrExists)
	}
	tr := tar.NewReader(rd)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("import: %w: %v", ErrBadBundle, err)
		}
		name := path.Clean(hdr.Name)
		if hdr.Typeflag != tar.TypeReg || strings.HasPrefix(name, "../") || path.IsAbs(name) ||
			!(strings.HasPrefix(name, "metadata/") || strings.HasPrefix(name, "targets/")) {
			return fmt.Errorf("import: %w: entry %q is not a file under metadata/ or targets/", ErrBadBundle, hdr.Name)
		}
		if hdr.Size > maxExportFile {
			return fmt.Errorf("import: %w: entry %q is %d bytes", ErrBadBundle, hdr.Name, hdr.Size)
		}
		dst := filepath.Join(r.Dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return fmt.Errorf("import: %w", err)
		}
		data, err := io.ReadAll(io.LimitReader(tr, maxExportFile))
		if err != nil {
			return fmt.Errorf("import: %w: %v", ErrBadBundle, err)
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			return fmt.Errorf("import: %w", err)
		}
	}
	root, err := metadata.Root().FromFile(r.metaPath("root.json"))
	if err != nil {
		return fmt.Errorf("import: %w: no readable metadata/root.json: %v", ErrBadBundle, err)
	}
	if err := root.VerifyDelegate(metadata.ROOT, root); err != nil {
		return fmt.Errorf("import: %w: root.json does not verify: %v", ErrVerify, err)
	}
	return nil
}
