package fingerprint

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// objtoolSrc has a site of each kind objtool lists and the kernel
// rewrites: calls and jumps to return and retpoline thunks (r11's with
// the CS prefix), static calls and tail calls, and the conditional jumps
// to them that clang makes and gcc does not (written in asm).
const objtoolSrc = `
extern int __SCT__tp(int);
extern int __SCT__tail(int);
int (*fp)(int);
int callr11(int x) { register int (*f)(int) asm("r11") = fp; asm("" : "+r"(f)); return f(x) + 1; }
int tailrax(int x) { return fp(x); }
int scall(int x) { return __SCT__tp(x) + 2; }
int stail(int x) { return __SCT__tail(x); }
static int __attribute__((noinline)) sealed(int x) { return x * 3; }
int jccs(int x)
{
	asm volatile("test %%edi,%%edi\n"
		"jne __x86_indirect_thunk_r11\n"
		"jne __SCT__tail\n"
		"jne __x86_return_thunk\n" ::: "memory");
	return sealed(x);
}
`

// flags612 are the code-generation flags of Debian's 6.12 kernels that
// make these sites (from its kbuild's KBUILD_CFLAGS).
var flags612 = []string{
	"-mfunction-return=thunk-extern", "-mindirect-branch=thunk-extern", "-mindirect-branch-cs-prefix",
	"-mindirect-branch-register", "-fcf-protection=branch", "-fno-jump-tables", "-fpatchable-function-entry=16,16",
}

// layout612Linked is a 6.12 layout whose image has objtool's tables, as
// layout.FromVmlinux reads Debian's 6.12 images.
func layout612Linked() *layout.Layout {
	l := layout612()
	l.Sections[".static_call_sites"] = layout.Section{Name: ".static_call_sites", Struct: "static_call_site", Entry: 8, Rewrite: 5}
	l.Image = []string{".retpoline_sites", ".return_sites", ".call_sites", ".ibt_endbr_seal", ".orc_unwind_ip", ".orc_unwind"}
	return l
}

func compileSrc(t *testing.T, src string, extra ...string) []byte {
	t.Helper()
	c := filepath.Join(t.TempDir(), "x.c")
	if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return testutils.CompileObject(t, c, extra...)
}

