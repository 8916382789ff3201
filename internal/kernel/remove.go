package kernel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrSystem means a kernel is the system's (installed by apt), which
// Stitch does not remove.
var ErrSystem = errors.New("kernel installed on the system")

// Removed says what Remove deleted.
type Removed struct {
	Release string   `json:"release"`
	Paths   []string `json:"paths"`
}

// Remove deletes release's entries from the cache: its profile and
// extracted packages, its prepared source tree ($CACHE/kernel/RELEASE)
// and the vmlinux extracted from its boot image; with purge also its
// .debs that no other kernel ready here uses. It refuses a kernel of the
// system's, and one whose tree a build is using.
func Remove(ctx context.Context, cache, release string, purge bool) (*Removed, error) {
	rel, err := ParseRelease(release)
	if err != nil {
		return nil, err
	}
	dir := ProfileDir(cache, release)
	p, err := readProfile(cache, rel)
	switch {
	case err == nil:
	case errors.Is(err, errNotHere):
		if _, err := os.Stat(dir); err == nil {
			p = &Profile{Release: release} // a directory without a profile
			break
		}
		if _, err := os.Stat("/boot/vmlinuz-" + release); err == nil {
			return nil, fmt.Errorf("%w: %s is not in the cache but installed on this system (/boot/vmlinuz-%s); Stitch removes only what `stitch kernel add` fetched (apt-get remove linux-image-%s removes it from the system)",
				ErrSystem, release, release, release)
		}
		return nil, unknown(ctx, cache, release)
	default:
		// Unreadable: removing it is the fix its error suggests.
		p = &Profile{Release: release}
	}
	// The prepared tree's lock (kbuild's): a build holding it would lose
	// its tree.
	tree := TreeDir(cache, release)
	if f, err := os.Open(tree + ".lock"); err == nil {
		defer f.Close()
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			return nil, fmt.Errorf("remove %s: its source tree %s is in use (%v); try again when the build is over", release, tree, err)
		}
	}
	out := &Removed{Release: release}
	// The vmlinux cache is keyed by the image's contents, which an
	// installed kernel of the same release shares: keep it then.
	if p.BootImage != "" {
		if _, err := os.Stat("/boot/vmlinuz-" + release); err != nil {
			if sum, err := fileSHA256(p.BootImage); err == nil {
				out.remove(filepath.Join(cache, "vmlinux", sum+".elf"))
			}
		}
	}
	// Renamed away first, so that no reader sees half a kernel.
	gone := filepath.Join(filepath.Dir(dir), "."+release+".rm")
	if err := os.RemoveAll(gone); err != nil {
		return nil, fmt.Errorf("remove %s: %w", release, err)
	}
	if err := os.Rename(dir, gone); err != nil {
		return nil, fmt.Errorf("remove %s: %w", release, err)
	}
	if err := os.RemoveAll(gone); err != nil {
		return nil, fmt.Errorf("remove %s: %w", release, err)
	}
	out.Paths = append(out.Paths, dir)
	out.remove(tree)
	if purge {
		// Kernels of one ABI share -common, kbuild and source packages.
		keep := map[Package]bool{}
		others, err := List(ctx, cache)
		if err != nil {
			return out, err
		}
		for _, o := range others {
			for _, pkg := range o.packages() {
				keep[pkg] = true
			}
		}
		for _, pkg := range p.packages() {
			if keep[pkg] {
				continue
			}
			matches, _ := filepath.Glob(filepath.Join(cache, "debs", DebName(pkg.Name, pkg.Version, "*")))
			for _, m := range matches {
				out.remove(m)
			}
		}
	}
	return out, nil
}

// packages are the Debian packages a profile names.
func (p *Profile) packages() []Package {
	var out []Package
	for _, pkg := range []Package{p.Image, p.Headers, p.HeadersCommon, p.Kbuild, p.Source} {
		if pkg.Name != "" {
			out = append(out, pkg)
		}
	}
	return out
}

func (r *Removed) remove(path string) {
	if _, err := os.Lstat(path); err != nil {
		return
	}
	if os.RemoveAll(path) == nil {
		r.Paths = append(r.Paths, path)
	}
}
