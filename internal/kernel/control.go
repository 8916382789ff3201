package kernel

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrBadControl means archive metadata could not be parsed.
var ErrBadControl = errors.New("malformed package metadata")

// Stanza is one paragraph of Debian control data (as `apt-cache show`
// prints it): field names, lower-cased, to values. Continuation lines are
// joined with newlines.
type Stanza map[string]string

// Get returns a field, named in any case.
func (s Stanza) Get(field string) string { return s[strings.ToLower(field)] }

// ParseControl splits control data into stanzas. Blank lines separate
// stanzas; a line starting with a space or tab continues the field before.
func ParseControl(data []byte) ([]Stanza, error) {
	var out []Stanza
	var cur Stanza
	last := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 16<<20) // Description fields run long
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimRight(sc.Text(), "\r")
		if strings.TrimSpace(line) == "" {
			if cur != nil {
				out = append(out, cur)
			}
			cur, last = nil, ""
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			if last == "" {
				return nil, fmt.Errorf("%w: line %d: continuation line %q before any field", ErrBadControl, n, line)
			}
			cur[last] += "\n" + strings.TrimSpace(line)
			continue
		}
		name, value, ok := strings.Cut(line, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			return nil, fmt.Errorf("%w: line %d: %q is not a \"Field: value\" line", ErrBadControl, n, line)
		}
		if cur == nil {
			cur = Stanza{}
		}
		last = strings.ToLower(name)
		if _, dup := cur[last]; dup {
			return nil, fmt.Errorf("%w: line %d: field %s repeated in one stanza", ErrBadControl, n, name)
		}
		cur[last] = strings.TrimSpace(value)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: line %d: %w", ErrBadControl, n+1, err)
	}
	if cur != nil {
		out = append(out, cur)
	}
	return out, nil
}

// ArchivePackage is what the archive says of one version of a package.
type ArchivePackage struct {
	Package      string
	Version      string
	Architecture string
	Source       string // the source package's name
	// SourceVersion is the source package's version when it differs
	// from Version (Source: name (version)); "" otherwise.
	SourceVersion string
	BuiltUsing    []Relation   // e.g. linux (= 6.1.187-1)
	Depends       [][]Relation // alternatives within each element
	Filename      string       // path in the archive (pool/...)
	Size          int64
	SHA256        string
}

// DebName is the file name apt-get download gives the package: an
// epoch's colon is written %3a.
func (p *ArchivePackage) DebName() string {
	return DebName(p.Package, p.Version, p.Architecture)
}

// DebName is the file name apt-get download gives a package.
func DebName(name, version, arch string) string {
	return name + "_" + strings.ReplaceAll(version, ":", "%3a") + "_" + arch + ".deb"
}

// ParsePackage reads the fields Stitch uses from a stanza. Package and
// Version are required; a relation field that does not parse is an error.
func ParsePackage(s Stanza) (*ArchivePackage, error) {
	p := &ArchivePackage{
		Package:      s.Get("Package"),
		Version:      s.Get("Version"),
		Architecture: s.Get("Architecture"),
		Filename:     s.Get("Filename"),
		SHA256:       strings.ToLower(s.Get("SHA256")),
	}
	if p.Package == "" || p.Version == "" {
		return nil, fmt.Errorf("%w: a stanza without Package or Version (%q %q)", ErrBadControl, p.Package, p.Version)
	}
	if err := checkVersion(p.Version); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadControl, p.Package, err)
	}
	if src := s.Get("Source"); src != "" {
		rel, err := parseRelation(src)
		if err != nil || (rel.Op != "" && rel.Op != "=") {
			return nil, fmt.Errorf("%w: %s: Source %q", ErrBadControl, p.Package, src)
		}
		p.Source, p.SourceVersion = rel.Name, rel.Version
	}
	if sz := s.Get("Size"); sz != "" {
		n, err := strconv.ParseInt(sz, 10, 64)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%w: %s: Size %q", ErrBadControl, p.Package, sz)
		}
		p.Size = n
	}
	if p.SHA256 != "" && !isHex(p.SHA256, 64) {
		return nil, fmt.Errorf("%w: %s: SHA256 %q is not 64 hex digits", ErrBadControl, p.Package, p.SHA256)
	}
	var err error
	if p.Depends, err = ParseRelations(s.Get("Depends")); err != nil {
		return nil, fmt.Errorf("%w: %s: Depends: %w", ErrBadControl, p.Package, err)
	}
	bu, err := ParseRelations(s.Get("Built-Using"))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: Built-Using: %w", ErrBadControl, p.Package, err)
	}
	for _, alts := range bu {
		p.BuiltUsing = append(p.BuiltUsing, alts...)
	}
	return p, nil
}

