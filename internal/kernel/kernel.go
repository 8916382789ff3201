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
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Default is the kernel the demo and the tests use when none is named
// (scripts/install-deps.sh installs it).
const Default = "6.1.0-54-amd64"

// CacheDir is the cache Stitch keeps kernels in (profiles and packages,
// prepared source trees, vmlinux extracted from boot images):
// $STITCH_CACHE, or /var/cache/stitch.
func CacheDir() string {
	if d := os.Getenv("STITCH_CACHE"); d != "" {
		return d
	}
	return "/var/cache/stitch"
}

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
	// HeadersCommon and Kbuild are the packages the headers need
	// (linux-headers-6.1.0-54-common, linux-kbuild-6.1); set for kernels
	// in the cache.
	HeadersCommon Package `json:"headers_common,omitzero"`
	Kbuild        Package `json:"kbuild,omitzero"`

	Compiler string `json:"compiler"` // CONFIG_CC_VERSION_TEXT

	BootImage  string `json:"boot_image"`  // vmlinuz
	Config     string `json:"config"`      // config-<release>
	Modules    string `json:"modules"`     // lib/modules/<release>
	HeadersDir string `json:"headers_dir"` // usr/src/linux-headers-<release>
	// SourceDeb and Origin depend on where the profile is read from (the
	// cache may move): not in the cache's profile.json.
	SourceDeb string `json:"source_deb,omitempty"` // the linux-source .deb in the cache
	Origin    string `json:"origin,omitempty"`     // "cache" or "system"
}

// Open returns the profile of release: the cache's ($CACHE/kernels/
// RELEASE, from `stitch kernel add`), else the system's (installed by apt
// into /boot, /lib/modules and /usr/src). A release in neither is
// ErrUnknown, naming the ones that are; a kernel missing a piece Stitch
// needs is ErrIncomplete, saying how to get it.
func Open(ctx context.Context, cache, release string) (*Profile, error) {
	rel, err := ParseRelease(release)
	if err != nil {
		return nil, err
	}
	p, err := openCached(cache, rel)
	if err == nil || !errors.Is(err, errNotHere) {
		return p, err
	}
	p, err = openSystem(ctx, cache, rel)
	if err == nil || !errors.Is(err, errNotHere) {
		return p, err
	}
	return nil, unknown(ctx, cache, release)
}

// unknown is the ErrUnknown error for release, naming the kernels that
// are ready.
func unknown(ctx context.Context, cache, release string) error {
	var ready []string
	if ps, err := List(ctx, cache); err == nil {
		for _, p := range ps {
			ready = append(ready, p.Release)
		}
	}
	have := "none is"
	if len(ready) > 0 {
		have = strings.Join(ready, ", ") + " are"
	}
	return fmt.Errorf("%w: %s is neither in the cache (%s) nor installed (%s ready); fetch it with `stitch kernel add %s` (`stitch kernel list` shows what the archive offers)",
		ErrUnknown, release, filepath.Join(cache, "kernels"), have, release)
}

// errNotHere means a place (cache, system) has no kernel of that release.
var errNotHere = errors.New("not here")

// ErrIncomplete means a kernel lacks a piece Stitch needs (its headers,
// its config...); the error names it and how to get it.
var ErrIncomplete = errors.New("kernel incomplete")

// List returns the profiles of every kernel ready to build for: those in
// the cache and those installed on the system, sorted by release. A
// release in both is listed once, from the cache (as Open picks it).
// Incomplete kernels are left out; Open says what they lack.
func List(ctx context.Context, cache string) ([]*Profile, error) {
	var out []*Profile
	seen := map[string]bool{}
	dirs, err := os.ReadDir(filepath.Join(cache, "kernels"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list kernels: %w", err)
	}
	for _, d := range dirs {
		rel, err := ParseRelease(d.Name())
		if err != nil || !d.IsDir() {
			continue // temporary directories of an add in progress, locks
		}
		if p, err := openCached(cache, rel); err == nil {
			out = append(out, p)
			seen[p.Release] = true
		}
	}
	images, err := filepath.Glob("/boot/vmlinuz-*")
	if err != nil {
		return nil, err
	}
	for _, img := range images {
		rel, err := ParseRelease(strings.TrimPrefix(filepath.Base(img), "vmlinuz-"))
		if err != nil || seen[rel.Release] {
			continue
		}
		if p, err := openSystem(ctx, cache, rel); err == nil {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return releaseLess(out[i].Release, out[j].Release) })
	return out, nil
}

// Origins of a profile.
const (
	OriginCache  = "cache"
	OriginSystem = "system"
)

const profileFile = "profile.json"

// ProfileDir is where the cache keeps release's profile and packages.
func ProfileDir(cache, release string) string {
	return filepath.Join(cache, "kernels", release)
}

// TreeDir is where the cache keeps release's prepared source tree, which
// kbuild prepares and Remove deletes; TreeDir+".lock" is its lock.
func TreeDir(cache, release string) string {
	return filepath.Join(cache, "kernel", release)
}

// openCached reads the cache's profile of rel; errNotHere without one.
func openCached(cache string, rel Release) (*Profile, error) {
	p, err := readProfile(cache, rel)
	if err != nil {
		return nil, err
	}
	if err := p.check("stitch kernel rm " + rel.Release + " && stitch kernel add " + rel.Release); err != nil {
		return nil, err
	}
	return p, nil
}

// readProfile reads a profile file without checking the kernel's files.
func readProfile(cache string, rel Release) (*Profile, error) {
	dir := ProfileDir(cache, rel.Release)
	path := filepath.Join(dir, profileFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNotHere
	}
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", rel.Release, err)
	}
	var p Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("%w: kernel %s: %s: %v (remove it with `stitch kernel rm %s` and add it again)", ErrIncomplete, rel.Release, path, err, rel.Release)
	}
	if p.Release != rel.Release {
		return nil, fmt.Errorf("%w: kernel %s: %s is the profile of %q (remove it with `stitch kernel rm %s` and add it again)", ErrIncomplete, rel.Release, path, p.Release, rel.Release)
	}
	// The file holds paths relative to its directory, so that the cache
	// can move.
	for _, f := range []*string{&p.BootImage, &p.Config, &p.Modules, &p.HeadersDir} {
		if *f != "" && !filepath.IsAbs(*f) {
			*f = filepath.Join(dir, *f)
		}
	}
	p.SourceDeb = filepath.Join(cache, "debs", DebName(p.Source.Name, p.Source.Version, "all"))
	p.Origin = OriginCache
	return &p, nil
}

