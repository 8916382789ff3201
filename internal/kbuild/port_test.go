package kbuild

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
)

// corpusFixes reads the repository's real fixes (corpus/6.1: diffs from
// Debian's 6.1.190 to 6.1.192). kbuild's tests cannot use testutils,
// which imports kbuild.
func corpusFixes(t *testing.T) map[string][]byte {
	t.Helper()
	dirs := []string{filepath.Join("..", "..", "corpus", "6.1", "fixes")}
	for _, dir := range dirs {
		paths, _ := filepath.Glob(filepath.Join(dir, "*.patch"))
		if len(paths) == 0 {
			continue
		}
		fixes := map[string][]byte{}
		for _, p := range paths {
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			fixes[strings.TrimSuffix(filepath.Base(p), ".patch")] = b
		}
		return fixes
	}
	unavailable(t, "no fix corpus in %v", dirs)
	return nil
}

func unavailable(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf("skipped: "+format, args...)
}

// sourceFiles unpacks only the files the fixes touch from a Debian
// linux-source package in the cache (the whole tree is not needed to
// port: patch reads only those files), about 20 s.
func sourceFiles(t *testing.T, version string, fixes map[string][]byte) string {
	t.Helper()
	deb := filepath.Join(kernel.CacheDir(), "debs", "linux-source-6.1_"+version+"_all.deb")
	if _, err := os.Stat(deb); err != nil {
		unavailable(t, "source package %s not in the cache (stitch kernel add fetches it)", deb)
	}
	var list []string
	for _, d := range fixes {
		secs, err := parseDiff(d)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range secs {
			list = append(list, "linux-source-6.1/"+s.Old)
		}
	}
	dir := t.TempDir()
	listFile := filepath.Join(dir, "files")
	if err := os.WriteFile(listFile, []byte(strings.Join(list, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// tar fails on members this version lacks: the test wants exactly
	// that (a fix to a file that is not there does not port).
	script := `dpkg-deb --fsys-tarfile "$1" | tar -xOf - ./usr/src/linux-source-6.1.tar.xz | tar -xJf - -C "$2" -T "$3" 2>/dev/null; true`
	if out, err := exec.CommandContext(ctx, "bash", "-c", script, "unpack", deb, dir, listFile).CombinedOutput(); err != nil {
		t.Fatalf("unpack %s: %v\n%s", deb, err, out)
	}
	src := filepath.Join(dir, "linux-source-6.1")
	if _, err := os.Stat(src); err != nil {
		t.Fatalf("nothing unpacked from %s: %v", deb, err)
	}
	return src
}

// TestPortCorpus ports the 193 real fixes of the corpus, made from
// Debian's 6.1.190-1 to 6.1.192-2, to three real kernel sources: 6.1.190-1
// (6.1.0-54), where every one applies cleanly; 6.1.192-3 (6.1.0-57), which
// already contains them; and 6.1.170-3 (6.1.0-47), twenty stable releases
// older, where some apply at other lines or with fuzz and some not at all.
func TestPortCorpus(t *testing.T) {
	if _, err := exec.LookPath("patch"); err != nil {
		unavailable(t, "GNU patch not installed")
	}
	fixes := corpusFixes(t)
	names := make([]string, 0, len(fixes))
	for n := range fixes {
		names = append(names, n)
	}
	sort.Strings(names)
	ctx := context.Background()
	port := func(t *testing.T, version string) (map[PortStatus][]string, map[string]*Port) {
		src := sourceFiles(t, version, fixes)
		by := map[PortStatus][]string{}
		ports := map[string]*Port{}
		start := time.Now()
		for _, n := range names {
			p, err := PortDir(ctx, src, fixes[n])
			var perr *PortError
			if err != nil && !errors.As(err, &perr) {
				t.Fatalf("%s on %s: %v", n, version, err)
			}
			if (err == nil) != p.Status.Applies() {
				t.Errorf("%s on %s: status %s with error %v", n, version, p.Status, err)
			}
			by[p.Status] = append(by[p.Status], n)
			ports[n] = p
			for _, h := range p.Hunks {
				if h.File == "" || h.Number < 1 || !strings.HasPrefix(h.Header, "@@ -") {
					t.Errorf("%s on %s: hunk %+v", n, version, h)
				}
			}
			if p.Status != PortClean && p.Status != PortContained {
				t.Logf("%s on %s: %s", n, version, p.Summary())
			}
		}
		t.Logf("%s: %d fixes ported in %.1fs: clean %d, offset %d, fuzz %d, contained %d, fails %d", version, len(names), time.Since(start).Seconds(),
			len(by[PortClean]), len(by[PortOffset]), len(by[PortFuzz]), len(by[PortContained]), len(by[PortFails]))
		return by, ports
	}
	t.Run("6.1.190-1", func(t *testing.T) {
		by, _ := port(t, "6.1.190-1")
		if len(by[PortClean]) != len(names) {
			t.Errorf("%d of %d fixes port cleanly to the source they were made against; not clean: %v %v %v %v",
				len(by[PortClean]), len(names), by[PortOffset], by[PortFuzz], by[PortContained], by[PortFails])
		}
	})
	t.Run("6.1.192-3", func(t *testing.T) {
		by, _ := port(t, "6.1.192-3")
		if len(by[PortContained]) != len(names) {
			t.Errorf("only %d of %d fixes found contained in 6.1.192-3, which has them all; not: %v %v %v %v",
				len(by[PortContained]), len(names), by[PortClean], by[PortOffset], by[PortFuzz], by[PortFails])
		}
	})
	t.Run("6.1.187-1", func(t *testing.T) {
		// Three stable releases before the corpus's base: the fixes are
		// not there yet and most of their context is.
		by, _ := port(t, "6.1.187-1")
		if len(by[PortContained]) > 0 || len(by[PortFails]) > len(names)/10 {
			t.Errorf("on 6.1.187-1, want none contained and at most a tenth failing: contained %v, fails %v", by[PortContained], by[PortFails])
		}
	})
	t.Run("6.1.170-3", func(t *testing.T) {
		by, ports := port(t, "6.1.170-3")
		if len(by[PortOffset]) == 0 || len(by[PortFuzz]) == 0 || len(by[PortFails]) == 0 || len(by[PortContained]) > 0 {
			t.Errorf("on 6.1.170-3, want some fixes at other lines, some with fuzz and some that do not apply, none contained: offset %d, fuzz %d, fails %d, contained %v",
				len(by[PortOffset]), len(by[PortFuzz]), len(by[PortFails]), by[PortContained])
		}
		// Cases checked by hand against the sources.
		want := func(fix string, status PortStatus, hunk int, check func(Hunk) bool) {
			t.Helper()
			p := ports[fix]
			if p == nil {
				t.Errorf("%s: not in the corpus", fix)
				return
			}
			if p.Status != status || hunk > len(p.Hunks) || !check(p.Hunks[hunk-1]) {
				t.Errorf("%s: %s, hunks %+v", fix, p.Summary(), p.Hunks)
			}
		}
		// fs/namei.c moved 43 lines up between 6.1.170 and 6.1.190.
		want("fs_namei", PortOffset, 1, func(h Hunk) bool { return h.Result == HunkApplies && h.Offset == -43 })
		want("mm_pagewalk", PortFuzz, 1, func(h Hunk) bool { return h.Offset == -10 && h.Fuzz == 2 })
		// The bonding fix's third hunk only removes lines, which
		// 6.1.170 does not have at that place: it reverse-applies while
		// the other hunks apply, and the fix is refused as partly
		// contained.
		want("drivers_net_bonding_bond_main", PortFails, 3, func(h Hunk) bool { return h.Result == HunkContained })
		want("drivers_net_bonding_bond_main", PortFails, 1, func(h Hunk) bool { return h.Result == HunkApplies })
		want("net_ipv6_exthdrs", PortFails, 1, func(h Hunk) bool {
			return h.Result == HunkFails && h.Line == 373 && strings.HasPrefix(h.Text, "@@ -373,23 +373,16 @@")
		})
	})
}

// A fix written on top of another (its context is the other's new line)
// does not port alone, and ports onto the other.
func TestPortOnto(t *testing.T) {
	dir := t.TempDir()
	src := "int f(void)\n{\n\tint a = 1;\n\tint b = 2;\n\tint c = 3;\n\treturn a + b + c;\n}\n"
	if err := os.MkdirAll(filepath.Join(dir, "lib"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "lib/f.c"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	first := []byte("--- a/lib/f.c\n+++ b/lib/f.c\n@@ -1,7 +1,7 @@\n int f(void)\n {\n-\tint a = 1;\n+\tint a = 10;\n \tint b = 2;\n \tint c = 3;\n \treturn a + b + c;\n")
	onTop := []byte("--- a/lib/f.c\n+++ b/lib/f.c\n@@ -1,7 +1,7 @@\n int f(void)\n {\n \tint a = 10;\n-\tint b = 2;\n+\tint b = 20;\n \tint c = 3;\n \treturn a + b + c;\n }\n")
	tree := &Tree{Dir: dir, Release: "test"}
	ctx := context.Background()
	if _, err := tree.Port(ctx, onTop); !errors.Is(err, ErrDoesNotApply) {
		t.Fatalf("alone: %v, want ErrDoesNotApply", err)
	}
	p, err := tree.PortOnto(ctx, first, onTop)
	if err != nil || p.Status != PortClean {
		t.Fatalf("onto the first: %v, %+v", err, p)
	}
	if _, err := tree.PortOnto(ctx, onTop, first); !errors.Is(err, ErrDoesNotApply) {
		t.Errorf("base that does not apply: %v, want ErrDoesNotApply", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "lib/f.c")); string(b) != src {
		t.Errorf("the tree changed:\n%s", b)
	}
}