// ParsePackages parses `apt-cache show` output into packages.
func ParsePackages(data []byte) ([]*ArchivePackage, error) {
	stanzas, err := ParseControl(data)
	if err != nil {
		return nil, err
	}
	out := make([]*ArchivePackage, 0, len(stanzas))
	for _, s := range stanzas {
		p, err := ParsePackage(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}

// Relation is one package relation: name (op version).
type Relation struct {
	Name    string
	Op      string // "", "<<", "<=", "=", ">=", ">>"
	Version string
}

func (r Relation) String() string {
	if r.Op == "" {
		return r.Name
	}
	return r.Name + " (" + r.Op + " " + r.Version + ")"
}

// Satisfied tells whether version meets the relation's constraint.
func (r Relation) Satisfied(version string) bool {
	if r.Op == "" {
		return true
	}
	c := CompareVersions(version, r.Version)
	switch r.Op {
	case "<<":
		return c < 0
	case "<=":
		return c <= 0
	case "=":
		return c == 0
	case ">=":
		return c >= 0
	case ">>":
		return c > 0
	}
	return false
}

// ParseRelations parses a relation field (Depends, Built-Using):
// comma-separated, each a |-separated list of alternatives. Architecture
// qualifiers (:any), restrictions ([amd64]) and build profiles (<!nocheck>)
// are accepted and dropped.
func ParseRelations(field string) ([][]Relation, error) {
	var out [][]Relation
	if strings.TrimSpace(field) == "" {
		return nil, nil
	}
	for _, group := range strings.Split(field, ",") {
		if strings.TrimSpace(group) == "" {
			continue // a trailing comma, as some packages have
		}
		var alts []Relation
		for _, alt := range strings.Split(group, "|") {
			r, err := parseRelation(alt)
			if err != nil {
				return nil, err
			}
			alts = append(alts, r)
		}
		out = append(out, alts)
	}
	return out, nil
}

func parseRelation(s string) (Relation, error) {
	s, err := dropRestrictions(strings.TrimSpace(s))
	if err != nil {
		return Relation{}, err
	}
	name, rest, _ := strings.Cut(s, "(")
	name = strings.TrimSpace(name)
	name, _, _ = strings.Cut(name, ":") // linux-foo:any
	if !validName(name) {
		return Relation{}, fmt.Errorf("relation %q: %q is not a package name", s, name)
	}
	r := Relation{Name: name}
	if rest == "" {
		if strings.Contains(s, ")") {
			return Relation{}, fmt.Errorf("relation %q: stray )", s)
		}
		return r, nil
	}
	inner, tail, ok := strings.Cut(rest, ")")
	if !ok || strings.TrimSpace(tail) != "" {
		return Relation{}, fmt.Errorf("relation %q: want name (op version)", s)
	}
	inner = strings.TrimSpace(inner)
	for _, op := range []string{"<<", "<=", ">=", ">>", "=", "<", ">"} {
		if v, ok := strings.CutPrefix(inner, op); ok {
			r.Op, r.Version = op, strings.TrimSpace(v)
			break
		}
	}
	if r.Op == "" {
		// Source: name (version) has no operator: it means equality.
		r.Op, r.Version = "=", inner
	}
	switch r.Op { // the deprecated < and > mean <= and >=
	case "<":
		r.Op = "<="
	case ">":
		r.Op = ">="
	}
	if err := checkVersion(r.Version); err != nil {
		return Relation{}, fmt.Errorf("relation %q: %w", s, err)
	}
	return r, nil
}

// dropRestrictions removes [arch...] and <profile> lists outside the
// parentheses of a version constraint.
func dropRestrictions(s string) (string, error) {
	var b strings.Builder
	depth := 0
	var closing byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case closing != 0:
			if c == closing {
				closing = 0
			}
			continue
		case c == '(':
			depth++
		case c == ')':
			depth--
		case depth == 0 && c == '[':
			closing = ']'
			continue
		case depth == 0 && c == '<':
			closing = '>'
			continue
		}
		b.WriteByte(c)
	}
	if closing != 0 {
		return "", fmt.Errorf("relation %q: unclosed restriction", s)
	}
	return strings.TrimSpace(b.String()), nil
}

