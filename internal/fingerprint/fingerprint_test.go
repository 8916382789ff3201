package fingerprint

import (
	"bytes"
	"debug/elf"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

const src = `
int exported_thing(int);
static int counter;
int fn(int x)
{
	counter += x;
	return exported_thing(x) + counter;
}
`

func compile(t *testing.T) []byte {
	t.Helper()
	c := filepath.Join(t.TempDir(), "x.c")
	if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return testutils.CompileObject(t, c)
}

func code(t *testing.T, obj []byte) []byte {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(obj))
	if err != nil {
		t.Fatal(err)
	}
	d, err := f.Section(".text.fn").Data()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestFingerprint(t *testing.T) {
	obj := compile(t)
	fp, err := FromObject(obj, "fn", testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	c := code(t, obj)
	if fp.Size != len(c) {
		t.Fatalf("size %d, code %d bytes", fp.Size, len(c))
	}
	// The fentry call (5 bytes at 0, from __mcount_loc) and the relocation
	// fields must be masked.
	if len(fp.Masked) == 0 || fp.Masked[0] != [2]int{0, 5} {
		t.Errorf("masks = %v, want the fentry call first", fp.Masked)
	}
	if err := fp.Match(c); err != nil {
		t.Fatalf("own code does not match: %v", err)
	}

	// Resolved relocations and a nop'd fentry call (as in a linked or
	// running kernel) still match.
	linked := bytes.Clone(c)
	copy(linked[0:5], []byte{0x0f, 0x1f, 0x44, 0x00, 0x00})
	for _, m := range fp.Masked {
		for i := m[0]; i < m[0]+m[1]; i++ {
			linked[i] ^= 0xa5
		}
	}
	if err := fp.Match(linked); err != nil {
		t.Errorf("code differing only in masked bytes: %v", err)
	}

	// Any other byte, or another length, does not.
	for i := range c {
		masked := false
		for _, m := range fp.Masked {
			masked = masked || (i >= m[0] && i < m[0]+m[1])
		}
		if masked {
			continue
		}
		other := bytes.Clone(c)
		other[i] ^= 1
		if err := fp.Match(other); !errors.Is(err, ErrMismatch) {
			t.Errorf("byte %d changed: Match = %v, want ErrMismatch", i, err)
		}
	}
	if err := fp.Match(c[:len(c)-1]); !errors.Is(err, ErrMismatch) {
		t.Errorf("shorter code: %v", err)
	}
	padded := append(bytes.Clone(c), 0xcc, 0xcc, 0x90, 0x0f, 0x1f, 0x44, 0x00, 0x00)
	if err := fp.MatchPadded(padded); err != nil {
		t.Errorf("code followed by padding: %v", err)
	}
	if err := fp.MatchPadded(append(bytes.Clone(c), 0xcc, 0x55)); !errors.Is(err, ErrMismatch) {
		t.Errorf("code followed by more code: %v", err)
	}
}

func TestFromObjectBadInput(t *testing.T) {
	lay := testlayout.Real(t)
	if _, err := FromObject([]byte("junk"), "fn", lay); err == nil {
		t.Error("junk accepted")
	}
	if _, err := FromObject(compile(t), "nope", lay); err == nil {
		t.Error("unknown function accepted")
	}
}

// sitesSrc has an alternative and a paravirt site, their entries written
// as 6.1 writes them (ALTERNATIVE and PARAVIRT_CALL), or with ALT612 as
// 6.12 writes the alternative (a 32-bit ft_flags where 6.1 had a 16-bit
// cpuid: 14 bytes, instrlen at 12).
const sitesSrc = `
#ifdef ALT612
#define FLAGS ".long 0\n"
#else
#define FLAGS ".word 0\n"
#endif
int fn(int x)
{
	asm volatile("int3\n661: nop; nop; nop\n662:\n"
		".pushsection .altinstructions,\"a\"\n"
		".long 661b - .\n.long 663f - .\n" FLAGS
		".byte 662b-661b\n.byte 664f-663f\n"
		".popsection\n"
		".pushsection .altinstr_replacement,\"ax\"\n663: xor %eax,%eax\n664:\n.popsection\n"
		"int3\n"
#ifndef ALT612
		"771: nop; nop; nop; nop; nop; nop; nop\n772:\n"
		".pushsection .parainstructions,\"a\"\n.balign 8\n"
		".quad 771b\n.byte 3\n.byte 772b-771b\n.balign 8\n"
		".popsection\n"
		"int3\n"
#endif
	);
	return x + 1;
}
`

// masks tells whether fp masks exactly bytes [off, off+n) of the code
// from off-1 to off+n.
func masks(fp Fingerprint, off, n int) bool {
	in := func(i int) bool {
		for _, m := range fp.Masked {
			if i >= m[0] && i < m[0]+m[1] {
				return true
			}
		}
		return false
	}
	for i := off - 1; i <= off+n; i++ {
		if in(i) != (i >= off && i < off+n) {
			return false
		}
	}
	return true
}

// TestSiteLengths: the bytes an alternative or a paravirt call may be
// rewritten with are masked, as many as the entry says, read where the
// kernel's layout says the length is.
func TestSiteLengths(t *testing.T) {
	c := filepath.Join(t.TempDir(), "sites.c")
	if err := os.WriteFile(c, []byte(sitesSrc), 0o644); err != nil {
		t.Fatal(err)
	}
	obj := testutils.CompileObject(t, c)
	text := code(t, obj)
	alt := bytes.Index(text, []byte{0xcc, 0x90, 0x90, 0x90, 0xcc}) + 1
	pv := bytes.Index(text, []byte{0xcc, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xcc}) + 1
	if alt < 1 || pv < 1 {
		t.Fatalf("sites not found in % x", text)
	}
	fp, err := FromObject(obj, "fn", testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if !masks(fp, alt, 3) || !masks(fp, pv, 7) {
		t.Errorf("masks %v: want 3 bytes at %d (alternative) and 7 at %d (paravirt)", fp.Masked, alt, pv)
	}

	// A kernel without .parainstructions (6.12) cannot tell where its
	// sites are: the object is refused, not half-masked.
	l612 := layout612()
	if _, err := FromObject(obj, "fn", l612); !errors.Is(err, layout.ErrUnknownSection) {
		t.Errorf("6.12 layout on an object with .parainstructions: %v", err)
	}
	// The same alternative in 6.12's format, read with 6.12's layout.
	obj = testutils.CompileObject(t, c, "-DALT612")
	text = code(t, obj)
	if fp, err = FromObject(obj, "fn", l612); err != nil {
		t.Fatal(err)
	}
	if at := bytes.Index(text, []byte{0xcc, 0x90, 0x90, 0x90, 0xcc}) + 1; !masks(fp, at, 3) {
		t.Errorf("6.12 masks %v: want 3 bytes at %d", fp.Masked, at)
	}
	// Read with 6.1's layout, 6.12's entries give other lengths.
	if fp61, err := FromObject(obj, "fn", testlayout.Real(t)); err == nil && masks(fp61, bytes.Index(text, []byte{0xcc, 0x90, 0x90, 0x90, 0xcc})+1, 3) {
		t.Errorf("6.1's layout read 6.12's alternative right: the test proves nothing")
	}
}

// layout612 is the part of a 6.12 kernel's layout the tests need, built
// here (the real one is read from BTF; internal/layout tests that).
func layout612() *layout.Layout {
	return &layout.Layout{Source: "test 6.12", Sections: map[string]layout.Section{
		".altinstructions": {Name: ".altinstructions", Struct: "alt_instr", Entry: 14, Len: layout.Field{Offset: 12, Size: 1}},
		"__mcount_loc":     {Name: "__mcount_loc", Entry: 8, Rewrite: 5, Derived: true},
	}}
}

func FuzzFromObject(f *testing.F) {
	if seed, err := os.ReadFile("testdata/seed.o"); err == nil {
		f.Add(seed) // gcc -O2 -mcmodel=kernel -pg -mfentry -mrecord-mcount -ffunction-sections of the test's source
	}
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	// 6.1's layout, built here: the fuzzer checks the reading of objects,
	// and runs without a kernel image.
	lay := &layout.Layout{Source: "test 6.1", Sections: map[string]layout.Section{
		"__mcount_loc":      {Name: "__mcount_loc", Entry: 8, Rewrite: 5},
		"__jump_table":      {Name: "__jump_table", Entry: 16, Rewrite: 5},
		".altinstructions":  {Name: ".altinstructions", Entry: 12, Len: layout.Field{Offset: 10, Size: 1}},
		".parainstructions": {Name: ".parainstructions", Entry: 16, Len: layout.Field{Offset: 9, Size: 1}},
		".retpoline_sites":  {Name: ".retpoline_sites", Entry: 4, Rewrite: 6},
	}}
	// 6.12's: objtool runs at link, the sites are found in the code.
	lay612 := layout612Linked()
	f.Fuzz(func(t *testing.T, data []byte) {
		FromObject(data, "fn", lay) // must not panic
		FromObject(data, "fn", lay612)
		ObjtoolSites(data, "fn", lay612)
	})
}
