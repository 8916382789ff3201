package kernel

import "context"

// DebsOf names the .debs Add would use for release (image, headers,
// -common, kbuild, source), as apt-get download names them.
func DebsOf(ctx context.Context, release string) ([]string, error) {
	rel, err := ParseRelease(release)
	if err != nil {
		return nil, err
	}
	pl, err := resolve(ctx, rel)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, p := range []*ArchivePackage{pl.image, pl.headers, pl.common, pl.kbuild, pl.source} {
		out = append(out, p.DebName())
	}
	return out, nil
}
