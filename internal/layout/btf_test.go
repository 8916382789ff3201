package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"
)

// enc writes BTF, for tests of the reader: the real kernels' BTF is
// tested in layout_test.go.
type enc struct {
	order binary.AppendByteOrder
	types []byte
	strs  []byte
	n     uint32
}

func newEnc(order binary.AppendByteOrder) *enc { return &enc{order: order, strs: []byte{0}} }

func (e *enc) str(s string) uint32 {
	if s == "" {
		return 0
	}
	off := uint32(len(e.strs))
	e.strs = append(append(e.strs, s...), 0)
	return off
}

// typ appends a type and its trailing words, and returns its id.
func (e *enc) typ(name string, kind, vlen int, kflag bool, sizeType uint32, extra ...uint32) uint32 {
	info := uint32(kind)<<24 | uint32(vlen)
	if kflag {
		info |= 1 << 31
	}
	for _, w := range append([]uint32{e.str(name), info, sizeType}, extra...) {
		e.types = e.order.AppendUint32(e.types, w)
	}
	e.n++
	return e.n
}

type mem struct {
	name string
	typ  uint32
	off  uint32 // bit offset; with a bitfield size, the kind_flag word
}

func (e *enc) strct(name string, kind int, size uint32, kflag bool, ms ...mem) uint32 {
	var extra []uint32
	for _, m := range ms {
		extra = append(extra, e.str(m.name), m.typ, m.off)
	}
	return e.typ(name, kind, len(ms), kflag, size, extra...)
}

func (e *enc) bytes() []byte {
	var b []byte
	if e.order == binary.LittleEndian {
		b = []byte{0x9f, 0xeb}
	} else {
		b = []byte{0xeb, 0x9f}
	}
	b = append(b, 1, 0)
	for _, w := range []uint32{btfHeaderLen, 0, uint32(len(e.types)), uint32(len(e.types)), uint32(len(e.strs))} {
		b = e.order.AppendUint32(b, w)
	}
	return append(append(b, e.types...), e.strs...)
}

