package kernel

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// ErrBadRelease means a string is not a Debian kernel release.
var ErrBadRelease = errors.New("not a kernel release")

// Flavours are the kernel flavours Stitch builds for: Debian's x86-64
// ones (the live patches it writes are x86-64 only).
var Flavours = []string{"amd64", "cloud-amd64", "rt-amd64"}

// Release is a kernel release (uname -r) taken apart.
type Release struct {
	Release string // 6.1.0-54-amd64
	ABI     string // 6.1.0-54, or 6.12.117+deb12
	Flavour string // amd64
	Series  string // 6.1: the upstream stable series
}

// Debian's two release schemes: 6.1.0-54-amd64 (bookworm's own kernel,
// ABI number after the version) and 6.12.117+deb12-amd64 (the backported
// series, upstream version plus the Debian release).
var releaseRE = regexp.MustCompile(`^((\d{1,3})\.(\d{1,3})\.\d{1,4}(?:-\d{1,4}|\+deb\d{1,3}))-([a-z0-9]+(?:-[a-z0-9]+)*)$`)

// ParseRelease takes a release apart: 6.1.0-54-cloud-amd64 is ABI
// 6.1.0-54, flavour cloud-amd64, series 6.1. It refuses anything else,
// and flavours other than Flavours.
func ParseRelease(s string) (Release, error) {
	m := releaseRE.FindStringSubmatch(s)
	if m == nil {
		return Release{}, fmt.Errorf("%w: %q (want a release as uname -r prints it, like %s or 6.12.117+deb12-amd64)", ErrBadRelease, s, Default)
	}
	r := Release{Release: s, ABI: m[1], Flavour: m[4], Series: m[2] + "." + m[3]}
	for _, f := range Flavours {
		if f == r.Flavour {
			return r, nil
		}
	}
	return Release{}, fmt.Errorf("%w: %q has flavour %q; Stitch builds for the flavours %s", ErrBadRelease, s, r.Flavour, strings.Join(Flavours, ", "))
}

// Package names of a release's parts in Debian; the source package is
// the series'.
func (r Release) imagePackage() string   { return "linux-image-" + r.Release }
func (r Release) headersPackage() string { return "linux-headers-" + r.Release }
func sourcePackage(series string) string { return "linux-source-" + series }
