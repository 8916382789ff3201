package klpmod

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/arch/x86/x86asm"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// origSite is a jump label of the post object: where it is, where it
// jumps, and on what.
type origSite struct {
	off, target uint64
	branch      bool
	code        []byte // of its section
}

func jumpSites(t *testing.T, o *elfobj.Object) map[string]origSite {
	t.Helper()
	jt := o.Section("__jump_table")
	sites := map[string]origSite{}
	for e := uint64(0); e < uint64(len(jt.Data)); e += 16 {
		r := jt.RelocsIn(e, e+16)
		_, keyOff := r[2].Target()
		sites[r[0].Symbol.Section.Name] = origSite{off: uint64(placeOf(r[0])), target: uint64(placeOf(r[1])), branch: keyOff&1 != 0, code: r[0].Symbol.Section.Data}
	}
	return sites
}

// runSite follows the code from a rewritten site with the key's count
// set to enabled, through the stub (at stubs or after), and returns
// where execution goes on: the instructions are the few the rewrite
// writes, and those it moved into the stub (stepped over).
func runSite(code []byte, site, stubs uint64, enabled int32) (uint64, error) {
	pc := site
	zf := false
	for steps := 0; steps < 12; steps++ {
		if pc != site && pc < stubs || pc >= uint64(len(code)) {
			return pc, nil // back in the function's own code
		}
		c := code[pc:]
		switch {
		case c[0] == 0xe9:
			pc = uint64(int64(pc) + 5 + int64(int32(binary.LittleEndian.Uint32(c[1:]))))
		case c[0] == 0xeb:
			pc = uint64(int64(pc) + 2 + int64(int8(c[1])))
		case c[0] == 0x83 && c[1] == 0x3d && c[6] == 0:
			zf = enabled == 0
			pc += 7
		case c[0] == 0x0f && (c[1] == 0x84 || c[1] == 0x85):
			next := pc + 6
			if zf == (c[1] == 0x84) {
				next = uint64(int64(next) + int64(int32(binary.LittleEndian.Uint32(c[2:]))))
			}
			pc = next
		default:
			in, err := x86asm.Decode(c, 64)
			if err != nil {
				return 0, fmt.Errorf("undecodable stub at %#x: %v", pc, err)
			}
			pc += uint64(in.Len) // a moved instruction
		}
	}
	return 0, fmt.Errorf("no way out of the stub from %#x", site)
}