// kernel612 writes BTF shaped like 6.12's: every kind before the structs
// (a kind whose trailing data is skipped wrongly derails what follows),
// and struct alt_instr with its anonymous union of bitfields and
// ft_flags, 14 bytes packed; no struct paravirt_patch_site.
func kernel612(order binary.AppendByteOrder) *enc {
	e := newEnc(order)
	intEnc := func(bits uint32, signed bool) uint32 {
		if signed {
			return 1<<24 | bits
		}
		return bits
	}
	u8 := e.typ("unsigned char", kindInt, 0, false, 1, intEnc(8, false))
	u16 := e.typ("short unsigned int", kindInt, 0, false, 2, intEnc(16, false))
	s32 := e.typ("int", kindInt, 0, false, 4, intEnc(32, true))
	u32 := e.typ("unsigned int", kindInt, 0, false, 4, intEnc(32, false))
	long := e.typ("long int", kindInt, 0, false, 8, intEnc(64, true))
	// One of every other kind, with trailing data where the kind has it.
	ptr := e.typ("", kindPtr, 0, false, u8)
	e.typ("", kindArray, 0, false, 0, u8, s32, 16)
	e.typ("color", kindEnum, 2, false, 4, e.str("RED"), 0, e.str("BLUE"), 1)
	e.typ("inode", kindFwd, 0, false, 0)
	e.typ("", kindVolatile, 0, false, s32)
	e.typ("", kindConst, 0, false, s32)
	e.typ("", kindRestrict, 0, false, ptr)
	proto := e.typ("", kindFuncProto, 2, false, s32, e.str("a"), s32, e.str("b"), ptr)
	fn := e.typ("do_thing", kindFunc, 0, false, proto)
	v := e.typ("counter", kindVar, 0, false, s32, 1)
	e.typ(".data..percpu", kindDatasec, 1, false, 4, v, 0, 4)
	e.typ("double", kindFloat, 0, false, 8)
	e.typ("user", kindDeclTag, 0, false, fn, 0xffffffff)
	tagged := e.typ("percpu", kindTypeTag, 0, false, ptr)
	e.typ("big", kindEnum64, 1, false, 8, e.str("HUGE"), 1, 2)
	e.typ("", kindPtr, 0, false, tagged)

	tU8 := e.typ("u8", kindTypedef, 0, false, u8)
	tS32 := e.typ("s32", kindTypedef, 0, false, s32)
	tU32 := e.typ("u32", kindTypedef, 0, false, u32)
	e.strct("bug_entry", kindStruct, 12, false,
		mem{"bug_addr_disp", s32, 0}, mem{"file_disp", s32, 32}, mem{"line", u16, 64}, mem{"flags", u16, 80})
	e.strct("exception_table_entry", kindStruct, 12, false, mem{"insn", s32, 0}, mem{"fixup", s32, 32}, mem{"data", s32, 64})
	e.strct("jump_entry", kindStruct, 16, false, mem{"code", tS32, 0}, mem{"target", tS32, 32}, mem{"key", long, 64})
	bits := e.strct("", kindStruct, 4, true, mem{"cpuid", tU32, 16 << 24}, mem{"flags", tU32, 16<<24 | 16})
	un := e.strct("", kindUnion, 4, false, mem{"", bits, 0}, mem{"ft_flags", tU32, 0})
	e.strct("alt_instr", kindStruct, 14, false,
		mem{"instr_offset", tS32, 0}, mem{"repl_offset", tS32, 32}, mem{"", un, 64}, mem{"instrlen", tU8, 96}, mem{"replacementlen", tU8, 104})
	e.strct("static_call_site", kindStruct, 8, false, mem{"addr", tS32, 0}, mem{"key", tS32, 32})
	e.strct("orc_entry", kindStruct, 6, true,
		mem{"sp_offset", u16, 0}, mem{"bp_offset", u16, 16}, mem{"sp_reg", u32, 4<<24 | 32}, mem{"bp_reg", u32, 4<<24 | 36})
	return e
}

func TestSynthetic612(t *testing.T) {
	for _, order := range []binary.AppendByteOrder{binary.LittleEndian, binary.BigEndian} {
		t.Run(order.String(), func(t *testing.T) {
			l, err := FromBTF(kernel612(order).bytes())
			if err != nil {
				t.Fatal(err)
			}
			alt, ok := l.Section(".altinstructions")
			if !ok || alt.Entry != 14 || alt.Len != (Field{12, 1}) || alt.Site != 0 {
				t.Errorf(".altinstructions = %+v, want 14 bytes with instrlen at 12", alt)
			}
			bug, _ := l.Section("__bug_table")
			if bug.Entry != 12 || bug.Line != (Field{8, 2}) {
				t.Errorf("__bug_table = %+v", bug)
			}
			if orc, _ := l.Section(".orc_unwind"); orc.Entry != 6 || orc.Follows != ".orc_unwind_ip" {
				t.Errorf(".orc_unwind = %+v", orc)
			}
			if _, ok := l.Section(".parainstructions"); ok {
				t.Error("a kernel without struct paravirt_patch_site has .parainstructions")
			}
			err = l.Check([]string{".text", ".parainstructions", "__bug_table", ".rodata"})
			if !errors.Is(err, ErrUnknownSection) || !strings.Contains(err.Error(), "paravirt_patch_site") {
				t.Errorf("Check(.parainstructions) = %v", err)
			}
			if err := l.Check([]string{".text", "__bug_table", ".call_sites", "__mcount_loc"}); err != nil {
				t.Errorf("Check = %v", err)
			}
		})
	}
}