// check says which of the kernel's files is missing, and the fix.
func (p *Profile) check(fix string) error {
	for _, f := range []struct{ what, path string }{
		{"boot image", p.BootImage},
		{"config", p.Config},
		{"modules", p.Modules},
		{"headers", filepath.Join(p.HeadersDir, "Makefile")},
	} {
		if _, err := os.Stat(f.path); err != nil {
			return fmt.Errorf("%w: kernel %s has no %s: %v (%s)", ErrIncomplete, p.Release, f.what, err, fix)
		}
	}
	return nil
}

// openSystem makes the profile of a kernel installed by apt; errNotHere
// without its boot image.
func openSystem(ctx context.Context, cache string, rel Release) (*Profile, error) {
	p := &Profile{
		Release: rel.Release, ABI: rel.ABI, Flavour: rel.Flavour, Series: rel.Series,
		BootImage:  "/boot/vmlinuz-" + rel.Release,
		Config:     "/boot/config-" + rel.Release,
		Modules:    "/lib/modules/" + rel.Release,
		HeadersDir: "/usr/src/linux-headers-" + rel.Release,
		Origin:     OriginSystem,
	}
	if _, err := os.Stat(p.BootImage); err != nil {
		return nil, errNotHere
	}
	fix := fmt.Sprintf("apt-get install linux-image-%[1]s linux-headers-%[1]s, or fetch it into the cache with `stitch kernel add %[1]s`", rel.Release)
	img, err := dpkgQuery(ctx, rel.imagePackage())
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not from an installed Debian package: %v (%s)", ErrIncomplete, p.BootImage, err, fix)
	}
	hdr, err := dpkgQuery(ctx, rel.headersPackage())
	if err != nil {
		return nil, fmt.Errorf("%w: kernel %s: its headers are not installed: %v (%s)", ErrIncomplete, rel.Release, err, fix)
	}
	bu, err := ParseRelations(img.builtUsing)
	if err != nil {
		return nil, fmt.Errorf("kernel %s: Built-Using of %s: %w", rel.Release, rel.imagePackage(), err)
	}
	ap := &ArchivePackage{Package: rel.imagePackage(), Version: img.version}
	for _, alts := range bu {
		ap.BuiltUsing = append(ap.BuiltUsing, alts...)
	}
	p.Image = Package{Name: rel.imagePackage(), Version: img.version}
	p.Headers = Package{Name: rel.headersPackage(), Version: hdr.version}
	p.Source = Package{Name: sourcePackage(rel.Series), Version: ExactSource(ap, rel.Series)}
	p.SourceDeb = filepath.Join(cache, "debs", DebName(p.Source.Name, p.Source.Version, "all"))
	if err := p.check(fix); err != nil {
		return nil, err
	}
	if p.Compiler, err = compilerOf(p.Config); err != nil {
		return nil, err
	}
	return p, nil
}

type installed struct{ version, builtUsing string }

// dpkgQuery reads an installed package's version and Built-Using.
func dpkgQuery(ctx context.Context, pkg string) (installed, error) {
	out, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Version}\t${Built-Using}", pkg).Output()
	if err != nil {
		return installed{}, fmt.Errorf("dpkg-query %s: %w", pkg, err)
	}
	f := strings.Split(strings.TrimRight(string(out), "\n"), "\t")
	if len(f) != 3 || !strings.HasPrefix(f[0], "ii") {
		return installed{}, fmt.Errorf("%s is not installed", pkg)
	}
	if err := checkVersion(f[1]); err != nil {
		return installed{}, fmt.Errorf("dpkg-query %s: %w", pkg, err)
	}
	return installed{version: f[1], builtUsing: f[2]}, nil
}

// CompilerText is a kernel config's CONFIG_CC_VERSION_TEXT: the first
// line of `gcc --version` of the compiler that built the kernel; "" if
// the config has none.
func CompilerText(config []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(config))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CONFIG_CC_VERSION_TEXT="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return ""
}

func compilerOf(config string) (string, error) {
	b, err := os.ReadFile(config)
	if err != nil {
		return "", fmt.Errorf("kernel config: %w", err)
	}
	cc := CompilerText(b)
	if cc == "" {
		return "", fmt.Errorf("%w: %s has no CONFIG_CC_VERSION_TEXT", ErrIncomplete, config)
	}
	return cc, nil
}
