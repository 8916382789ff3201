package kernel

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// AddOptions tune Add.
type AddOptions struct {
	// Install also installs the image and headers on this system with
	// apt-get (root only). Without it nothing goes into /boot,
	// /lib/modules or /usr/src.
	Install bool
	// Progress receives one line per step; default: discarded.
	Progress io.Writer
	Log      *slog.Logger
}

// Deb is one package file Add used.
type Deb struct {
	Package
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	Reused bool   `json:"reused"` // already in the cache with the archive's SHA256
}

// Added is what Add did.
type Added struct {
	Profile *Profile      `json:"profile"`
	Debs    []Deb         `json:"debs"`
	Ready   bool          `json:"already_ready"` // the cache had the kernel already: nothing done
	Elapsed time.Duration `json:"elapsed_ns"`
}

// plan is the packages of one kernel, resolved against the archive.
type plan struct {
	rel                                    Release
	image, headers, common, kbuild, source *ArchivePackage
}

// resolve finds the packages of rel in the archive: the image at its
// newest version, the headers and their -common at the same version, the
// kbuild package the headers depend on (that version if the archive still
// has it, else the newest it accepts, as apt would install), and the exact
// source (ErrMissing when the archive no longer has it).
func resolve(ctx context.Context, rel Release) (*plan, error) {
	src := sourcePackage(rel.Series)
	pkgs, err := aptShow(ctx, rel.imagePackage(), rel.headersPackage(), src)
	if err != nil {
		return nil, err
	}
	by := versions(pkgs)
	if len(by[rel.imagePackage()]) == 0 {
		return nil, notOffered(ctx, rel)
	}
	pl := &plan{rel: rel, image: by[rel.imagePackage()][0]}
	exact := ExactSource(pl.image, rel.Series)
	pl.source = find(by, Relation{Name: src, Op: "=", Version: exact}, exact)
	for _, p := range by[rel.headersPackage()] {
		if p.Version == pl.image.Version {
			pl.headers = p
		}
	}
	if pl.source == nil {
		var have []string
		for _, p := range by[src] {
			have = append(have, p.Version)
		}
		if len(have) == 0 {
			have = []string{"none"}
		}
		also := ""
		if pl.headers == nil {
			also = fmt.Sprintf("; nor are its headers (%s %s)", rel.headersPackage(), pl.image.Version)
		}
		return nil, fmt.Errorf("%w: no source in the archive for %s: its exact source %s %s is not there (versions there: %s)%s, and Stitch builds only from a kernel's exact source",
			ErrMissing, rel.Release, src, exact, strings.Join(have, ", "), also)
	}
	if pl.headers == nil {
		return nil, fmt.Errorf("%w: %s %s (the headers of %s %s)", ErrMissing, rel.headersPackage(), pl.image.Version, rel.imagePackage(), pl.image.Version)
	}
	var common, kbuild *Relation
	for _, alts := range pl.headers.Depends {
		for i, r := range alts {
			switch {
			case strings.HasPrefix(r.Name, "linux-headers-") && strings.HasSuffix(r.Name, "-common"):
				common = &alts[i]
			case strings.HasPrefix(r.Name, "linux-kbuild-"):
				kbuild = &alts[i]
			}
		}
	}
	if common == nil || kbuild == nil {
		return nil, fmt.Errorf("%w: %s %s depends on no linux-headers-*-common or linux-kbuild-* package: %v", ErrBadControl, pl.headers.Package, pl.headers.Version, pl.headers.Depends)
	}
	more, err := aptShow(ctx, common.Name, kbuild.Name)
	if err != nil {
		return nil, err
	}
	by = versions(more)
	if pl.common = find(by, *common, pl.headers.Version); pl.common == nil {
		return nil, fmt.Errorf("%w: %s, which %s needs", ErrMissing, common, pl.headers.Package)
	}
	if pl.kbuild = find(by, *kbuild, pl.headers.Version); pl.kbuild == nil {
		return nil, fmt.Errorf("%w: %s, which %s needs", ErrMissing, kbuild, pl.headers.Package)
	}
	return pl, nil
}

