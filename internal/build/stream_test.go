package build

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestStreamLevels(t *testing.T) {
	s, err := ReadStream("testdata/levels/stream")
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "stitch_test" || s.Levels() != 3 {
		t.Fatalf("stream %s with %d levels", s.Name, s.Levels())
	}
	for _, tc := range []struct {
		level     int
		fixes     []string
		withdrawn []string
		cves      []string
	}{
		{1, []string{"meminfo_a.patch"}, nil, []string{"CVE-2099-0101"}},
		{2, []string{"meminfo_a.patch", "meminfo_b.patch"}, nil, []string{"CVE-2099-0101", "CVE-2099-0102"}},
		{3, []string{"meminfo_b.patch", "binfmt_misc"}, []string{"meminfo_a.patch"}, []string{"CVE-2099-0102", "CVE-2099-0003"}},
	} {
		fixes, l, err := s.Level(tc.level)
		if err != nil {
			t.Fatalf("level %d: %v", tc.level, err)
		}
		var names, cves []string
		for _, f := range fixes {
			names = append(names, f.Name)
			cves = append(cves, f.CVEs...)
		}
		if !slices.Equal(names, tc.fixes) || !slices.Equal(l.Withdrawn, tc.withdrawn) || !slices.Equal(cves, tc.cves) {
			t.Errorf("level %d: fixes %v withdrawn %v CVEs %v; want %v, %v, %v", tc.level, names, l.Withdrawn, cves, tc.fixes, tc.withdrawn, tc.cves)
		}
		if l.Stream != "stitch_test" || l.Number != tc.level || l.Supersedes != tc.level-1 {
			t.Errorf("level %d: %+v", tc.level, l)
		}
	}
	if _, _, err := s.Level(4); !errors.Is(err, ErrBadFix) {
		t.Errorf("level 4 of 3: %v", err)
	}
}

func TestStreamAddsCVEs(t *testing.T) {
	s, err := ParseStream([]byte("stream s\n1 add cmdline.patch CVE-2099-7777\n"))
	if err != nil {
		t.Fatal(err)
	}
	s.Dir = "testdata/fixes"
	fixes, _, err := s.Level(1)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"CVE-2099-0001", "CVE-2099-7777"}; !slices.Equal(fixes[0].Single.CVEs, want) {
		t.Errorf("CVEs %v, want %v", fixes[0].Single.CVEs, want)
	}
}

func TestStreamRefused(t *testing.T) {
	for name, text := range map[string]string{
		"empty":               "",
		"no level":            "stream s\n",
		"no header":           "1 add a.patch\n",
		"bad name":            "stream a-b\n1 add a.patch\n",
		"long name":           "stream " + strings.Repeat("s", 50) + "\n1 add a.patch\n",
		"level 0":             "stream s\n0 add a.patch\n",
		"skips a level":       "stream s\n1 add a.patch\n3 add b.patch\n",
		"goes down":           "stream s\n1 add a.patch\n2 add b.patch\n1 add c.patch\n",
		"starts at 2":         "stream s\n2 add a.patch\n",
		"added twice":         "stream s\n1 add a.patch\n2 add ./a.patch\n",
		"withdraws an absent": "stream s\n1 add a.patch\n2 withdraw b.patch\n",
		"bad verb":            "stream s\n1 drop a.patch\n",
		"bad cve":             "stream s\n1 add a.patch cve-1\n",
		"withdraw with cve":   "stream s\n1 add a.patch\n2 withdraw a.patch CVE-2099-0001\n",
		"no fix":              "stream s\n1 add\n",
		"twice in one level":  "stream s\n1 add a.patch\n2 withdraw a.patch\n2 add a.patch\n",
	} {
		if _, err := ParseStream([]byte(text)); !errors.Is(err, ErrBadFix) {
			t.Errorf("%s: %v, want ErrBadFix", name, err)
		}
	}
	// Withdrawn and added again: a fix may come back.
	s, err := ParseStream([]byte("stream s\n1 add a.patch\n2 withdraw a.patch\n2 add b.patch\n3 add a.patch # again\n"))
	if err != nil {
		t.Fatal(err)
	}
	carried, _, _ := s.LevelFixes(3)
	if len(carried) != 2 || carried[0].Fix != "b.patch" || carried[1].Fix != "a.patch" {
		t.Errorf("level 3 carries %+v", carried)
	}
}

func FuzzParseStream(f *testing.F) {
	f.Add([]byte("stream s\n1 add a.patch CVE-2099-0001\n2 withdraw a.patch\n2 add b\n"))
	f.Add([]byte("stream x # c\n\n1 add ../a\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseStream(b)
		if err != nil {
			return
		}
		for n := 1; n <= s.Levels(); n++ {
			if _, _, err := s.LevelFixes(n); err != nil {
				t.Fatalf("level %d of a parsed stream: %v", n, err)
			}
		}
	})
}
