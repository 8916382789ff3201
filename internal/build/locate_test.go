package build

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// prepareTree is the real tree of the test kernel, prepared like it
// (its profile names its exact source and config).
func prepareTree(t *testing.T) *kbuild.Tree {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	tree, err := kbuild.PrepareTree(ctx, kbuild.OptionsFor(testutils.DefaultProfile(t)))
	if errors.Is(err, kbuild.ErrNoSource) || errors.Is(err, kbuild.ErrCompiler) {
		testutils.Unavailable(t, "kernel tree: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// buildFix builds testdata/fixes/NAME.patch for the real kernel, on the
// host (no VM), and returns its manifest.
func buildFix(t *testing.T, tree *kbuild.Tree, k *Kernel, name string) (*contract.Manifest, error) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "fixes", name+".patch"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := ParseFix(name+".patch", b)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	work := t.TempDir()
	src := &TreeSource{Tree: tree, HeadersDir: testutils.RequireHeaders(t), Work: filepath.Join(work, "objects")}
	start := time.Now()
	res, err := Build(ctx, src, k, []*Fix{f}, Options{Out: t.TempDir(), Work: work, Name: "stitch_" + name})
	t.Logf("build %s: %.1fs, err %v", name, time.Since(start).Seconds(), err)
	if err != nil {
		return nil, err
	}
	return res.Manifest, nil
}

// function returns the manifest's entry for function fn of object.
func function(t *testing.T, m *contract.Manifest, object, fn string) contract.Function {
	t.Helper()
	var objs []string
	for _, o := range m.Objects {
		objs = append(objs, o.Name)
		for _, f := range o.Functions {
			if o.Name == object && f.Name == fn {
				return f
			}
		}
	}
	t.Fatalf("manifest patches no %s in %s (objects %v)", fn, object, objs)
	return contract.Function{}
}

// TestLocateByBuildFacts builds real fixes on the host: the object's home
// comes from kbuild's command file, not from its function names, which
// other objects share (version_proc_show is also toshiba_acpi's;
// ipmr_mfc_seq_show is both IPv4's and IPv6's in vmlinux). The pre-fix
// code then picks the right one of the duplicates, and run-pre passes.
// mac80211_ibss and xfs_sb are fixes of the corpus.
func TestLocateByBuildFacts(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles kernel objects")
	}
	k := openTestKernel(t)
	tree := prepareTree(t)

	// The name alone cannot tell: the old way refused this fix.
	if _, err := kallsyms.FindObject(context.Background(), k.image.Table, k.mods, []string{"version_proc_show"}); !errors.Is(err, kallsyms.ErrAmbiguous) {
		t.Fatalf("version_proc_show is no longer ambiguous by name (%v): the test proves nothing", err)
	}
	mv, err := buildFix(t, tree, k, "version")
	if err != nil {
		t.Fatalf("build version: %v", err)
	}
	if len(mv.Objects) != 1 {
		t.Errorf("version: objects %+v; want vmlinux only", mv.Objects)
	}
	if f := function(t, mv, kallsyms.Vmlinux, "version_proc_show"); f.Sympos != 0 {
		t.Errorf("version_proc_show: sympos %d, want 0 (unique in vmlinux)", f.Sympos)
	}

	// A modular object goes to its module; one of a composite module
	// (fs/xfs/libxfs/xfs_sb.o in xfs.ko) to the composite.
	for fix, want := range map[string][2]string{"mac80211_ibss": {"mac80211", "ieee80211_ibss_leave"}, "xfs_sb": {"xfs", "xfs_sync_sb_buf"}} {
		m, err := buildFix(t, tree, k, fix)
		if err != nil {
			t.Fatalf("build %s: %v", fix, err)
		}
		if len(m.Objects) != 1 {
			t.Errorf("%s: objects %+v; want %s only", fix, m.Objects, want[0])
		}
		function(t, m, want[0], want[1])
		if fix != "mac80211_ibss" {
			continue
		}
		// ieee80211_ibss_join sits between hunks: only its line numbers
		// moved (WARN_ON's bug table), so it is not patched.
		for _, o := range m.Objects {
			for _, f := range o.Functions {
				if f.Name == "ieee80211_ibss_join" {
					t.Errorf("ieee80211_ibss_join patched: its code changed only by line numbers")
				}
			}
		}
		// mac80211 defines ieee80211_csa_connection_drop_work twice
		// (ibss.c, mlme.c): the fix's is the one with its pre-fix code.
		f := function(t, m, "mac80211", "ieee80211_csa_connection_drop_work")
		for pos, want := range map[int]bool{1: true, 2: false} {
			code, err := k.Code("mac80211", f.Name, pos)
			if err != nil {
				t.Fatal(err)
			}
			if got := f.Fingerprint.MatchPadded(code) == nil; got != want || want && f.Sympos != pos {
				t.Errorf("%s,%d: code matches %v, want %v; sympos chosen %d", f.Name, pos, got, want, f.Sympos)
			}
		}
	}

	// ipmr_mfc_seq_show twice in vmlinux: IPv4's (sympos 1), IPv6's (2).
	occ := k.image.Table.Lookup(kallsyms.Vmlinux, "ipmr_mfc_seq_show")
	if len(occ) != 2 {
		t.Fatalf("ipmr_mfc_seq_show occurs %d times in vmlinux, want 2", len(occ))
	}
	m, err := buildFix(t, tree, k, "ip6mr")
	if err != nil {
		t.Fatalf("build ip6mr: %v", err)
	}
	f6 := function(t, m, kallsyms.Vmlinux, "ipmr_mfc_seq_show")
	if f6.Sympos != 2 {
		t.Errorf("ip6mr's ipmr_mfc_seq_show: sympos %d, want 2", f6.Sympos)
	}
	// The code alone decides, with no neighbour to go by, both ways.
	if pos, err := k.Sympos(kallsyms.Vmlinux, "ipmr_mfc_seq_show", nil, f6.Fingerprint); err != nil || pos != 2 {
		t.Errorf("IPv6's pre-fix code: sympos %d, %v; want 2", pos, err)
	}
	v4, err := tree.CompileObject(context.Background(), "net/ipv4/ipmr.o", "")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(v4)
	if err != nil {
		t.Fatal(err)
	}
	fp4, err := fingerprint.FromObject(raw, "ipmr_mfc_seq_show", k.layout)
	if err != nil {
		t.Fatal(err)
	}
	if pos, err := k.Sympos(kallsyms.Vmlinux, "ipmr_mfc_seq_show", nil, fp4); err != nil || pos != 1 {
		t.Errorf("IPv4's pre-fix code: sympos %d, %v; want 1", pos, err)
	}
	// Code that neither has: a run-pre failure naming both.
	other := function(t, mv, kallsyms.Vmlinux, "version_proc_show").Fingerprint
	_, err = k.Sympos(kallsyms.Vmlinux, "ipmr_mfc_seq_show", nil, other)
	if !errors.Is(err, ErrRunPre) || !strings.Contains(err.Error(), "none has the pre-fix code") || !strings.Contains(err.Error(), "sympos 2") {
		t.Errorf("code of neither: %v; want ErrRunPre naming each occurrence", err)
	}
	// Code both have, and no neighbour: said so, not guessed.
	_, err = k.Sympos(kallsyms.Vmlinux, "ipmr_mfc_seq_show", nil, anyCode{})
	if !errors.Is(err, ErrNoSymbol) || !strings.Contains(err.Error(), "2 of them with the pre-fix code") {
		t.Errorf("code of both: %v; want ErrNoSymbol saying both match", err)
	}
}

// anyCode accepts every function: several candidates match.
type anyCode struct{}

func (anyCode) MatchPadded([]byte) error { return nil }

// Locate checks kbuild's facts against the real kernel.
func TestLocateChecksTheKernel(t *testing.T) {
	k := openTestKernel(t)
	builtin := kbuild.ObjectFacts{Object: "fs/proc/version.o", ModNames: []string{"proc"}, ModFile: "fs/proc/proc"}
	modular := kbuild.ObjectFacts{Object: "fs/binfmt_misc.o", Module: true, ModNames: []string{"binfmt_misc"}}
	for _, c := range []struct {
		name  string
		facts kbuild.ObjectFacts
		funcs []string
		want  []string // nil: ErrNotInKernel
		why   string
	}{
		{"built-in", builtin, []string{"version_proc_show", "proc_version_init"}, []string{"vmlinux"}, ""},
		{"module", modular, []string{"bm_status_read", "load_misc_binary"}, []string{"binfmt_misc"}, ""},
		{"composite module", kbuild.ObjectFacts{Object: "fs/xfs/xfs_iops.o", Module: true, ModNames: []string{"xfs"}}, []string{"xfs_vn_getattr"}, []string{"xfs"}, ""},
		{"shared by two modules", kbuild.ObjectFacts{Object: "x/y.o", Module: true, ModNames: []string{"xfs", "binfmt_misc"}}, []string{"xfs_vn_getattr", "bm_status_read"}, []string{"xfs", "binfmt_misc"}, ""},
		// The same name, in another object's facts, is not found.
		{"built-in, module's functions", builtin, []string{"bm_status_read"}, nil, "none of its 1 functions"},
		{"module, vmlinux's functions", modular, []string{"version_proc_show_not_here", "cmdline_proc_show"}, nil, "is in binfmt_misc"},
		{"no such module", kbuild.ObjectFacts{Object: "x/y.o", Module: true, ModNames: []string{"no_such_module"}}, []string{"f"}, nil, "no module no_such_module"},
		// modules.builtin: the kernel has amd-uncore built in.
		{"module built in", kbuild.ObjectFacts{Object: "arch/x86/events/amd/uncore.o", Module: true, ModNames: []string{"amd_uncore"}}, []string{"amd_uncore_add"}, nil, "modules.builtin"},
		{"built-in that is a module", kbuild.ObjectFacts{Object: "fs/binfmt_misc.o", ModNames: []string{"binfmt_misc"}, ModFile: "fs/binfmt_misc"}, []string{"bm_status_read"}, nil, "as module binfmt_misc"},
	} {
		got, err := k.Locate(c.facts, c.funcs)
		switch {
		case c.want == nil && (!errors.Is(err, ErrNotInKernel) || !strings.Contains(err.Error(), c.why)):
			t.Errorf("%s: %v, %v; want ErrNotInKernel saying %q", c.name, got, err, c.why)
		case c.want != nil && (err != nil || !slices.Equal(got, c.want)):
			t.Errorf("%s: %v, %v; want %v", c.name, got, err, c.want)
		}
	}
}

// A Source without kbuild's facts gets a clear refusal, not a guess.
func TestBuildWithoutFacts(t *testing.T) {
	src := factlessSource{}
	b, err := os.ReadFile(filepath.Join("testdata", "fixes", "version.patch"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := ParseFix("version.patch", b)
	if err != nil {
		t.Fatal(err)
	}
	pre := testutils.CompileObject(t, writeC(t, "int f(int x) { return x + 1; }\n"))
	post := testutils.CompileObject(t, writeC(t, "int f(int x) { return x + 2; }\n"))
	src.pairs = []Pair{{Source: "x/f.c", Pre: pre, Post: post}}
	_, err = Build(context.Background(), src, nil, []*Fix{f}, Options{Out: t.TempDir()})
	if !errors.Is(err, ErrNotInKernel) || !strings.Contains(err.Error(), "no kbuild facts") {
		t.Errorf("build without facts: %v", err)
	}
}

type factlessSource struct{ pairs []Pair }

func (factlessSource) Headers() string { return "" }
func (s factlessSource) CompilePair(context.Context, []*Fix) ([]Pair, error) {
	return s.pairs, nil
}

func writeC(t *testing.T, src string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), fmt.Sprintf("f%d.c", len(src)))
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
