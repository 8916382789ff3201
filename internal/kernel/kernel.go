// Package kernel holds kernel profiles: everything Stitch knows about one
// distro kernel build (release and flavour, the Debian packages of its
// image, headers and exact source, its config and compiler, where its boot
// image, modules and headers are), and fetches kernels into the cache.
//
// A profile comes from the cache ($CACHE/kernels/RELEASE, filled by
// `stitch kernel add`) or from the system (a kernel installed by apt into
// /boot, /lib/modules and /usr/src, like the demo's). Nothing else in
// Stitch names a kernel release except defaults and tests.
package kernel

import (
	"context"
	"errors"
)

// Default is the kernel the demo and the tests use when none is named
// (scripts/install-deps.sh installs it).
const Default = "6.1.0-54-amd64"

var (
	// ErrUnknown means no kernel of that release is in the cache or on the
	// system; the error lists the ones that are.
	ErrUnknown = errors.New("kernel not available")
	// ErrMissing means the archive lacks a package the kernel needs (its
	// exact source, most often); the error names it.
	ErrMissing = errors.New("kernel package not in the archive")
)

// Package is a Debian package at an exact version.
type Package struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// Profile is one kernel build.
type Profile struct {
	Release string `json:"release"` // uname -r: 6.1.0-54-amd64
	ABI     string `json:"abi"`     // 6.1.0-54
	Flavour string `json:"flavour"` // amd64, cloud-amd64, rt-amd64
	Series  string `json:"series"`  // 6.1: the upstream stable series, which picks fix variants

	Image   Package `json:"image"`   // linux-image-6.1.0-54-amd64 6.1.190-1
	Headers Package `json:"headers"` // linux-headers-6.1.0-54-amd64 6.1.190-1
	Source  Package `json:"source"`  // linux-source-6.1 6.1.190-1: the exact source

	Compiler string `json:"compiler"` // CONFIG_CC_VERSION_TEXT

	BootImage  string `json:"boot_image"`  // vmlinuz
	Config     string `json:"config"`      // config-<release>
	Modules    string `json:"modules"`     // lib/modules/<release>
	HeadersDir string `json:"headers_dir"` // usr/src/linux-headers-<release>
	SourceDeb  string `json:"source_deb"`  // the linux-source .deb in the cache

	Origin string `json:"origin"` // "cache" or "system"
}

// Open returns the profile of release from the cache or the system.
func Open(ctx context.Context, cache, release string) (*Profile, error) {
	return nil, errors.New("kernel.Open: not implemented yet")
}

// List returns the profiles of every kernel ready to build for: those in
// the cache and those installed on the system, sorted by release.
func List(ctx context.Context, cache string) ([]*Profile, error) {
	return nil, errors.New("kernel.List: not implemented yet")
}
