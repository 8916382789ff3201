package kernel

import (
	"errors"
	"testing"
)

func TestParseRelease(t *testing.T) {
	for _, c := range []struct{ in, abi, flavour, series string }{
		{"6.1.0-54-amd64", "6.1.0-54", "amd64", "6.1"},
		{"6.1.0-54-cloud-amd64", "6.1.0-54", "cloud-amd64", "6.1"},
		{"6.1.0-47-rt-amd64", "6.1.0-47", "rt-amd64", "6.1"},
		{"6.12.117+deb12-amd64", "6.12.117+deb12", "amd64", "6.12"},
		{"6.12.117+deb12-rt-amd64", "6.12.117+deb12", "rt-amd64", "6.12"},
	} {
		r, err := ParseRelease(c.in)
		if err != nil || r.Release != c.in || r.ABI != c.abi || r.Flavour != c.flavour || r.Series != c.series {
			t.Errorf("ParseRelease(%q) = %+v, %v; want %s / %s / %s", c.in, r, err, c.abi, c.flavour, c.series)
		}
	}
	for _, bad := range []string{
		"", "6.1", "6.1.0", "6.1.0-54", "6.1.0-54-", "-amd64", "6.1.0-54-amd64 ", " 6.1.0-54-amd64",
		"6.1.0-54-amd64-dbg", "6.1.0-54-amd64-unsigned", "6.1.0-54-arm64", "6.12-amd64", "6.1.0-54-AMD64",
		"6.1.0-54-amd64/../x", "6.12.117+deb-amd64", "linux-image-6.1.0-54-amd64",
	} {
		if r, err := ParseRelease(bad); !errors.Is(err, ErrBadRelease) {
			t.Errorf("ParseRelease(%q) = %+v, %v; want ErrBadRelease", bad, r, err)
		}
	}
}

func FuzzParseRelease(f *testing.F) {
	for _, s := range []string{"6.1.0-54-amd64", "6.12.117+deb12-cloud-amd64", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRelease(s)
		if err != nil {
			return
		}
		if r.Release != s || r.ABI+"-"+r.Flavour != s {
			t.Fatalf("%q taken apart as %+v", s, r)
		}
		if r2, err := ParseRelease(r.ABI + "-" + r.Flavour); err != nil || r2 != r {
			t.Fatalf("%q: not stable: %+v, %v", s, r2, err)
		}
	})
}

func TestCompilerText(t *testing.T) {
	cfg := []byte("CONFIG_A=y\nCONFIG_CC_VERSION_TEXT=\"gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0\"\nCONFIG_B=y\n")
	if got := CompilerText(cfg); got != "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0" {
		t.Errorf("CompilerText = %q", got)
	}
	if got := CompilerText([]byte("CONFIG_A=y\n")); got != "" {
		t.Errorf("CompilerText without the option = %q", got)
	}
}
