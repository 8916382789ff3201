// Package bundle is the unit Stitch distributes: a livepatch module and its
// manifest (contract.Manifest, as stitch build writes it), content-addressed
// by SHA-256, published into a repository whose metadata is signed with The
// Update Framework (TUF), and fetched by agents through a client that
// refuses tampered, rolled-back, mixed or stale metadata. The same
// repository signs contained records (contract.Contained: a kernel whose
// source already holds a fix), as targets of their own.
//
// The data flow is one way: bundle knows build's manifest but nothing of
// the server or the agent.
package bundle

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kmod"
)

// Sentinel errors. ErrBadBundle means bad input (the file is not what it
// should be; a bad manifest inside is contract.ErrBadManifest); ErrVerify means
// signed metadata or content was refused; ErrNoRepo and ErrNotFound mean a
// missing repository or target.
var (
	ErrBadBundle = errors.New("bad bundle")
	ErrVerify    = errors.New("verification refused")
	ErrNoRepo    = errors.New("no repository")
	ErrNotFound  = errors.New("not found")
	ErrExists    = errors.New("already exists")
)

// SHA256Hex is the lower-case hex SHA-256 of data.
func SHA256Hex(data []byte) string {
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}

// A bundle file is an uncompressed tar holding exactly two regular files,
// manifest.json first and module.ko second. Tar because any operator can
// inspect it with standard tools; fixed order and zeroed headers so the same
// inputs always give the same bytes, hence the same content address.
const (
	manifestEntry = "manifest.json"
	moduleEntry   = "module.ko"
	// MaxModuleSize bounds what Open reads; livepatch modules are far smaller.
	MaxModuleSize   = 64 << 20
	maxManifestSize = 1 << 20
)

// Bundle is a parsed bundle.
type Bundle struct {
	Manifest contract.Manifest
	Module   []byte
}

// Pack builds the bundle bytes and validates the manifest. An empty
// m.ModuleHash is filled from module; one that differs is refused, because
// it means the manifest of another build was paired with this module.
func Pack(m contract.Manifest, module []byte) ([]byte, error) {
	if len(module) == 0 || len(module) > MaxModuleSize {
		return nil, fmt.Errorf("%w: module is %d bytes, want 1..%d", ErrBadBundle, len(module), MaxModuleSize)
	}
	sum := SHA256Hex(module)
	if m.ModuleHash != "" && m.ModuleHash != sum {
		return nil, fmt.Errorf("%w: the manifest's module_sha256 %s is not the module's %s: is this the manifest stitch build wrote with it?", ErrBadBundle, m.ModuleHash, sum)
	}
	m.ModuleHash = sum
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if err := checkModule(&m, module); err != nil {
		return nil, err
	}
	mj, err := json.MarshalIndent(&m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range []struct {
		name string
		data []byte
	}{{manifestEntry, mj}, {moduleEntry, module}} {
		hdr := &tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.data)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Open parses and checks bundle bytes: the two entries in order, a valid
// manifest, and a module whose SHA-256 matches the manifest.
func Open(data []byte) (*Bundle, error) {
	tr := tar.NewReader(bytes.NewReader(data))
	var parts [2][]byte
	for i, want := range []string{manifestEntry, moduleEntry} {
		hdr, err := tr.Next()
		if err != nil {
			return nil, fmt.Errorf("%w: entry %d (%s): %v", ErrBadBundle, i+1, want, err)
		}
		if hdr.Name != want || hdr.Typeflag != tar.TypeReg {
			return nil, fmt.Errorf("%w: entry %d is %q, want regular file %q", ErrBadBundle, i+1, hdr.Name, want)
		}
		limit := int64(maxManifestSize)
		if want == moduleEntry {
			limit = MaxModuleSize
		}
		if hdr.Size < 0 || hdr.Size > limit {
			return nil, fmt.Errorf("%w: %s is %d bytes, at most %d", ErrBadBundle, want, hdr.Size, limit)
		}
		b, err := io.ReadAll(io.LimitReader(tr, limit+1))
		if err != nil {
			return nil, fmt.Errorf("%w: read %s: %v", ErrBadBundle, want, err)
		}
		parts[i] = b
	}
	if _, err := tr.Next(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: extra entries after %s", ErrBadBundle, moduleEntry)
	}
	m, err := contract.ParseManifest(parts[0])
	if err != nil {
		return nil, err
	}
	if len(parts[1]) == 0 {
		return nil, fmt.Errorf("%w: module.ko is empty", ErrBadBundle)
	}
	if got := SHA256Hex(parts[1]); got != m.ModuleHash {
		return nil, fmt.Errorf("%w: module.ko sha256 %s does not match the manifest's %s", ErrBadBundle, got, m.ModuleHash)
	}
	if err := checkModule(m, parts[1]); err != nil {
		return nil, err
	}
	return &Bundle{Manifest: *m, Module: parts[1]}, nil
}

// checkModule holds a bundle's module to its manifest: a livepatch module
// (the kernel runs klp_enable_patch only for livepatch=Y), built for the
// manifest's kernel release, and calling itself by the manifest's name,
// which is the name the kernel gives the patch and a revert aims at.
func checkModule(m *contract.Manifest, module []byte) error {
	km, err := kmod.Read(bytes.NewReader(module))
	switch {
	case err != nil:
		return fmt.Errorf("%w: module.ko: %w", ErrBadBundle, err)
	case !km.Livepatch:
		return fmt.Errorf("%w: module.ko %s: %w: modinfo has no livepatch=Y; bundle the module stitch build wrote", ErrBadBundle, km.Name, kmod.ErrNotLivepatch)
	case km.Release() != m.Kernel.Release:
		return fmt.Errorf("%w: module.ko %s: %w: vermagic names %s, the manifest %s", ErrBadBundle, km.Name, kmod.ErrVermagic, km.Release(), m.Kernel.Release)
	case km.Name != m.Name:
		return fmt.Errorf("%w: module.ko calls itself %s, the manifest %s: is this the manifest stitch build wrote with it?", ErrBadBundle, km.Name, m.Name)
	}
	return nil
}

// TargetName is the bundle's name in a repository (contract.TargetName).
func TargetName(m *contract.Manifest, data []byte) string {
	return contract.TargetName(m, SHA256Hex(data))
}