// notOffered is the ErrUnknown error for a release the archive lacks,
// naming those of its flavour that it has.
func notOffered(ctx context.Context, rel Release) error {
	offers, err := Archive(ctx)
	if err != nil {
		return fmt.Errorf("%w: %s is not in the archive (%v)", ErrUnknown, rel.imagePackage(), err)
	}
	var with, without []string
	for _, o := range offers {
		switch {
		case o.Flavour != rel.Flavour:
		case o.SourceAvailable:
			with = append(with, o.Release)
		default:
			without = append(without, o.Release)
		}
	}
	return fmt.Errorf("%w: the archive has no %s; of flavour %s it offers %s with their source, and %d without (`stitch kernel list` shows them all)",
		ErrUnknown, rel.imagePackage(), rel.Flavour, strings.Join(with, ", "), len(without))
}

// Add fetches release into the cache: its image, headers (with their
// -common and kbuild packages) and exact source are downloaded into
// $CACHE/debs (a deb already there with the archive's SHA256 is reused),
// the first four are extracted into $CACHE/kernels/RELEASE/root, and the
// profile is written beside them. The kernel appears complete or not at
// all. A kernel already in the cache is left as it is.
func Add(ctx context.Context, cache, release string, o AddOptions) (*Added, error) {
	start := time.Now()
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	say := func(format string, args ...any) {
		fmt.Fprintf(o.Progress, "%6.1fs %s: %s\n", time.Since(start).Seconds(), release, fmt.Sprintf(format, args...))
	}
	rel, err := ParseRelease(release)
	if err != nil {
		return nil, err
	}
	if o.Install && os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: --install runs apt-get install, which needs root", ErrNotRoot)
	}
	res := &Added{}
	p, err := openCached(cache, rel)
	switch {
	case err == nil:
		say("already in the cache (%s)", ProfileDir(cache, release))
		res.Profile, res.Ready = p, true
	case !errors.Is(err, errNotHere):
		return nil, err
	default:
		if res.Profile, res.Debs, err = add(ctx, cache, rel, o.Log, say); err != nil {
			return nil, err
		}
	}
	if o.Install {
		p := res.Profile
		say("installing %s and %s %s with apt-get", p.Image.Name, p.Headers.Name, p.Image.Version)
		cmd := exec.CommandContext(ctx, "apt-get", "install", "-y", "-q", "--no-install-recommends",
			p.Image.Name+"="+p.Image.Version, p.Headers.Name+"="+p.Headers.Version)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("install %s: apt-get install: %w\n%s", release, err, lastLines(string(out), 10))
		}
	}
	res.Elapsed = time.Since(start)
	say("ready in %.1fs: boot image %s", res.Elapsed.Seconds(), res.Profile.BootImage)
	return res, nil
}

// add resolves, fetches and extracts a kernel the cache lacks.
func add(ctx context.Context, cache string, rel Release, log *slog.Logger, say func(string, ...any)) (*Profile, []Deb, error) {
	say("resolving packages with apt-cache")
	pl, err := resolve(ctx, rel)
	if err != nil {
		return nil, nil, err
	}
	// Locked only now, so that a refused add leaves no lock file.
	unlock, err := Lock(ctx, ProfileDir(cache, rel.Release)+".lock", log)
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	if p, err := openCached(cache, rel); err == nil {
		say("added meanwhile by another process")
		return p, nil, nil
	}
	dir := ProfileDir(cache, rel.Release)
	if _, err := os.Stat(dir); err == nil {
		return nil, nil, fmt.Errorf("%w: %s exists but holds no profile (remove it with `stitch kernel rm %s`, then add it again)", ErrIncomplete, dir, rel.Release)
	}
	// What an add of this release that was killed left behind: under the
	// lock, nobody else is writing there.
	if stale, err := filepath.Glob(filepath.Join(filepath.Dir(dir), "."+rel.Release+".add-*")); err == nil {
		for _, d := range stale {
			log.Info("removing an interrupted add", "dir", d)
			os.RemoveAll(d)
		}
	}
	say("image %s, exact source %s %s", pl.image.Version, pl.source.Package, pl.source.Version)
	debs := filepath.Join(cache, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return nil, nil, fmt.Errorf("kernel cache: %w", err)
	}
	paths := map[*ArchivePackage]string{}
	var used []Deb
	for _, p := range []*ArchivePackage{pl.image, pl.headers, pl.common, pl.kbuild, pl.source} {
		d, err := fetchDeb(ctx, debs, p, say)
		if err != nil {
			return nil, nil, err
		}
		paths[p] = d.Path
		used = append(used, d)
	}
	p, err := extract(ctx, cache, pl, paths, say)
	if err != nil {
		return nil, nil, err
	}
	return p, used, nil
}

