package klpmod

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// klpsymRename maps the test module's references to the kernel's
// non-exported symbols to their klp names.
var klpsymRename = map[string]string{
	"saved_command_line": KlpSymName("vmlinux", "saved_command_line", 0),
	"uptime_proc_show":   KlpSymName("vmlinux", "uptime_proc_show", 0),
}

func buildKlpsym(t *testing.T) string {
	t.Helper()
	headers := testutils.RequireHeaders(t)
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS("testdata/klpsym")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ko, moved, err := Link(ctx, headers, dir, "lp_klpsym", klpsymRename, nil)
	if err != nil {
		t.Fatal(err)
	}
	if moved["vmlinux"] != 2 || len(moved) != 1 {
		t.Errorf("moved relocations = %v, want 2 for vmlinux", moved)
	}
	return ko
}

// TestLinkMakesKlpRelocations checks the linked module's ELF the way the
// kernel will read it.
func TestLinkMakesKlpRelocations(t *testing.T) {
	ko := buildKlpsym(t)
	f, err := elf.Open(ko)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	klp := map[int]string{}
	for i, s := range syms {
		switch {
		case strings.HasPrefix(s.Name, KlpSymPrefix):
			if s.Section != shnLivepatch {
				t.Errorf("%s: st_shndx %#x, want SHN_LIVEPATCH", s.Name, s.Section)
			}
			klp[i+1] = s.Name
		case s.Name == "saved_command_line" || s.Name == "uptime_proc_show":
			t.Errorf("%s still referenced under its plain name", s.Name)
		}
	}
	rela := f.Section(".klp.rela.vmlinux..text")
	if rela == nil {
		t.Fatal("no .klp.rela.vmlinux..text section")
	}
	if rela.Flags&shfRelaLivepatch == 0 || rela.Flags&elf.SHF_ALLOC == 0 || f.Sections[rela.Info].Name != ".text" {
		t.Errorf("klp rela section: flags %#x, info %s", uint64(rela.Flags), f.Sections[rela.Info].Name)
	}
	data, _ := rela.Data()
	got := map[string]bool{}
	for off := 0; off+24 <= len(data); off += 24 {
		rinfo := leUint64(data[off+8:])
		info := elf.R_X86_64(uint32(rinfo))
		sym := int(rinfo >> 32)
		got[klp[sym]] = true
		if info != elf.R_X86_64_PC32 && info != elf.R_X86_64_PLT32 {
			t.Errorf("relocation type %v", info)
		}
	}
	for _, want := range klpsymRename {
		if !got[want] {
			t.Errorf("no klp relocation against %s (have %v)", want, got)
		}
	}
	// No ordinary relocation section may still point at a klp symbol.
	for _, s := range f.Sections {
		if s.Type != elf.SHT_RELA || s.Flags&shfRelaLivepatch != 0 {
			continue
		}
		d, _ := s.Data()
		for off := 0; off+24 <= len(d); off += 24 {
			if name, ok := klp[int(uint32(leUint64(d[off+8:])>>32))]; ok {
				t.Errorf("%s still has a relocation against %s", s.Name, name)
			}
		}
	}
	if out, err := exec.Command("readelf", "-rW", ko).CombinedOutput(); err == nil && bytes.Contains(out, []byte("Warning")) {
		t.Errorf("readelf warns about the rewritten module:\n%s", out)
	}
}

func leUint64(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func TestConvertRefusesBadInput(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty":   nil,
		"not ELF": []byte("hello"),
		"header":  []byte("\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
	} {
		if _, _, err := convertKlpSyms(data, nil); !errors.Is(err, ErrBadModule) {
			t.Errorf("%s: err = %v, want ErrBadModule", name, err)
		}
	}
}

func FuzzConvertKlpSyms(f *testing.F) {
	if b, err := os.ReadFile("testdata/seed.ko"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		out, _, err := convertKlpSyms(data, klpsymRename)
		if err == nil {
			if _, err := elf.NewFile(bytes.NewReader(out)); err != nil {
				t.Fatalf("accepted input but wrote an unreadable ELF: %v", err)
			}
		}
	})
}

// TestVM applies the module in the real kernel: the klp relocations must
// resolve to the running kernel's saved_command_line and uptime_proc_show.
func TestVM(t *testing.T) {
	testutils.RequireVM(t)
	ko := buildKlpsym(t)
	testutils.RunGuestTests(t, "^TestGuest", vm.File{Src: ko, Dst: "/lp_klpsym.ko"})
}

func TestGuestKlpRelocations(t *testing.T) {
	testutils.RequireGuest(t)
	before, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("stitch", "apply", "/lp_klpsym.ko").CombinedOutput(); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	after, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("patched /proc/cmdline: %q", after)
	want := regexp.MustCompile(`^stitch-klp: ` + regexp.QuoteMeta(strings.TrimSpace(string(before))) + `\n[0-9]+\.[0-9]+ [0-9]+\.[0-9]+\n$`)
	if !want.Match(after) {
		t.Errorf("patched /proc/cmdline = %q, want the saved command line then an uptime line", after)
	}
	if out, err := exec.Command("stitch", "revert", "lp_klpsym").CombinedOutput(); err != nil {
		t.Fatalf("revert: %v\n%s", err, out)
	}
	if restored, _ := os.ReadFile("/proc/cmdline"); !bytes.Equal(restored, before) {
		t.Errorf("after revert /proc/cmdline = %q, want %q", restored, before)
	}
}
