package kernel

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A failed extraction leaves nothing in the cache: no kernel directory,
// no temporary one.
func TestExtractAllOrNothing(t *testing.T) {
	cache := t.TempDir()
	bad := filepath.Join(cache, "not-a.deb")
	if err := os.WriteFile(bad, []byte("!<arch>\nbroken"), 0o644); err != nil {
		t.Fatal(err)
	}
	rel, _ := ParseRelease("6.1.0-47-amd64")
	pkg := func(name string) *ArchivePackage { return &ArchivePackage{Package: name, Version: "6.1.170-3"} }
	pl := &plan{rel: rel, image: pkg("linux-image-6.1.0-47-amd64"), headers: pkg("linux-headers-6.1.0-47-amd64"),
		common: pkg("linux-headers-6.1.0-47-common"), kbuild: pkg("linux-kbuild-6.1"), source: pkg("linux-source-6.1")}
	debs := map[*ArchivePackage]string{pl.image: bad, pl.headers: bad, pl.common: bad, pl.kbuild: bad}
	if _, err := extract(context.Background(), cache, pl, debs, func(string, ...any) {}); err == nil {
		t.Fatal("a broken deb was extracted")
	}
	ents, err := os.ReadDir(filepath.Join(cache, "kernels"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
}

// The headers Makefile's include of the -common tree is made relative to
// the Makefile itself; a Makefile without it is refused.
func TestFixHeadersMakefile(t *testing.T) {
	root := t.TempDir()
	h := filepath.Join("usr", "src", "linux-headers-6.1.0-47-amd64")
	os.MkdirAll(filepath.Join(root, h), 0o755)
	os.MkdirAll(filepath.Join(root, "usr", "src", "linux-headers-6.1.0-47-common"), 0o755)
	os.WriteFile(filepath.Join(root, "usr", "src", "linux-headers-6.1.0-47-common", "Makefile"), nil, 0o644)
	mk := filepath.Join(root, h, "Makefile")
	os.WriteFile(mk, []byte("include /usr/src/linux-headers-6.1.0-47-common/Makefile\n"), 0o644)
	if err := fixHeadersMakefile(root, h); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(mk); string(b) != "include $(dir $(lastword $(MAKEFILE_LIST)))../linux-headers-6.1.0-47-common/Makefile\n" {
		t.Errorf("Makefile %q", b)
	}
	os.WriteFile(mk, []byte("include /usr/src/linux-headers-6.1.0-99-common/Makefile\n"), 0o644)
	if err := fixHeadersMakefile(root, h); err == nil || !strings.Contains(err.Error(), "do not hold") {
		t.Errorf("missing -common: %v", err)
	}
	os.WriteFile(mk, []byte("obj-y := x.o\n"), 0o644)
	if err := fixHeadersMakefile(root, h); err == nil {
		t.Error("a Makefile without the include was accepted")
	}
}

// Absolute links inside the extracted packages point into the root.
func TestRelativeLinks(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "lib", "modules", "R"), 0o755)
	os.MkdirAll(filepath.Join(root, "usr", "src", "h"), 0o755)
	os.Symlink("/usr/src/h", filepath.Join(root, "lib", "modules", "R", "build"))
	os.Symlink("../h", filepath.Join(root, "usr", "src", "rel"))
	if err := relativeLinks(root); err != nil {
		t.Fatal(err)
	}
	if l, _ := os.Readlink(filepath.Join(root, "lib", "modules", "R", "build")); l != "../../../usr/src/h" {
		t.Errorf("build -> %s", l)
	}
	if l, _ := os.Readlink(filepath.Join(root, "usr", "src", "rel")); l != "../h" {
		t.Errorf("a relative link changed: %s", l)
	}
}