func TestStructMembers(t *testing.T) {
	b, err := ParseBTF(kernel612(binary.LittleEndian).bytes())
	if err != nil {
		t.Fatal(err)
	}
	s, err := b.Struct("alt_instr")
	if err != nil {
		t.Fatal(err)
	}
	// The anonymous union's members and its anonymous struct's bitfields
	// are the struct's, at their offsets in it.
	want := map[string][2]uint64{"instr_offset": {0, 0}, "cpuid": {64, 16}, "flags": {80, 16}, "ft_flags": {64, 0}, "instrlen": {96, 0}}
	for name, w := range want {
		m, ok := s.Member(name)
		if !ok || m.BitOffset != w[0] || uint64(m.BitSize) != w[1] {
			t.Errorf("member %s = %+v, %v; want bit %d size %d", name, m, ok, w[0], w[1])
		}
	}
	if _, err := b.Field(s, "cpuid"); err == nil {
		t.Error("a bitfield taken for a byte field")
	}
	if f, err := b.Field(s, "ft_flags"); err != nil || f != (Field{8, 4}) {
		t.Errorf("ft_flags = %+v, %v", f, err)
	}
	if _, err := b.Struct("paravirt_patch_site"); !errors.Is(err, errNoType) {
		t.Errorf("missing struct: %v", err)
	}
}

// corrupt returns BTF where f changed the 6.12-like types.
func corrupt(f func(e *enc)) []byte {
	e := kernel612(binary.LittleEndian)
	f(e)
	return e.bytes()
}

func TestCorrupt(t *testing.T) {
	good := kernel612(binary.LittleEndian).bytes()
	for n := range len(good) {
		if _, err := ParseBTF(good[:n]); !errors.Is(err, ErrBadBTF) {
			t.Fatalf("BTF truncated to %d of %d bytes: %v", n, len(good), err)
		}
	}
	header := func(off int, v uint32) []byte {
		b := bytes.Clone(good)
		binary.LittleEndian.PutUint32(b[off:], v)
		return b
	}
	cases := map[string][]byte{
		"magic":           append([]byte{0x9e, 0xeb}, good[2:]...),
		"version":         append([]byte{0x9f, 0xeb, 2}, good[3:]...),
		"header length":   header(4, 8),
		"header past end": header(4, 1<<30),
		"type offset":     header(8, 0xfffffff0),
		"string length":   header(20, 0xffffffff),
		"type length":     header(12, uint32(len(good))),
		"unknown kind": corrupt(func(e *enc) {
			e.typ("", 31, 0, false, 0)
		}),
		"members past end": corrupt(func(e *enc) {
			e.typ("x", kindStruct, 100, false, 4)
		}),
	}
	for name, data := range cases {
		if _, err := ParseBTF(data); !errors.Is(err, ErrBadBTF) {
			t.Errorf("%s: ParseBTF = %v", name, err)
		}
		if _, err := FromBTF(data); !errors.Is(err, ErrNoLayout) {
			t.Errorf("%s: FromBTF = %v", name, err)
		}
	}
}