// Jump labels on a key the kernel does not export are rewritten into a
// test of the key: with the key's count 0, 1 or -1 (a first enable in
// progress, which counts as enabled), the rewritten site goes where the
// kernel would send the original (target iff enabled XOR branch), for
// 5-byte NOP and jmp sites, 2-byte ones within reach, 2-byte ones out of
// reach whose next (or else previous) instruction moves into the stub,
// and a key local to the file (DO_ONCE's); the entries are gone, the
// functions grow over their stubs, and each stub has its site's ORC
// entry. A 2-byte site out of reach followed by a jump, where the unwind
// state changes, is refused.
func TestWriteObjectStubsJumpLabels(t *testing.T) {
	post := compile(t, "testdata/writer/branches.c")
	o, err := elfobj.Parse(post)
	if err != nil {
		t.Fatal(err)
	}
	orig := jumpSites(t, o)
	ends := map[string]uint64{} // where the stubs begin
	for _, sec := range o.Sections {
		ends[sec.Name] = uint64(len(sec.Data))
	}
	funcs := []string{"unlikely_feature", "likely_feature", "once_user", "long_jmp", "far_site", "far_join"}
	in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: post, Resolve: exportedOnly("__fentry__", "slow")}
	for _, fn := range funcs {
		in.Funcs = append(in.Funcs, Func{Name: fn})
	}
	w, err := Write(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(post, compile(t, "testdata/writer/branches.c")) {
		// (gcc is deterministic: a difference means Write changed in.Post.)
		t.Error("Write changed the caller's post object")
	}
	got := map[string]StaticBranch{}
	for _, b := range w.Branches {
		got[b.Func] = b
	}
	orcTag := map[string]byte{"unlikely_feature": 0x11, "likely_feature": 0x12, "once_user": 0x13, "long_jmp": 0x14, "far_site": 0x15, "far_join": 0x16}
	want := map[string]StaticBranch{
		"unlikely_feature": {Object: "vmlinux", Func: "unlikely_feature", Size: 5, Key: "feature_key", JumpsWhenOn: true},
		"likely_feature":   {Object: "vmlinux", Func: "likely_feature", Size: 2, Key: "feature_key", JumpsWhenOn: false},
		"once_user":        {Object: "vmlinux", Func: "once_user", Size: 5, Key: "local_key", JumpsWhenOn: true},
		"long_jmp":         {Object: "vmlinux", Func: "long_jmp", Size: 5, Key: "feature_key", JumpsWhenOn: false},
		// Its `movl $0x2a, %r11d` moves into the stub.
		"far_site": {Object: "vmlinux", Func: "far_site", Size: 2, Key: "feature_key", JumpsWhenOn: true, Moved: 6},
		// Its `movl $0x2b, %r10d` before the site moves: the branch's
		// block comes back right after the site.
		"far_join": {Object: "vmlinux", Func: "far_join", Size: 2, Key: "feature_key", JumpsWhenOn: true, Moved: 6, MovedBefore: true},
	}
	if len(w.Branches) != len(want) {
		t.Errorf("rewrote %d sites, want %d: %v", len(w.Branches), len(want), w.Branches)
	}

	out, err := elfobj.Parse(w.Object)
	if err != nil {
		t.Fatal(err)
	}
	if s := out.Section("__jump_table"); s != nil && len(s.Data) > 0 {
		t.Errorf("__jump_table still has %d bytes", len(s.Data))
	}
	ip, orc := out.Section(".orc_unwind_ip"), out.Section(".orc_unwind")
	for fn, wb := range want {
		sec := ".text." + fn
		o, b := orig[sec], got[fn]
		wb.Offset, wb.Stub = o.off, b.Stub
		if b != wb {
			t.Errorf("%s: reported %+v, want %+v", fn, b, wb)
		}
		text := out.Section(sec)
		sym := out.Symbol(fn)
		if sym == nil || sym.Value+sym.Size != uint64(len(text.Data)) || b.Stub+stubSize+uint64(b.Moved) != sym.Size {
			t.Errorf("%s: symbol %+v does not end with its stub at %#x (section of %d bytes)", fn, sym, b.Stub, len(text.Data))
		}
		// The key is read through a klp relocation, 5 bytes before the
		// end of the cmpl.
		var keyRel *elfobj.Reloc
		// The rewritten code: from (where a jump to the stub now is)
		// to back (where the stub goes on); cmpl is after what moved
		// before the site.
		from, back, cmpl := o.off, o.off+uint64(wb.Size+wb.Moved), b.Stub
		if wb.MovedBefore {
			from, back, cmpl = o.off-uint64(wb.Moved), o.off+uint64(wb.Size), b.Stub+uint64(wb.Moved)
		}
		for i, r := range text.Relocs {
			if r.Offset == cmpl+2 {
				keyRel = &text.Relocs[i]
			}
			if r.Offset >= from && r.Offset < back {
				t.Errorf("%s: relocation %s left in the site", fn, r.Symbol.Name)
			}
		}
		if wantKey := KlpSymName("vmlinux", wb.Key, 0); keyRel == nil || keyRel.Symbol.Name != wantKey || keyRel.Type != elf.R_X86_64_PC32 || keyRel.Addend != -5 {
			t.Errorf("%s: key relocation %+v, want R_X86_64_PC32 %s-5", fn, keyRel, wantKey)
		}
		for _, enabled := range []int32{0, 1, -1} {
			to, err := runSite(text.Data, from, ends[sec], enabled)
			if err != nil {
				t.Fatalf("%s: %v", fn, err)
			}
			next := back // having run what moved
			movedTo, movedFrom := b.Stub+13, o.off+2
			if wb.MovedBefore {
				movedTo, movedFrom = b.Stub, from
			}
			if wb.Moved > 0 && !bytes.Equal(text.Data[movedTo:movedTo+uint64(wb.Moved)], o.code[movedFrom:movedFrom+uint64(wb.Moved)]) {
				t.Errorf("%s: the stub does not hold the instructions moved from %#x", fn, movedFrom)
			}
			if (enabled != 0) != o.branch {
				next = o.target
			}
			if to != next {
				t.Errorf("%s: key count %d: goes on at %#x, want %#x (site %#x, target %#x, branch %v)", fn, enabled, to, next, o.off, o.target, o.branch)
			}
		}
		// The stub has the ORC entry of its site, tagged by ORC_HERE.
		found := false
		for _, r := range ip.Relocs {
			if r.Symbol.Section == text && uint64(placeOf(r)) == b.Stub {
				i := r.Offset / 4
				found = true
				if e := orc.Data[i*6 : i*6+6]; e[0] != orcTag[fn] || e[1] != 0x22 {
					t.Errorf("%s: the stub's ORC entry is % x, not its site's", fn, e)
				}
			}
		}
		if !found {
			t.Errorf("%s: no ORC entry at the stub", fn)
		}
	}

	in.Funcs = []Func{{Name: "far_jump"}}
	if _, err := Write(in, "__stitch_fn_0_"); !errors.Is(err, ErrUnpatchable) || !strings.Contains(err.Error(), "2-byte") || !strings.Contains(err.Error(), "feature_key") || !strings.Contains(err.Error(), "far_jump+0x") || !strings.Contains(err.Error(), "is a jmp") || !strings.Contains(err.Error(), "unwind state changes at the site") {
		t.Errorf("far 2-byte site before a jump, the unwind state changing at it: %v; want ErrUnpatchable naming the function, the key, the 2-byte jump, the jmp after it and the unwind state", err)
	}
}

