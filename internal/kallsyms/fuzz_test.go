package kallsyms

import (
	"bytes"
	"debug/elf"
	"os"
	"testing"
)

// FuzzExtractVmlinux feeds arbitrary boot images to the extractor: any
// input must give a vmlinux or an error, never a panic or a hang.
func FuzzExtractVmlinux(f *testing.F) {
	f.Add([]byte("MZ"))
	img := make([]byte, 0x400)
	img[0x1f1] = 1
	copy(img[0x202:], "HdrS")
	img[0x206], img[0x207] = 0x0f, 0x02
	img[0x24c] = 12
	f.Add(append(img, []byte(xzMagic+"\x00\x01\x69\x22\xde\x36\x00\x00")...))
	f.Fuzz(func(t *testing.T, data []byte) {
		if v, err := ExtractVmlinux(data); err == nil && !bytes.HasPrefix(v, []byte(elfMagic)) {
			t.Fatal("no error, but no ELF")
		}
	})
}

// FuzzDecodeVmlinux feeds arbitrary ELF files and .rodata contents to the
// kallsyms decoder.
func FuzzDecodeVmlinux(f *testing.F) {
	// The head of a real module (a whole one makes the fuzzer crawl).
	if b, err := os.ReadFile("/lib/modules/6.1.0-54-amd64/kernel/drivers/block/loop.ko"); err == nil {
		f.Add(b[:4096])
	}
	f.Add([]byte(elfMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = DecodeVmlinux(data)
		_, _ = readModule(data, true)
	})
}

// everywhere is one section spanning the address space, so that any
// 8-byte word passes for kallsyms_relative_base.
var everywhere = []*elf.Section{{SectionHeader: elf.SectionHeader{Size: ^uint64(0)}}}

// FuzzDecodeTables drives the table search directly with .rodata bytes.
func FuzzDecodeTables(f *testing.F) {
	f.Add(make([]byte, 1024), uint64(0))
	f.Add(synthRodata(synthSymbols(300), 0xffffffff81000000, false), uint64(0x1000))
	f.Add(synthRodata(synthSymbols(300), 0xffffffff81000000, true), uint64(0x1000))
	f.Fuzz(func(t *testing.T, ro []byte, base uint64) {
		var syms []Symbol
		var err error
		func() {
			defer recoverInto(&err)
			syms, err = decodeTables(ro, base, everywhere)
		}()
		if err != nil && bytes.Contains([]byte(err.Error()), []byte("panic")) {
			t.Fatal(err)
		}
		_ = syms
	})
}

func BenchmarkDecodeVmlinux(b *testing.B) {
	im := targetImage(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeVmlinux(im.data); err != nil {
			b.Fatal(err)
		}
	}
}
