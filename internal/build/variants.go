package build

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
)

// ErrNoVariant means a fix has variants, none for a kernel's series.
var ErrNoVariant = errors.New("no variant of the fix for this kernel's series")

// DefaultVariant is the file name of the variant for every series that
// has none of its own.
const DefaultVariant = "default"

var seriesRe = regexp.MustCompile(`^[0-9]+\.[0-9]+$`)

// FixVariants is one fix as given: a single diff for every kernel, or,
// like a stable tree's backports, one diff per kernel series. On disk
// the latter is a directory NAME/ holding SERIES.patch files (6.1.patch,
// 6.12.patch) and optionally default.patch, for the series without one;
// other files (a README) are left alone. Every variant is the same fix:
// the same name, upstream commit and CVE ids (a variant that does not
// say takes them from those that do; two that disagree are refused).
type FixVariants struct {
	Name     string
	Upstream string
	CVEs     []string
	// Single is the fix without variants; nil when it has them.
	Single *Fix
	// Series maps "6.1" to that series' variant; DefaultVariant to the
	// default one.
	Series map[string]*Fix
}

// LoadFix reads a fix from a .patch file or a directory of variants.
func LoadFix(path string) (*FixVariants, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadFix, err)
	}
	if !st.IsDir() {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadFix, err)
		}
		f, err := ParseFix(filepath.Base(path), b)
		if err != nil {
			return nil, err
		}
		return &FixVariants{Name: f.Name, Upstream: f.Upstream, CVEs: f.CVEs, Single: f}, nil
	}
	name := filepath.Base(filepath.Clean(path))
	ents, err := os.ReadDir(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadFix, err)
	}
	v := &FixVariants{Name: name, Series: map[string]*Fix{}}
	for _, e := range ents {
		series, ok := strings.CutSuffix(e.Name(), ".patch")
		if !ok || e.IsDir() {
			continue
		}
		if series != DefaultVariant && !seriesRe.MatchString(series) {
			return nil, fmt.Errorf("%w: %s: variant %s: want SERIES.patch (6.1.patch, 6.12.patch) or %s.patch", ErrBadFix, path, e.Name(), DefaultVariant)
		}
		b, err := os.ReadFile(filepath.Join(path, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadFix, err)
		}
		f, err := ParseFix(name, b)
		if err != nil {
			return nil, fmt.Errorf("variant %s: %w", e.Name(), err)
		}
		f.Variant = series
		v.Series[series] = f
	}
	if len(v.Series) == 0 {
		return nil, fmt.Errorf("%w: %s holds no variant: want SERIES.patch files (6.1.patch, 6.12.patch) or %s.patch", ErrBadFix, path, DefaultVariant)
	}
	if err := v.unify(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

// unify checks that the variants agree on the fix's identity and gives
// each the whole of it.
func (v *FixVariants) unify() error {
	names := v.names()
	var upFrom, cveFrom string
	for _, s := range names {
		f := v.Series[s]
		if f.Upstream != "" {
			if v.Upstream != "" && v.Upstream != f.Upstream {
				return fmt.Errorf("%w: variants %s and %s name different upstream commits (%s, %s): one directory holds one fix", ErrBadFix, upFrom, s, v.Upstream, f.Upstream)
			}
			v.Upstream, upFrom = f.Upstream, s
		}
		if len(f.CVEs) > 0 {
			if v.CVEs != nil && !sameSet(v.CVEs, f.CVEs) {
				return fmt.Errorf("%w: variants %s and %s name different CVEs (%s; %s): one directory holds one fix", ErrBadFix, cveFrom, s, strings.Join(v.CVEs, " "), strings.Join(f.CVEs, " "))
			}
			if v.CVEs == nil {
				v.CVEs, cveFrom = f.CVEs, s
			}
		}
	}
	for _, f := range v.Series {
		f.Upstream, f.CVEs = v.Upstream, v.CVEs
	}
	return nil
}

// ModuleName is the module name a build of the fix gets by default:
// "stitch_" and the fix's file or directory name.
func (v *FixVariants) ModuleName() string {
	if v.Single != nil {
		return moduleName(v.Single)
	}
	return moduleName(&Fix{Fix: contract.Fix{Name: v.Name + ".patch"}})
}

// names lists the variants: series in order, then the default.
func (v *FixVariants) names() []string {
	var out []string
	for s := range v.Series {
		if s != DefaultVariant {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return seriesLess(out[i], out[j]) })
	if _, ok := v.Series[DefaultVariant]; ok {
		out = append(out, DefaultVariant)
	}
	return out
}

// Variants names the variants ("6.1", "6.12", "default"); none for a
// fix without variants.
func (v *FixVariants) Variants() []string {
	if v.Single != nil {
		return nil
	}
	return v.names()
}

// For returns the diff to build for a kernel of series (kernel.Profile's
// Series, "6.1"): the fix itself, the series' variant, or the default.
func (v *FixVariants) For(series string) (*Fix, error) {
	if v.Single != nil {
		return v.Single, nil
	}
	if f, ok := v.Series[series]; ok {
		return f, nil
	}
	if f, ok := v.Series[DefaultVariant]; ok {
		return f, nil
	}
	return nil, fmt.Errorf("%w: fix %s has variants for %s, not for %s: add %s/%s.patch (or %s.patch)", ErrNoVariant, v.Name, strings.Join(v.names(), ", "), series, v.Name, series, DefaultVariant)
}

func sameSet(a, b []string) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(x, y)
}

// seriesLess orders "6.1" before "6.12" before "10.0".
func seriesLess(a, b string) bool {
	var a1, a2, b1, b2 int
	fmt.Sscanf(a, "%d.%d", &a1, &a2)
	fmt.Sscanf(b, "%d.%d", &b1, &b2)
	if a1 != b1 {
		return a1 < b1
	}
	return a2 < b2
}