// ErrNotRoot means an operation needs root.
var ErrNotRoot = errors.New("not root")

// fetchDeb puts p's .deb into dir: the file already there if its SHA256
// is the archive's, else a fresh `apt-get download` (into a temporary
// directory first, so that a broken download never takes the name).
func fetchDeb(ctx context.Context, dir string, p *ArchivePackage, say func(string, ...any)) (Deb, error) {
	d := Deb{Package: Package{Name: p.Package, Version: p.Version}, Path: filepath.Join(dir, p.DebName()), Size: p.Size}
	if p.SHA256 == "" {
		return d, fmt.Errorf("%w: the archive gives no SHA256 for %s %s", ErrBadControl, p.Package, p.Version)
	}
	if sum, err := fileSHA256(d.Path); err == nil && sum == p.SHA256 {
		say("reusing %s (SHA256 matches the archive's)", filepath.Base(d.Path))
		d.Reused = true
		return d, nil
	} else if err == nil {
		say("%s in the cache does not match the archive's SHA256: downloading it again", filepath.Base(d.Path))
	}
	say("downloading %s %s (%.1f MB)", p.Package, p.Version, float64(p.Size)/1e6)
	tmp, err := os.MkdirTemp(dir, ".download-")
	if err != nil {
		return d, fmt.Errorf("download %s: %w", p.Package, err)
	}
	defer os.RemoveAll(tmp)
	// apt fetches as the _apt user when it can write there.
	os.Chmod(tmp, 0o777)
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", p.Package+"="+p.Version)
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		return d, fmt.Errorf("download %s %s: apt-get download: %w\n%s", p.Package, p.Version, err, lastLines(string(out), 10))
	}
	got := filepath.Join(tmp, p.DebName())
	sum, err := fileSHA256(got)
	if err != nil {
		return d, fmt.Errorf("download %s %s: apt-get download made no %s: %w", p.Package, p.Version, p.DebName(), err)
	}
	if sum != p.SHA256 {
		return d, fmt.Errorf("download %s %s: SHA256 %s, the archive says %s", p.Package, p.Version, sum, p.SHA256)
	}
	if err := os.Chmod(got, 0o644); err != nil {
		return d, err
	}
	if err := os.Rename(got, d.Path); err != nil {
		return d, fmt.Errorf("download %s: %w", p.Package, err)
	}
	return d, nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// extract unpacks the image, headers, -common and kbuild packages into a
