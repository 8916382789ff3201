package fingerprint_test

import (
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// ImageObjects are objects of the kernel with return thunks, retpolines,
// static calls, jump labels and alternatives, quick enough to compile.
var ImageObjects = []string{"kernel/sys.o", "fs/proc/base.o", "net/ipv4/tcp.o", "kernel/sched/core.o", "mm/filemap.o"}

// imageTables are the sites the kernel's tables list, by kind: the
// objtool tables of the image (its sections) and the static call sites
// (in .data, between kallsyms' __start_ and __stop_static_call_sites).
func imageTables(t testing.TB, im *kallsyms.Image) map[string]map[uint64]bool {
	t.Helper()
	f, err := elf.Open(im.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]map[uint64]bool{}
	rel := func(kind string, base uint64, b []byte, stride int) {
		m := map[uint64]bool{}
		for i := 0; i+4 <= len(b); i += stride {
			m[uint64(int64(base)+int64(i)+int64(int32(binary.LittleEndian.Uint32(b[i:]))))] = true
		}
		out[kind] = m
	}
	for _, name := range []string{".return_sites", ".retpoline_sites", ".ibt_endbr_seal", ".call_sites"} {
		if s := f.Section(name); s != nil {
			b, err := s.Data()
			if err != nil {
				t.Fatal(err)
			}
			rel(name, s.Addr, b, 4)
		}
	}
	start, err1 := im.Table.Find(kallsyms.Vmlinux, "__start_static_call_sites", 0)
	stop, err2 := im.Table.Find(kallsyms.Vmlinux, "__stop_static_call_sites", 0)
	if err1 == nil && err2 == nil && stop.Addr > start.Addr {
		b, err := im.At(start.Addr, stop.Addr-start.Addr)
		if err != nil {
			t.Fatal(err)
		}
		rel(".static_call_sites", start.Addr, b, 8)
	}
	return out
}

// rewrite does to code (a function at addr) what the kernel does at boot
// at the sites its tables list, the way that changes most bytes: return
// thunks become RET and INT3s, retpolines indirect branches padded with
// NOPs, static calls NOPs, sealed ENDBRs the poison NOP.
func rewrite(code []byte, addr uint64, size int, tables map[string]map[uint64]bool) []byte {
	out := append([]byte(nil), code...)
	for kind, sites := range tables {
		for a := range sites {
			if a < addr || a >= addr+uint64(size) {
				continue
			}
			at := out[a-addr:]
			switch kind {
			case ".return_sites":
				copy(at, []byte{0xc3, 0xcc, 0xcc, 0xcc, 0xcc})
			case ".retpoline_sites":
				n := 5
				if at[0] == 0x2e || at[0] == 0x0f {
					n = 6
				}
				copy(at, append([]byte{0xff, 0xd0}, []byte{0x90, 0x90, 0x90, 0x90}[:n-2]...))
			case ".static_call_sites":
				if at[0] == 0x0f {
					at[2] ^= 0x5a // a Jcc's new target
				} else {
					copy(at, []byte{0x0f, 0x1f, 0x44, 0x00, 0x00})
				}
			case ".ibt_endbr_seal":
				copy(at, []byte{0x66, 0x0f, 0x1f, 0x00})
			}
		}
	}
	return out
}

// imageResult counts what checkImage found.
type imageResult struct {
	funcs, matched, absent int
	sites                  map[string]int // table sites inside matched functions, by kind
	failures               []string
	checks                 []bootCheck // the matched functions
}

// bootCheck is a function to check in the booted kernel: its fingerprint
// and the sites found in its object.
type bootCheck struct {
	livepatch.CodeCheck
	Sites []fingerprint.Site
}

// imageExceptions are the functions of ImageObjects that do not match
// the image, and why; each must still fail, or the entry goes.
var imageExceptions = map[string]string{
	// Weak definitions that arch/x86/kernel/cpu/bugs.c overrides: the
	// image's symbol is that file's function.
	"kernel/sys.o:arch_prctl_spec_ctrl_get": "weak, overridden",
	"kernel/sys.o:arch_prctl_spec_ctrl_set": "weak, overridden",
	// The linker kept the code of the overridden weak
	// arch_prctl_spec_ctrl_get after __ia32_sys_umask but no symbol for
	// it, so the image's symbol seems to go on over it.
	"kernel/sys.o:__ia32_sys_umask": "followed by symbol-less overridden weak code",
}

// checkImage fingerprints every function of the objects, compiled in the
// prepared tree of release, and matches it against the kernel's image
// as it is (build time) and as the kernel rewrites it at boot; for a
// kernel that runs objtool at link, the sites found in the objects must
// be the sites objtool listed in the image.
func checkImage(t *testing.T, release string, objects []string) imageResult {
	if testing.Short() {
		t.Skip("compiles kernel objects")
	}
	p := testutils.Profile(t, release)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	tree, err := kbuild.PrepareTree(ctx, kbuild.OptionsFor(p))
	if err != nil {
		if os.Getenv("CI") == "" && (errors.Is(err, kbuild.ErrNoSource) || errors.Is(err, kbuild.ErrCompiler)) {
			t.Skipf("no kernel tree for %s: %v", release, err)
		}
		t.Fatal(err)
	}
	im, err := kallsyms.OpenImage(ctx, p.BootImage, kernel.CacheDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	lay, err := layout.FromVmlinux(im.Path)
	if err != nil {
		t.Fatal(err)
	}
	tables := imageTables(t, im)
	res := imageResult{sites: map[string]int{}}
	for _, rel := range objects {
		path, err := tree.CompileObject(ctx, rel, "")
		if err != nil {
			t.Fatal(err)
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		o, err := elfobj.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		for _, sym := range o.Symbols {
			if sym == nil || !sym.Func() || !sym.Defined() || sym.Size == 0 || !strings.HasPrefix(sym.Section.Name, ".text") {
				continue
			}
			fp, err := fingerprint.FromObject(raw, sym.Name, lay)
			if err != nil {
				t.Fatalf("%s: %s: %v", rel, sym.Name, err)
			}
			derived, err := fingerprint.ObjtoolSites(raw, sym.Name, lay)
			if err != nil {
				t.Fatal(err)
			}
			occ := im.Table.Lookup(kallsyms.Vmlinux, sym.Name)
			if len(occ) == 0 {
				res.absent++ // inlined everywhere or dropped by the linker
				continue
			}
			res.funcs++
			var why []string
			matched := false
			for _, s := range occ {
				code, err := im.At(s.Addr, s.Size)
				if err != nil {
					t.Fatal(err)
				}
				if err := fp.MatchPadded(code); err != nil {
					why = append(why, fmt.Sprintf("as built: %v", err))
					continue
				}
				if err := fp.MatchPadded(rewrite(code, s.Addr, fp.Size, tables)); err != nil {
					why = append(why, fmt.Sprintf("as booted: %v", err))
					continue
				}
				if d := compareSites(derived, tables, s.Addr, fp, lay); d != "" {
					why = append(why, d)
					continue
				}
				for kind, sites := range tables {
					for a := range sites {
						if a >= s.Addr && a < s.Addr+uint64(fp.Size) {
							res.sites[kind]++
						}
					}
				}
				sympos := 0
				if len(occ) > 1 {
					sympos = s.Sympos
				}
				res.checks = append(res.checks, bootCheck{livepatch.CodeCheck{Object: kallsyms.Vmlinux, Name: sym.Name, Sympos: sympos, Fingerprint: fp}, derived})
				matched = true
				break
			}
			why0, excepted := imageExceptions[rel+":"+sym.Name]
			switch {
			case matched && excepted:
				res.failures = append(res.failures, fmt.Sprintf("%s: %s matches: drop its exception (%s)", rel, sym.Name, why0))
			case matched:
				res.matched++
			case excepted:
				t.Logf("%s: %s does not match, as expected (%s): %s", rel, sym.Name, why0, strings.Join(why, "; "))
			default:
				res.failures = append(res.failures, fmt.Sprintf("%s: %s (%d in the image): %s", rel, sym.Name, len(occ), strings.Join(why, "; ")))
			}
		}
	}
	t.Logf("%s: %d functions of %d objects in the image, %d matched, %d named exceptions, %d not in the image; table sites in the matched: %v", release, res.funcs, len(objects), res.matched, len(imageExceptions), res.absent, res.sites)
	for _, f := range res.failures {
		t.Error(f)
	}
	return res
}

// compareSites checks the sites found in the object against the image's
// tables for the function at addr: the same return, retpoline and static
// call sites, and every sealed ENDBR among those found. On a kernel whose
// objects objtool has processed, nothing is found and the object's own
// tables were masked.
func compareSites(derived []fingerprint.Site, tables map[string]map[uint64]bool, addr uint64, fp fingerprint.Fingerprint, lay *layout.Layout) string {
	if !lay.ObjtoolAtLink() {
		if len(derived) > 0 {
			return fmt.Sprintf("sites derived for a kernel that runs objtool per object: %v", derived)
		}
		return ""
	}
	found := map[string][]int{}
	for _, d := range derived {
		found[d.Kind] = append(found[d.Kind], d.Off)
	}
	var bad []string
	for kind, sites := range tables {
		if kind == ".call_sites" {
			continue // only their rel32 changes, a relocation
		}
		var want []int
		for a := range sites {
			if a >= addr && a < addr+uint64(fp.Size) {
				want = append(want, int(a-addr))
			}
		}
		got := found[kind]
		sort.Ints(want)
		sort.Ints(got)
		if kind == ".ibt_endbr_seal" {
			// Sealed or not depends on the rest of the kernel: every
			// sealed one must have been found.
			for _, w := range want {
				if w != 0 || len(got) == 0 {
					bad = append(bad, fmt.Sprintf("%s at +%d not found", kind, w))
				}
			}
			continue
		}
		if fmt.Sprint(want) != fmt.Sprint(got) {
			bad = append(bad, fmt.Sprintf("%s: image at %v, found at %v", kind, want, got))
		}
	}
	return strings.Join(bad, "; ")
}

// TestImage612 proves the fingerprints of 6.12 objects, which objtool has
// not processed, against the real 6.12 image: every function matches the
// image as built and as the kernel rewrites it at boot, and the sites
// found in the objects are the sites objtool listed in the image.
func TestImage612(t *testing.T) {
	res := checkImage(t, testutils.Release612, ImageObjects)
	for _, kind := range []string{".return_sites", ".retpoline_sites", ".static_call_sites", ".ibt_endbr_seal"} {
		if res.sites[kind] == 0 {
			t.Errorf("no %s in the functions checked: the test proves nothing about them", kind)
		}
	}
}

// TestImage61 is TestImage612 on the default 6.1 kernel, whose objects
// objtool has processed: their own tables are masked, nothing is derived.
func TestImage61(t *testing.T) {
	checkImage(t, kernel.Default, ImageObjects)
}