// TestCorruptTypes: BTF that parses but whose types do not hold
// together; the layout is refused, with the reason.
func TestCorruptTypes(t *testing.T) {
	// rename makes the good alt_instr another struct; altWith adds one
	// with instrlen of the given type (s32 is type 3).
	rename := func(e *enc) {
		e.strs = bytes.Replace(e.strs, []byte("alt_instr\x00"), []byte("alt_inst_\x00"), 1)
	}
	altWith := func(e *enc, instrlen uint32, extra ...mem) {
		rename(e)
		e.strct("alt_instr", kindStruct, 14, false, append([]mem{{"instr_offset", 3, 0}, {"instrlen", instrlen, 96}}, extra...)...)
	}
	cases := map[string]struct {
		data []byte
		want string
	}{
		"typedef loop": {corrupt(func(e *enc) {
			a := e.n + 1
			e.typ("a", kindTypedef, 0, false, a+1)
			e.typ("b", kindTypedef, 0, false, a)
			altWith(e, a)
		}), "loop"},
		"array loop": {corrupt(func(e *enc) {
			a := e.n + 1
			e.typ("", kindArray, 0, false, 0, a, 3, 2)
			altWith(e, a)
		}), "loop"},
		"anonymous member loop": {corrupt(func(e *enc) {
			altWith(e, 1, mem{"", e.n + 1, 0})
		}), "loop"},
		"type out of range": {corrupt(func(e *enc) {
			altWith(e, 999999)
		}), "out of range"},
		"two alt_instr": {corrupt(func(e *enc) {
			e.strct("alt_instr", kindStruct, 14, false, mem{"instr_offset", 3, 0}, mem{"instrlen", 1, 96})
		}), "two different definitions"},
		"name offset": {corrupt(func(e *enc) {
			e.typ("", kindStruct, 0, false, 4)
			e.types = e.order.AppendUint32(e.types[:len(e.types)-12], 1<<20)
			e.types = e.order.AppendUint32(e.types, uint32(kindStruct)<<24)
			e.types = e.order.AppendUint32(e.types, 4)
		}), "string offset"},
		"instrlen not u8": {corrupt(func(e *enc) {
			altWith(e, 2) // u16
		}), "not a u8"},
		"no alt_instr": {corrupt(rename), "no such type"},
		"bitfield site": {corrupt(func(e *enc) {
			rename(e)
			e.strct("alt_instr", kindStruct, 14, true, mem{"instr_offset", 3, 4<<24 | 0}, mem{"instrlen", 1, 96})
		}), "bitfield"},
		"int encoding bitfield": {corrupt(func(e *enc) {
			rename(e)
			u4 := e.typ("u4", kindInt, 0, false, 1, 4)
			e.strct("alt_instr", kindStruct, 14, false, mem{"instr_offset", 3, 0}, mem{"instrlen", u4, 96})
		}), "bitfield"},
		"member outside struct": {corrupt(func(e *enc) {
			rename(e)
			e.strct("alt_instr", kindStruct, 14, false, mem{"instr_offset", 3, 0}, mem{"instrlen", 1, 200})
		}), "outside"},
	}
	for name, c := range cases {
		_, err := FromBTF(c.data)
		if !errors.Is(err, ErrNoLayout) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: FromBTF = %v, want ErrNoLayout saying %q", name, err, c.want)
		}
	}
}

func TestFromELF(t *testing.T) {
	if _, err := FromELF([]byte("not an ELF file")); !errors.Is(err, ErrNoLayout) {
		t.Errorf("FromELF(junk) = %v", err)
	}
	// The test binary: an x86-64 ELF file without .BTF.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	_, err = FromVmlinux(exe)
	if !errors.Is(err, ErrNoLayout) || !strings.Contains(err.Error(), "CONFIG_DEBUG_INFO_BTF") {
		t.Errorf("FromVmlinux(no .BTF) = %v", err)
	}
	if _, err := FromVmlinux("/nonexistent/vmlinux"); err == nil || errors.Is(err, ErrNoLayout) {
		t.Errorf("FromVmlinux(missing file) = %v, want the I/O error", err)
	}
}

func TestNilLayout(t *testing.T) {
	var l *Layout
	if _, ok := l.Section("__bug_table"); ok {
		t.Error("a nil layout has a section")
	}
	if err := l.Check([]string{"__bug_table"}); !errors.Is(err, ErrUnknownSection) {
		t.Errorf("nil Check = %v", err)
	}
}

// FuzzParseBTF: whatever the bytes, the reader and the layout built on
// it return errors, never panic (or loop).
func FuzzParseBTF(f *testing.F) {
	f.Add(kernel612(binary.LittleEndian).bytes())
	f.Add(kernel612(binary.BigEndian).bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParseBTF(data)
		if err != nil {
			return
		}
		for id := uint32(0); id <= uint32(min(b.NumTypes(), 1000))+1; id++ {
			b.SizeOf(id)
		}
		for _, sp := range specs {
			if sp.strct == "" {
				continue
			}
			if s, err := b.Struct(sp.strct); err == nil {
				for _, m := range s.Members {
					b.Field(s, m.Name)
				}
			}
		}
		if l, err := FromBTF(data); err == nil {
			l.Check([]string{".parainstructions", ".text"})
		}
	})
}