// temporary directory beside the profile's, makes their paths work there,
// writes the profile and renames the directory into place.
func extract(ctx context.Context, cache string, pl *plan, debs map[*ArchivePackage]string, say func(string, ...any)) (*Profile, error) {
	final := ProfileDir(cache, pl.rel.Release)
	if err := os.MkdirAll(filepath.Dir(final), 0o755); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(final), "."+pl.rel.Release+".add-")
	if err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp) // a no-op once renamed
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, err
	}
	root := filepath.Join(tmp, "root")
	for _, p := range []*ArchivePackage{pl.image, pl.headers, pl.common, pl.kbuild} {
		say("extracting %s", filepath.Base(debs[p]))
		cmd := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[p], root)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("extract %s: dpkg-deb -x: %w\n%s", debs[p], err, lastLines(string(out), 10))
		}
	}
	if err := relativeLinks(root); err != nil {
		return nil, fmt.Errorf("extract %s: %w", pl.rel.Release, err)
	}
	// The package ships no modules.dep, modules.alias, ...: apt's
	// postinst makes them. The corpus VMs resolve module dependencies
	// and aliases from them as an installed system would.
	say("indexing modules (depmod)")
	if err := depmod(ctx, root, pl.rel.Release); err != nil {
		return nil, fmt.Errorf("extract %s: %w", pl.rel.Release, err)
	}
	headers := filepath.Join("usr", "src", "linux-headers-"+pl.rel.Release)
	if err := fixHeadersMakefile(root, headers); err != nil {
		return nil, fmt.Errorf("extract %s: %w", pl.rel.Release, err)
	}
	p := &Profile{
		Release: pl.rel.Release, ABI: pl.rel.ABI, Flavour: pl.rel.Flavour, Series: pl.rel.Series,
		Image:         Package{Name: pl.image.Package, Version: pl.image.Version},
		Headers:       Package{Name: pl.headers.Package, Version: pl.headers.Version},
		Source:        Package{Name: pl.source.Package, Version: pl.source.Version},
		HeadersCommon: Package{Name: pl.common.Package, Version: pl.common.Version},
		Kbuild:        Package{Name: pl.kbuild.Package, Version: pl.kbuild.Version},
		BootImage:     filepath.Join("root", "boot", "vmlinuz-"+pl.rel.Release),
		Config:        filepath.Join("root", "boot", "config-"+pl.rel.Release),
		Modules:       filepath.Join("root", "lib", "modules", pl.rel.Release),
		HeadersDir:    filepath.Join("root", headers),
	}
	if p.Compiler, err = compilerOf(filepath.Join(tmp, p.Config)); err != nil {
		return nil, err
	}
	// The file keeps paths relative to its directory; openCached resolves
	// them (and sets the source deb and origin, which depend on where the
	// cache is).
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(tmp, profileFile), append(b, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	return openCached(cache, pl.rel)
}

// depmod writes the module index files of release under root.
func depmod(ctx context.Context, root, release string) error {
	bin, err := exec.LookPath("depmod")
	if err != nil {
		bin = "/sbin/depmod" // not on a user's PATH on Debian
	}
	if out, err := exec.CommandContext(ctx, bin, "-b", root, release).CombinedOutput(); err != nil {
		return fmt.Errorf("depmod (install kmod): %w\n%s", err, lastLines(string(out), 10))
	}
	return nil
}

// relativeLinks makes every absolute symbolic link under root (like
// lib/modules/R/build -> /usr/src/linux-headers-R) point to the same
// path inside root, relative, so that nothing in the extracted packages
// leads into the system's own files.
func relativeLinks(root string) error {
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink == 0 {
			return err
		}
		target, err := os.Readlink(path)
		if err != nil || !filepath.IsAbs(target) {
			return err
		}
		rel, err := filepath.Rel(filepath.Dir(path), filepath.Join(root, target))
		if err != nil {
			return err
		}
		if err := os.Remove(path); err != nil {
			return err
		}
		return os.Symlink(rel, path)
	})
}

// Debian's arch-specific headers Makefile includes the -common tree's by
// its installed path: include /usr/src/linux-headers-R-common/Makefile.
var includeRE = regexp.MustCompile(`(?m)^include /usr/src/([^/\s]+)/Makefile$`)

// fixHeadersMakefile points that include at the -common tree beside the
// headers, wherever they are: relative to the Makefile's own directory,
// which make knows as the last word of MAKEFILE_LIST.
func fixHeadersMakefile(root, headers string) error {
	path := filepath.Join(root, headers, "Makefile")
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("headers: %w", err)
	}
	m := includeRE.FindSubmatch(b)
	if m == nil {
		return fmt.Errorf("headers: %s does not include a /usr/src/*/Makefile: not a Debian headers tree Stitch knows", path)
	}
	if _, err := os.Stat(filepath.Join(root, "usr", "src", string(m[1]), "Makefile")); err != nil {
		return fmt.Errorf("headers: %s includes %s, which its packages do not hold: %w", path, m[1], err)
	}
	fixed := includeRE.ReplaceAll(b, []byte("include $(dir $(lastword $(MAKEFILE_LIST)))../$1/Makefile"))
	return os.WriteFile(path, fixed, 0o644)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
