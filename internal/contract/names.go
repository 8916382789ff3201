package contract

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// The shapes of the names every stage checks. Each is anchored: a name is
// valid whole or not at all.
var (
	// The kernel keeps 55 usable bytes of a module's name.
	nameRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,55}$`)
	// A release starts with a letter or digit, so that none is "." or
	// "..": it is a directory in a repository.
	releaseRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$`)
	buildIDRe = regexp.MustCompile(`^[0-9a-f]{8,128}$`)
	sha256Re  = regexp.MustCompile(`^[0-9a-f]{64}$`)
	symbolRe  = regexp.MustCompile(`^[A-Za-z0-9_.$-]{1,128}$`)
	// A git commit id, abbreviated (7 digits at least, as git prints
	// them) or whole (40 for SHA-1, 64 for SHA-256 repositories).
	commitRe  = regexp.MustCompile(`^[0-9a-f]{7,64}$`)
	versionRe = regexp.MustCompile(`^[A-Za-z0-9._+~-]{0,64}$`)
	// cvePattern is a CVE id as MITRE assigns them: a year and at least
	// four digits (seven is the most any has had).
	cvePattern = `CVE-[0-9]{4}-[0-9]{4,7}`
	cveRe      = regexp.MustCompile(`^` + cvePattern + `$`)
	cveFindRe  = regexp.MustCompile(`\b` + cvePattern + `\b`)
	// targetRe is TargetName's form.
	targetRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}/[A-Za-z0-9_-]{1,55}-[0-9a-f]{16}\.stitch$`)
	// containedTargetRe is ContainedTargetName's form.
	containedTargetRe = regexp.MustCompile(`^contained/[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}/[A-Za-z0-9_-]{1,55}-[0-9a-f]{16}\.json$`)
)

// ValidName says whether s can name a livepatch module (and so a patch).
func ValidName(s string) bool { return nameRe.MatchString(s) }

// ValidRelease says whether s has the shape of a kernel release (uname -r).
func ValidRelease(s string) bool { return releaseRe.MatchString(s) }

// ValidBuildID says whether s is a GNU build-id in lower-case hex.
func ValidBuildID(s string) bool { return buildIDRe.MatchString(s) }

// ValidCVE says whether s is one CVE id, CVE-YYYY-NNNN.
func ValidCVE(s string) bool { return cveRe.MatchString(s) }

// ValidCommit says whether s is a git commit id in lower-case hex.
func ValidCommit(s string) bool { return commitRe.MatchString(s) }

// ValidAgentVersion says whether s can be an agent's version string
// (empty allowed: a development build).
func ValidAgentVersion(s string) bool { return versionRe.MatchString(s) }

// FindCVEs returns the CVE ids in text, in order, each once.
func FindCVEs(text string) []string {
	var ids []string
	for _, c := range cveFindRe.FindAllString(text, -1) {
		if !slices.Contains(ids, c) {
			ids = append(ids, c)
		}
	}
	return ids
}

func validSHA256(s string) bool { return sha256Re.MatchString(s) }

func validSymbol(s string) bool { return symbolRe.MatchString(s) }

// TargetName is the name in a repository of the bundle whose SHA-256
// (lower-case hex) is bundleHash, built from manifest m:
// RELEASE/NAME-HASH16.stitch, the kernel release as a directory, then the
// patch's name and the first 16 hex digits of the bundle's SHA-256, so
// two builds never collide and a name pins exact content.
func TargetName(m *Manifest, bundleHash string) string {
	return fmt.Sprintf("%s/%s-%s.stitch", m.Kernel.Release, m.Name, bundleHash[:min(16, len(bundleHash))])
}

// ValidTarget says whether s is a well-formed target name.
func ValidTarget(s string) bool { return targetRe.MatchString(s) }

// TargetsNamed are the targets among ts that query names: the target
// itself, RELEASE/NAME (the patch NAME built for RELEASE) or NAME (the
// patch NAME for any kernel). More than one means query is ambiguous.
func TargetsNamed(ts []string, query string) []string {
	var out []string
	for _, t := range ts {
		if !ValidTarget(t) {
			continue
		}
		release, file, _ := strings.Cut(t, "/")
		name := file[:strings.LastIndexByte(file, '-')]
		if t == query || query == release+"/"+name || query == name {
			out = append(out, t)
		}
	}
	return out
}
