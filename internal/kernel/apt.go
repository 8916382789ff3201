package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"sort"
	"strings"
)

// ErrNoLists means apt knows no kernel packages: its package lists are
// missing (apt-get update fetches them).
var ErrNoLists = errors.New("apt has no package lists")

// aptShow runs `apt-cache show` for the named packages and returns every
// version of them the archive has. Names apt does not know are left out
// (apt-cache itself fails only when it knows none of them).
func aptShow(ctx context.Context, names ...string) ([]*ArchivePackage, error) {
	if len(names) == 0 {
		return nil, nil
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "apt-cache", append([]string{"show"}, names...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if strings.Contains(stderr.String(), "No packages found") {
			return nil, nil
		}
		return nil, fmt.Errorf("apt-cache show %s: %w: %s", strings.Join(names, " "), err, strings.TrimSpace(stderr.String()))
	}
	pkgs, err := ParsePackages(stdout.Bytes())
	if err != nil {
		return nil, fmt.Errorf("apt-cache show %s: %w", strings.Join(names, " "), err)
	}
	return pkgs, nil
}

// aptNames lists the package names apt knows that start with prefix.
func aptNames(ctx context.Context, prefix string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "pkgnames", prefix).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache pkgnames %s: %w", prefix, err)
	}
	return strings.Fields(string(out)), nil
}

// versions groups packages by name, newest version first.
func versions(pkgs []*ArchivePackage) map[string][]*ArchivePackage {
	by := map[string][]*ArchivePackage{}
	for _, p := range pkgs {
		dup := false
		for _, q := range by[p.Package] {
			// The same version can come from two suites; keep one.
			dup = dup || q.Version == p.Version
		}
		if !dup {
			by[p.Package] = append(by[p.Package], p)
		}
	}
	for _, ps := range by {
		sort.SliceStable(ps, func(i, j int) bool { return CompareVersions(ps[i].Version, ps[j].Version) > 0 })
	}
	return by
}

// find returns the version of name that the relation accepts, preferring
// exactly want when given, then the newest.
func find(by map[string][]*ArchivePackage, rel Relation, want string) *ArchivePackage {
	var best *ArchivePackage
	for _, p := range by[rel.Name] {
		if !rel.Satisfied(p.Version) {
			continue
		}
		if p.Version == want {
			return p
		}
		if best == nil {
			best = p
		}
	}
	return best
}

// ExactSource is the version of the source an image package was built
// from: its Built-Using: linux (= X) (linux-SERIES for the backported
// series), else its own version (the signed image packages and the
// unsigned ones carry the source's version).
func ExactSource(img *ArchivePackage, series string) string {
	for _, r := range img.BuiltUsing {
		if (r.Name == "linux" || r.Name == "linux-"+series) && r.Op == "=" {
			return r.Version
		}
	}
	return img.Version
}

// Offer is a kernel the archive has.
type Offer struct {
	Release string  `json:"release"`
	ABI     string  `json:"abi"`
	Flavour string  `json:"flavour"`
	Series  string  `json:"series"`
	Image   Package `json:"image"`  // the image package at its newest version
	Source  Package `json:"source"` // its exact source: linux-source-SERIES at that version
	// SourceAvailable tells whether the archive still has that source
	// package; without it Stitch cannot build for the kernel.
	SourceAvailable bool `json:"source_available"`
}

// Archive lists the kernels the configured apt archive offers (images of
// releases ParseRelease takes: the flavours Stitch builds for, no -dbg,
// -unsigned or meta packages), each with its exact source and whether the
// archive has it, sorted by release.
func Archive(ctx context.Context) ([]Offer, error) {
	names, err := aptNames(ctx, "linux-image-")
	if err != nil {
		return nil, err
	}
	var images []string
	for _, n := range names {
		if _, err := ParseRelease(strings.TrimPrefix(n, "linux-image-")); err == nil {
			images = append(images, n)
		}
	}
	if len(images) == 0 {
		return nil, fmt.Errorf("%w: apt knows no linux-image package of flavour %s (run apt-get update)", ErrNoLists, strings.Join(Flavours, ", "))
	}
	pkgs, err := aptShow(ctx, images...)
	if err != nil {
		return nil, err
	}
	return offers(pkgs, func(series []string) ([]*ArchivePackage, error) {
		var names []string
		for _, s := range series {
			names = append(names, sourcePackage(s))
		}
		return aptShow(ctx, names...)
	})
}

// offers pairs the image packages with the source packages that sources
// returns for their series.
func offers(images []*ArchivePackage, sources func(series []string) ([]*ArchivePackage, error)) ([]Offer, error) {
	var out []Offer
	seen := map[string]bool{}
	var series []string
	for name, ps := range versions(images) {
		rel, err := ParseRelease(strings.TrimPrefix(name, "linux-image-"))
		if err != nil || !strings.HasPrefix(name, "linux-image-") {
			continue
		}
		img := ps[0]
		out = append(out, Offer{
			Release: rel.Release, ABI: rel.ABI, Flavour: rel.Flavour, Series: rel.Series,
			Image:  Package{Name: img.Package, Version: img.Version},
			Source: Package{Name: sourcePackage(rel.Series), Version: ExactSource(img, rel.Series)},
		})
		if !seen[rel.Series] {
			seen[rel.Series] = true
			series = append(series, rel.Series)
		}
	}
	sort.Strings(series)
	srcs, err := sources(series)
	if err != nil {
		return nil, err
	}
	have := map[Package]bool{}
	for _, p := range srcs {
		have[Package{Name: p.Package, Version: p.Version}] = true
	}
	for i := range out {
		out[i].SourceAvailable = have[out[i].Source]
	}
	sort.Slice(out, func(i, j int) bool { return releaseLess(out[i].Release, out[j].Release) })
	return out, nil
}

// releaseLess orders releases by version, then flavour.
func releaseLess(a, b string) bool {
	ra, ea := ParseRelease(a)
	rb, eb := ParseRelease(b)
	if ea != nil || eb != nil {
		return a < b
	}
	if c := CompareVersions(ra.ABI, rb.ABI); c != 0 {
		return c < 0
	}
	return ra.Flavour < rb.Flavour
}
