package kallsyms

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils"
)

// synthRodata lays out kallsyms tables the way scripts/kallsyms.c does
// (absolute-percpu, base-relative, with kallsyms_seqs_of_names), with a
// token table in which each printable character stands for itself, so
// tests and fuzzing need no kernel. Everything is placed 8-aligned at
// address base. addrsLast puts the offsets and the relative base after
// the token index, as kernels since 6.4 (6.12) do; 6.1 has them first.
func synthRodata(syms []Symbol, relBase uint64, addrsLast bool) []byte {
	le := binary.LittleEndian
	var b []byte
	align := func() {
		for len(b)%8 != 0 {
			b = append(b, 0)
		}
	}
	addrs := func() {
		for _, s := range syms {
			off := int32(s.Addr)
			if s.Addr >= relBase {
				off = int32(int64(relBase) - 1 - int64(s.Addr))
			}
			b = le.AppendUint32(b, uint32(off))
		}
		align()
		b = le.AppendUint64(b, relBase)
	}
	b = append(b, make([]byte, 64)...) // unrelated data before
	if !addrsLast {
		addrs()
	}
	b = le.AppendUint32(b, uint32(len(syms)))
	align()
	var markers []uint32
	namesStart := len(b)
	for i, s := range syms {
		if i%256 == 0 {
			markers = append(markers, uint32(len(b)-namesStart))
		}
		name := string(s.Type) + s.Name
		if len(name) > 0x7f {
			b = append(b, byte(len(name)&0x7f|0x80), byte(len(name)>>7))
		} else {
			b = append(b, byte(len(name)))
		}
		b = append(b, name...)
	}
	align()
	for _, m := range markers {
		b = le.AppendUint32(b, m)
	}
	align()
	if !addrsLast {
		b = append(b, make([]byte, 3*len(syms))...) // seqs_of_names (6.2, 6.3): not read
		align()
	}
	var index []uint16
	tableStart := len(b)
	for i := range 256 {
		index = append(index, uint16(len(b)-tableStart))
		if i > ' ' && i < 0x7f {
			b = append(b, byte(i), 0)
		} else {
			b = append(b, '~', byte('A'+i%26), 0) // never used by the names
		}
	}
	align()
	for _, x := range index {
		b = le.AppendUint16(b, x)
	}
	if addrsLast {
		align()
		addrs()
		b = append(b, make([]byte, 3*len(syms))...) // seqs_of_names: not read
	}
	return append(b, make([]byte, 64)...)
}

func synthSymbols(n int) []Symbol {
	syms := []Symbol{{Name: "fixed_percpu_data", Type: 'A', Addr: 0}, {Name: "percpu_thing", Type: 'A', Addr: 0x1000}}
	addr := uint64(0xffffffff81000000)
	for i := range n {
		name := "f_" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
		if i%100 == 7 {
			name = "dup" // a static name defined in many files
		}
		if i == 42 {
			name = string(bytes.Repeat([]byte("long_"), 40)) // a two-byte length
		}
		syms = append(syms, Symbol{Name: name, Type: "tTdDrb"[i%6], Addr: addr})
		addr += uint64(16 + i%5*8)
	}
	return syms
}

func TestDecodeSynthetic(t *testing.T) {
	for _, addrsLast := range []bool{false, true} {
		t.Run(map[bool]string{false: "6.1 order", true: "6.4+ order"}[addrsLast], func(t *testing.T) {
			testDecodeSynthetic(t, addrsLast)
		})
	}
}

func testDecodeSynthetic(t *testing.T, addrsLast bool) {
	want := synthSymbols(1000)
	relBase := uint64(0xffffffff81000000)
	ro := synthRodata(want, relBase, addrsLast)
	sects := []*elf.Section{{SectionHeader: elf.SectionHeader{Addr: relBase, Size: 1 << 20}}}
	got, err := decodeTables(ro, 0x1000, sects)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d symbols, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].Name != want[i].Name || got[i].Type != want[i].Type || got[i].Addr != want[i].Addr {
			t.Fatalf("#%d: %+v, want %+v", i, got[i], want[i])
		}
	}
	tb := newTable(got)
	if d := tb.Lookup(Vmlinux, "dup"); len(d) != 10 || d[9].Sympos != 10 {
		t.Errorf("dup: %d occurrences", len(d))
	}
	// Damage a name's length: the walk no longer meets the markers, so
	// nothing is decoded.
	bad := bytes.Clone(ro)
	i := bytes.Index(bad, []byte("\x12Afixed_percpu_data"))
	bad[i] = 0x13
	if _, err := decodeTables(bad, 0x1000, sects); !errors.Is(err, ErrFormat) {
		t.Errorf("damaged names: %v", err)
	}
}

// TestXZx86 compresses x86-like data with xz(1) the way kbuild compresses
// a kernel (--x86 --lzma2, CRC32 check) and decompresses it, inside a
// synthetic bzImage, with ExtractVmlinux.
func TestXZx86(t *testing.T) {
	xz, err := exec.LookPath("xz")
	if err != nil {
		testutils.Unavailable(t, "xz not installed (xz-utils)")
	}
	// Calls and jumps with near displacements among random bytes: the
	// patterns the branch filter converts, and the ones it must skip.
	r := rand.New(rand.NewPCG(1, 2))
	data := []byte(elfMagic)
	for len(data) < 1<<20 {
		switch r.IntN(4) {
		case 0:
			data = append(data, 0xe8)
			data = binary.LittleEndian.AppendUint32(data, uint32(int32(r.IntN(1<<16)-1<<15)))
		case 1:
			data = append(data, 0xe9, 0xe8, byte(r.IntN(256)), 0xff, 0xff)
		default:
			data = append(data, byte(r.IntN(256)), 0x48, 0x89, 0xc7)
		}
	}
	dir := t.TempDir()
	in := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(in, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(xz, "--format=xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB", "-k", in).CombinedOutput(); err != nil {
		t.Fatalf("xz: %v\n%s", err, out)
	}
	payload, err := os.ReadFile(in + ".xz")
	if err != nil {
		t.Fatal(err)
	}
	got, err := ExtractVmlinux(synthBzImage(payload, len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("decompressed data differs")
	}
}

func TestGzipPayload(t *testing.T) {
	data := append([]byte(elfMagic), bytes.Repeat([]byte("kernel"), 1000)...)
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(data)
	zw.Close()
	got, err := ExtractVmlinux(synthBzImage(z.Bytes(), len(data)))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("gzip payload: %v", err)
	}
}

// synthBzImage wraps payload in a minimal boot setup header, with the
// decompressed size appended as kbuild does.
func synthBzImage(payload []byte, size int) []byte {
	img := make([]byte, 0x400) // setup_sects 1: the kernel starts at 0x400
	img[0x1f1] = 1
	copy(img[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(img[0x206:], 0x20f)
	binary.LittleEndian.PutUint32(img[0x248:], 0)
	binary.LittleEndian.PutUint32(img[0x24c:], uint32(len(payload)+4))
	img = append(img, payload...)
	return binary.LittleEndian.AppendUint32(img, uint32(size))
}
