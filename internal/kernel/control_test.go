package kernel

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestParseControl(t *testing.T) {
	data := "Package: a\r\nVersion: 1.0-1\nDescription: short\n long line\n .\n\tmore\n\n\n\npackage: b\nVERSION: 2\n"
	st, err := ParseControl([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 2 || st[0].Get("package") != "a" || st[0].Get("Version") != "1.0-1" || st[1].Get("Package") != "b" || st[1].Get("version") != "2" {
		t.Fatalf("stanzas %q", st)
	}
	if d := st[0].Get("Description"); d != "short\nlong line\n.\nmore" {
		t.Errorf("description %q", d)
	}
	for _, bad := range []string{" continued\nPackage: a\n", "Package a\n", "Package: a\nPackage: b\n", ": x\n", "Pack age: a\n"} {
		if _, err := ParseControl([]byte(bad)); !errors.Is(err, ErrBadControl) {
			t.Errorf("%q: err = %v, want ErrBadControl", bad, err)
		}
	}
}

func TestParseRelations(t *testing.T) {
	rs, err := ParseRelations("linux-headers-6.1.0-53-common (= 6.1.187-1), linux-kbuild-6.1 (>= 6.1.187-1), kmod | linux-initramfs-tool, libc6:any (>> 2.34) [amd64] <!nocheck>, old (< 1), ")
	if err != nil {
		t.Fatal(err)
	}
	want := [][]Relation{
		{{"linux-headers-6.1.0-53-common", "=", "6.1.187-1"}},
		{{"linux-kbuild-6.1", ">=", "6.1.187-1"}},
		{{"kmod", "", ""}, {"linux-initramfs-tool", "", ""}},
		{{"libc6", ">>", "2.34"}},
		{{"old", "<=", "1"}},
	}
	if len(rs) != len(want) {
		t.Fatalf("relations %v", rs)
	}
	for i := range want {
		if len(rs[i]) != len(want[i]) {
			t.Fatalf("relation %d: %v", i, rs[i])
		}
		for j := range want[i] {
			if rs[i][j] != want[i][j] {
				t.Errorf("relation %d.%d: %v, want %v", i, j, rs[i][j], want[i][j])
			}
		}
	}
	for _, bad := range []string{"a (= 1", "a (~ 1)", "A", "a (>= x1)", "a [amd64", "a ()", "a b"} {
		if rs, err := ParseRelations(bad); err == nil {
			t.Errorf("%q parsed as %v", bad, rs)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	// Each is older than the next, as dpkg --compare-versions orders them.
	order := []string{"1.0~rc1", "1.0", "1.0-1", "1.0-1+b1", "1.0a", "1.1", "6.1.170-3", "6.1.176-1", "6.1.187-1", "6.1.192-3",
		"6.12.107-1~deb12u1", "6.12.117-1~deb12u1", "6.12.117-1", "1:0.1"}
	for i := range order {
		for j := range order {
			got := CompareVersions(order[i], order[j])
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got != want {
				t.Errorf("CompareVersions(%q, %q) = %d, want %d", order[i], order[j], got, want)
			}
		}
	}
	if CompareVersions("01.0", "1.0") != 0 || CompareVersions("1.00010", "1.10") != 0 {
		t.Error("leading zeros count")
	}
}

// The archive's own metadata, as apt-cache show printed it on Debian 12
// (testdata/apt-cache-show.txt): the exact source of each image, the
// headers' -common and kbuild packages, and which sources are there.
func TestArchiveMetadata(t *testing.T) {
	b, err := os.ReadFile("testdata/apt-cache-show.txt")
	if err != nil {
		t.Fatal(err)
	}
	pkgs, err := ParsePackages(b)
	if err != nil {
		t.Fatal(err)
	}
	by := versions(pkgs)
	img := func(name string) *ArchivePackage {
		if len(by[name]) == 0 {
			t.Fatalf("no %s", name)
		}
		return by[name][0]
	}
	for name, want := range map[string]string{
		"linux-image-6.1.0-47-amd64":       "6.1.170-3",
		"linux-image-6.1.0-48-amd64":       "6.1.172-1",
		"linux-image-6.1.0-53-cloud-amd64": "6.1.187-1",
		"linux-image-6.12.117+deb12-amd64": "6.12.117-1~deb12u1",
	} {
		rel, _ := ParseRelease(strings.TrimPrefix(name, "linux-image-"))
		if got := ExactSource(img(name), rel.Series); got != want {
			t.Errorf("%s: exact source %s, want %s", name, got, want)
		}
	}
	if p := img("linux-image-6.1.0-53-cloud-amd64"); p.Source != "linux-signed-amd64" || p.SourceVersion != "6.1.187+1" || p.Size <= 0 || len(p.SHA256) != 64 ||
		p.DebName() != "linux-image-6.1.0-53-cloud-amd64_6.1.187-1_amd64.deb" {
		t.Errorf("image %+v", p)
	}
	// The headers want kbuild >= their version; the archive kept only
	// newer kbuilds, so the newest is the one apt would install.
	h := img("linux-headers-6.1.0-53-amd64")
	var kb Relation
	for _, alts := range h.Depends {
		if strings.HasPrefix(alts[0].Name, "linux-kbuild-") {
			kb = alts[0]
		}
	}
	if kb != (Relation{"linux-kbuild-6.1", ">=", "6.1.187-1"}) {
		t.Fatalf("kbuild relation %v", kb)
	}
	if p := find(by, kb, h.Version); p == nil || p.Version != by["linux-kbuild-6.1"][0].Version || CompareVersions(p.Version, "6.1.187-1") <= 0 {
		t.Errorf("kbuild for %s: %+v", h.Version, p)
	}
	var images []*ArchivePackage
	for name, ps := range by {
		if strings.HasPrefix(name, "linux-image-") {
			images = append(images, ps...)
		}
	}
	offers, err := offers(images, func(series []string) ([]*ArchivePackage, error) {
		if strings.Join(series, " ") != "6.1 6.12" {
			t.Errorf("series %v", series)
		}
		return append(by["linux-source-6.1"], by["linux-source-6.12"]...), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, o := range offers {
		got[o.Release] = o.SourceAvailable
	}
	want := map[string]bool{"6.1.0-47-amd64": true, "6.1.0-48-amd64": false, "6.1.0-53-cloud-amd64": true, "6.12.117+deb12-amd64": true}
	if len(got) != len(want) {
		t.Errorf("offers %+v", offers)
	}
	for r, w := range want {
		if got[r] != w {
			t.Errorf("%s: source available %v, want %v", r, got[r], w)
		}
	}
	if offers[0].Release != "6.1.0-47-amd64" || offers[len(offers)-1].Release != "6.12.117+deb12-amd64" {
		t.Errorf("not sorted: %+v", offers)
	}
}

func FuzzParseControl(f *testing.F) {
	f.Add([]byte("Package: linux-headers-6.1.0-53-amd64\nSource: linux\nVersion: 6.1.187-1\nArchitecture: amd64\nDepends: linux-headers-6.1.0-53-common (= 6.1.187-1), linux-kbuild-6.1 (>= 6.1.187-1), linux-compiler-gcc-12-x86\nFilename: pool/updates/main/l/linux/linux-headers-6.1.0-53-amd64_6.1.187-1_amd64.deb\nSize: 1741520\nSHA256: 42430d2556f9ed478eeac0860c3b89996451a2cd65531db044d1f63136161e6a\n\nPackage: linux-image-6.1.0-53-amd64\nSource: linux-signed-amd64 (6.1.187+1)\nVersion: 6.1.187-1\nBuilt-Using: linux (= 6.1.187-1)\n"))
	f.Add([]byte("Package: a\nVersion: 1\nDepends: b (>= 1) | c, d [amd64]\nBuilt-Using: linux (= 1-1)\nSize: 3\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ParseControl(data)
		if err != nil {
			return
		}
		for _, s := range st {
			if len(s) == 0 {
				t.Fatal("empty stanza")
			}
			p, err := ParsePackage(s)
			if err != nil {
				continue
			}
			if p.Package == "" || checkVersion(p.Version) != nil {
				t.Fatalf("package %+v accepted", p)
			}
		}
	})
}

func FuzzCompareVersions(f *testing.F) {
	f.Add("6.1.170-3", "6.1.187-1")
	f.Add("1.0~rc1", "1.0")
	f.Add("1:2", "3")
	f.Fuzz(func(t *testing.T, a, b string) {
		if checkVersion(a) != nil || checkVersion(b) != nil {
			return
		}
		ab, ba := CompareVersions(a, b), CompareVersions(b, a)
		if ab != -ba || CompareVersions(a, a) != 0 {
			t.Fatalf("%q vs %q: %d, %d", a, b, ab, ba)
		}
	})
}

func FuzzParseRelations(f *testing.F) {
	f.Add("linux-headers-6.1.0-53-common (= 6.1.187-1), linux-kbuild-6.1 (>= 6.1.187-1)")
	f.Add("a | b [amd64] <!nocheck>, c:any (<< 2)")
	f.Fuzz(func(t *testing.T, s string) {
		rs, err := ParseRelations(s)
		if err != nil {
			return
		}
		for _, alts := range rs {
			for _, r := range alts {
				if !validName(r.Name) || (r.Op != "") != (r.Version != "") {
					t.Fatalf("%q: relation %+v", s, r)
				}
				// What parsed prints back as itself.
				again, err := ParseRelations(r.String())
				if err != nil || len(again) != 1 || again[0][0] != r {
					t.Fatalf("%q: %v reparsed as %v, %v", s, r, again, err)
				}
			}
		}
	})
}
