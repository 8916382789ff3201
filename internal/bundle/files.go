package bundle

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// writeFileAtomic writes data to a temporary file in path's directory,
// fsyncs it, renames it over path and fsyncs the directory: a reader (the
// server, an agent on a file:// mirror) sees the old file or the new one,
// never half of one, and after a crash the rename is either on disk with
// the whole content or not at all.
func writeFileAtomic(path string, data []byte, mode fs.FileMode) error {
	return writeAtomic(path, mode, func(w io.Writer) error {
		if _, err := w.Write(data); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		return nil
	})
}

// writeAtomic is writeFileAtomic for content that write streams; an error
// from write is returned as it is, and path is left untouched.
func writeAtomic(path string, mode fs.FileMode, write func(io.Writer) error) error {
	dir := filepath.Dir(path)
	// The name ends in .tmp so that nothing mistakes it for metadata.
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close() // closed already after a failed rename: harmless
		os.Remove(tmp)
		return err
	}
	if err := write(f); err != nil {
		return fail(err)
	}
	if err := f.Chmod(mode); err != nil {
		return fail(fmt.Errorf("write %s: %w", path, err))
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("write %s: %w", path, err))
	}
	if err := f.Close(); err != nil {
		return fail(fmt.Errorf("write %s: %w", path, err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("write %s: %w", path, err))
	}
	return syncDir(dir)
}

// renameSync renames and fsyncs the directory, so the rename survives a
// crash.
func renameSync(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return syncDir(filepath.Dir(to))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// copyFileAtomic copies src to dst through writeFileAtomic.
func copyFileAtomic(src, dst string, mode fs.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return writeFileAtomic(dst, data, mode)
}

// linkOrCopy makes dst the same file as src: a hard link (so both names
// always hold the same bytes), or a copy where the file system has no
// links. An existing dst is left alone.
func linkOrCopy(src, dst string) error {
	if _, err := os.Lstat(dst); err == nil {
		return nil
	}
	if err := os.Link(src, dst); err == nil {
		return syncDir(filepath.Dir(dst))
	} else if errors.Is(err, fs.ErrExist) {
		return nil
	}
	return copyFileAtomic(src, dst, 0o644)
}

// lockFile is the repository's lock: every change holds it, so `stitch
// publish`, `stitch repo refresh` and the server's refresher (separate
// processes on one directory) never interleave their versions.
const lockFile = ".lock"

// lock takes the repository's exclusive lock, creating dir if needed.
func (r *Repo) lock() (unlock func(), err error) {
	if err := os.MkdirAll(r.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("lock %s: %w", r.Dir, err)
	}
	p := filepath.Join(r.Dir, lockFile)
	// Read-only is enough for flock, so any user who may read the
	// repository may wait for it.
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}