// The rewrite may set the flags at a site because gcc takes every x86
// asm statement, asm goto included, as clobbering them: its RTL for the
// jump label's asm goto carries (clobber (reg:CC 17 flags)), so no flag
// value is live across the site.
func TestAsmGotoClobbersFlags(t *testing.T) {
	dir := t.TempDir()
	compileIn(t, dir, "testdata/writer/branches.c", "-fdump-rtl-expand")
	dumps, _ := filepath.Glob(filepath.Join(dir, "*.expand"))
	if len(dumps) != 1 {
		t.Fatalf("no RTL dump (%v)", dumps)
	}
	b, err := os.ReadFile(dumps[0])
	if err != nil {
		t.Fatal(err)
	}
	// Each asm goto is a parallel of the asm and its clobbers.
	rtl := string(b)
	n := 0
	for _, part := range strings.Split(rtl, "(parallel")[1:] {
		if !strings.Contains(part, "__jump_table") {
			continue
		}
		n++
		asm := part
		if i := strings.Index(part, "(jump_insn"); i > 0 {
			asm = part[:i]
		}
		if !strings.Contains(asm, "(clobber (reg:CC 17 flags))") {
			t.Errorf("an asm goto of a jump label does not clobber the flags:\n%s", asm)
		}
	}
	if n == 0 {
		t.Fatal("no jump label's asm goto in the RTL dump")
	}
}

// compileIn compiles src with the kernel's flags in dir (where gcc
// leaves its dumps).
func compileIn(t *testing.T, dir, src string, extra ...string) {
	t.Helper()
	abs, err := filepath.Abs(src)
	if err != nil {
		t.Fatal(err)
	}
	args := append(append(append([]string{}, testutils.KernelCFLAGS...), extra...), "-o", "out.o", abs)
	cmd := exec.Command("gcc", args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
}