func validName(s string) bool {
	if len(s) < 2 {
		return false
	}
	for i, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && (c == '+' || c == '-' || c == '.'):
		default:
			return false
		}
	}
	return true
}

// checkVersion refuses what dpkg would not take as a version.
func checkVersion(v string) error {
	if v == "" {
		return errors.New("empty version")
	}
	for _, c := range v {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || strings.ContainsRune(".+-~:", c)) {
			return fmt.Errorf("version %q: character %q", v, c)
		}
	}
	epoch, rest, ok := strings.Cut(v, ":")
	if ok {
		if _, err := strconv.ParseUint(epoch, 10, 32); err != nil {
			return fmt.Errorf("version %q: epoch %q", v, epoch)
		}
	} else {
		rest = v
	}
	if rest == "" || rest[0] < '0' || rest[0] > '9' {
		return fmt.Errorf("version %q: the upstream version must start with a digit", v)
	}
	return nil
}

// CompareVersions orders two Debian versions as dpkg does: <0, 0, >0.
func CompareVersions(a, b string) int {
	ea, ua, ra := splitVersion(a)
	eb, ub, rb := splitVersion(b)
	if ea != eb {
		if ea < eb {
			return -1
		}
		return 1
	}
	if c := compareFragment(ua, ub); c != 0 {
		return c
	}
	return compareFragment(ra, rb)
}

func splitVersion(v string) (epoch uint64, upstream, revision string) {
	if e, rest, ok := strings.Cut(v, ":"); ok {
		epoch, _ = strconv.ParseUint(e, 10, 64)
		v = rest
	}
	if i := strings.LastIndex(v, "-"); i >= 0 {
		return epoch, v[:i], v[i+1:]
	}
	return epoch, v, ""
}

// order is dpkg's weight of a non-digit: ~ sorts before everything, even
// the end of the string; letters before other characters.
func order(c byte) int {
	switch {
	case c == '~':
		return -1
	case c >= '0' && c <= '9':
		return 0
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		return int(c)
	default:
		return int(c) + 256
	}
}

func compareFragment(a, b string) int {
	isDigit := func(c byte) bool { return c >= '0' && c <= '9' }
	for a != "" || b != "" {
		// Non-digit prefixes, character by character.
		for (a != "" && !isDigit(a[0])) || (b != "" && !isDigit(b[0])) {
			var ca, cb int
			if a != "" && !isDigit(a[0]) {
				ca = order(a[0])
			}
			if b != "" && !isDigit(b[0]) {
				cb = order(b[0])
			}
			if ca != cb {
				if ca < cb {
					return -1
				}
				return 1
			}
			if a != "" && !isDigit(a[0]) {
				a = a[1:]
			}
			if b != "" && !isDigit(b[0]) {
				b = b[1:]
			}
		}
		// Digit runs, numerically (without overflow: by length then text).
		i := 0
		for i < len(a) && isDigit(a[i]) {
			i++
		}
		j := 0
		for j < len(b) && isDigit(b[j]) {
			j++
		}
		da, db := strings.TrimLeft(a[:i], "0"), strings.TrimLeft(b[:j], "0")
		a, b = a[i:], b[j:]
		if len(da) != len(db) {
			if len(da) < len(db) {
				return -1
			}
			return 1
		}
		if c := strings.Compare(da, db); c != 0 {
			return c
		}
	}
	return 0
}