// TestObjtoolSites: in an object objtool has not processed, each site is
// found as objtool finds it, exactly its instruction, and masked.
func TestObjtoolSites(t *testing.T) {
	obj := compileSrc(t, objtoolSrc, flags612...)
	lay := layout612Linked()
	// Per function: the sites, as kind and the instruction's first bytes.
	want := map[string][]string{
		"callr11": {".ibt_endbr_seal f3 0f 1e fa", ".retpoline_sites 2e e8", ".return_sites e9"},
		"tailrax": {".ibt_endbr_seal f3 0f 1e fa", ".retpoline_sites e9"},
		"scall":   {".ibt_endbr_seal f3 0f 1e fa", ".static_call_sites e8", ".return_sites e9"},
		"stail":   {".ibt_endbr_seal f3 0f 1e fa", ".static_call_sites e9"},
		// No ENDBR (static, called directly); a Jcc to the return thunk
		// is listed by objtool but left alone by apply_returns.
		"sealed": {".return_sites e9"},
		// Its last call, to sealed, is a tail call: no return site.
		"jccs": {".ibt_endbr_seal f3 0f 1e fa", ".retpoline_sites 0f 85", ".static_call_sites 0f 85"},
	}
	for fn, w := range want {
		sites, err := ObjtoolSites(obj, fn, lay)
		if err != nil {
			t.Fatal(err)
		}
		fp, err := FromObject(obj, fn, lay)
		if err != nil {
			t.Fatal(err)
		}
		sym := code612(t, obj, fn)
		var got []string
		for _, s := range sites {
			n := map[bool]int{true: 2, false: 1}[s.Len == 6]
			if s.Kind == ".ibt_endbr_seal" {
				n = 4
			}
			got = append(got, fmt.Sprintf("%s % x", s.Kind, sym[s.Off:s.Off+n]))
			// The instruction is masked (its neighbours may be, for
			// relocations of their own).
			if !covered(fp, s.Off, s.Len) {
				t.Errorf("%s: %s at %d (%d bytes) masked as %v", fn, s.Kind, s.Off, s.Len, fp.Masked)
			}
			wantLen := map[string]int{"e9": 5, "e8": 5, "2e": 6, "0f": 6, "f3": 4}[fmt.Sprintf("%02x", sym[s.Off])]
			if s.Len != wantLen {
				t.Errorf("%s: %s at %d is %d bytes, want %d", fn, s.Kind, s.Off, s.Len, wantLen)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(w) {
			t.Errorf("%s: sites %q, want %q", fn, got, w)
		}
		// The code as the kernel may run it matches.
		booted := bytes.Clone(sym)
		for _, s := range sites {
			for i := s.Off; i < s.Off+s.Len; i++ {
				booted[i] = 0xcc
			}
		}
		if err := fp.Match(booted); err != nil {
			t.Errorf("%s: code rewritten at its sites: %v", fn, err)
		}
	}
	// The Jcc to the return thunk keeps its opcode: it is not masked.
	c := code612(t, obj, "jccs")
	fp, _ := FromObject(obj, "jccs", lay)
	if at := bytes.Index(c, []byte{0x0f, 0x85}); at < 0 {
		t.Fatal("no Jcc")
	} else if last := bytes.LastIndex(c, []byte{0x0f, 0x85}); covered(fp, last, 1) {
		t.Errorf("the Jcc to __x86_return_thunk at %d is masked: %v", last, fp.Masked)
	}
}

// TestObjtoolSitesNotDerived: nothing is derived for a kernel that runs
// objtool per object (6.1: its image has no .ibt_endbr_seal), nor for an
// object objtool has processed (a module of one object on 6.12), whose
// tables are exact.
func TestObjtoolSitesNotDerived(t *testing.T) {
	obj := compileSrc(t, objtoolSrc, flags612...)
	l61 := layout612Linked()
	l61.Image = []string{".retpoline_sites", ".return_sites"}
	if sites, err := ObjtoolSites(obj, "callr11", l61); err != nil || sites != nil {
		t.Errorf("kernel without objtool at link: %v, %v", sites, err)
	}
	fpNo, _ := FromObject(obj, "callr11", l61)
	fpYes, _ := FromObject(obj, "callr11", layout612Linked())
	if len(fpYes.Masked) <= len(fpNo.Masked) && fmt.Sprint(fpYes.Masked) == fmt.Sprint(fpNo.Masked) {
		t.Errorf("masks the same with and without objtool at link: %v", fpNo.Masked)
	}
	done := compileSrc(t, objtoolSrc+`asm(".pushsection .orc_unwind_ip,\"a\"\n.long 0\n.popsection");`, flags612...)
	if sites, err := ObjtoolSites(done, "callr11", layout612Linked()); err != nil || sites != nil {
		t.Errorf("object objtool processed: %v, %v", sites, err)
	}
}

func code612(t *testing.T, obj []byte, fn string) []byte {
	t.Helper()
	f, err := elfParse(obj)
	if err != nil {
		t.Fatal(err)
	}
	s := f.Symbol(fn)
	if s == nil {
		t.Fatalf("no %s", fn)
	}
	return s.Bytes()
}

// covered tells whether fp masks all of [off, off+n).
func covered(fp Fingerprint, off, n int) bool {
	for i := off; i < off+n; i++ {
		in := false
		for _, m := range fp.Masked {
			in = in || (i >= m[0] && i < m[0]+m[1])
		}
		if !in {
			return false
		}
	}
	return true
}

var elfParse = elfobj.Parse
