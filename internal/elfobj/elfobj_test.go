package elfobj

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// seedObject compiles testdata/seed.c the way the kernel compiles code.
// With debug, it carries DWARF; without, it is small enough for the fuzzer
// to minimise quickly.
func seedObject(tb testing.TB, debug bool) []byte {
	tb.Helper()
	cc := ""
	for _, c := range []string{"gcc-12", "gcc"} {
		if p, err := exec.LookPath(c); err == nil {
			cc = p
			break
		}
	}
	if cc == "" {
		if os.Getenv("CI") != "" {
			tb.Fatal("no gcc in PATH")
		}
		tb.Skip("no gcc in PATH")
	}
	out := filepath.Join(tb.TempDir(), "seed.o")
	args := []string{"-O2", "-mfentry", "-pg", "-ffunction-sections", "-fdata-sections",
		"-fno-pic", "-mcmodel=kernel", "-mno-red-zone", "-fno-asynchronous-unwind-tables",
		"-c", "testdata/seed.c", "-o", out}
	if debug {
		args = append(args, "-g")
	}
	cmd := exec.Command(cc, args...)
	if b, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("%v: %v\n%s", cmd, err, b)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		tb.Fatal(err)
	}
	return raw
}

func TestParse(t *testing.T) {
	o, err := Parse(seedObject(t, true))
	if err != nil {
		t.Fatal(err)
	}
	entry := o.Symbol("entry")
	if entry == nil || !entry.Func() || entry.Local() || entry.Section.Name != ".text.entry" {
		t.Fatalf("entry = %+v", entry)
	}
	helper := o.Symbol("helper")
	if helper == nil || !helper.Local() || helper.Section.Sym == nil {
		t.Fatalf("helper = %+v", helper)
	}
	if got := entry.Section.SymbolAt(entry.Value); got != entry {
		t.Errorf("SymbolAt(entry) = %v", got)
	}
	if len(entry.Bytes()) != int(entry.Size) {
		t.Errorf("entry bytes: %d, size %d", len(entry.Bytes()), entry.Size)
	}

	// entry calls helper and __fentry__; the hook pointer refers to helper
	// through .text.helper's section symbol, which Target resolves.
	calls := map[string]bool{}
	for _, r := range entry.Section.RelocsIn(entry.Value, entry.Value+entry.Size) {
		s, _ := r.Target()
		calls[s.Name] = true
	}
	for _, want := range []string{"__fentry__", "helper", "sink", "flag"} {
		if !calls[want] {
			t.Errorf("entry does not refer to %s: %v", want, calls)
		}
	}
	hook := o.Symbol("hook")
	rs := hook.Section.RelocsIn(hook.Value, hook.Value+hook.Size)
	if len(rs) != 1 || rs[0].Type != elf.R_X86_64_64 {
		t.Fatalf("hook relocations: %+v", rs)
	}
	if rs[0].Symbol.Type != elf.STT_SECTION {
		t.Logf("assembler referred to helper by name, not through its section")
	}
	if s, off := rs[0].Target(); s != helper || off != 0 {
		t.Errorf("hook points to %v+%d, want helper+0", s, off)
	}
	if _, err := o.DWARF(); err != nil {
		t.Errorf("DWARF: %v", err)
	}
}

func TestErrors(t *testing.T) {
	raw := seedObject(t, false)
	le := binary.LittleEndian

	// A relocation naming a symbol past the end of the symbol table.
	badSym := bytes.Clone(raw)
	f, err := elf.NewFile(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range f.Sections {
		if s.Type == elf.SHT_RELA && s.Size >= relaSize {
			le.PutUint64(badSym[s.Offset+8:], uint64(0xffffff)<<32|uint64(elf.R_X86_64_PC32))
			break
		}
	}
	exec := bytes.Clone(raw)
	le.PutUint16(exec[16:], uint16(elf.ET_EXEC))

	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"text", []byte("hello, world"), ErrNotObject},
		{"empty", nil, ErrNotObject},
		{"executable", exec, ErrNotObject},
		{"truncated", raw[:len(raw)/2], nil},
		{"bad symbol index", badSym, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(tt.in)
			if err == nil {
				t.Fatal("no error")
			}
			if tt.want == nil {
				if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrNotObject) {
					t.Fatalf("err = %v, want ErrMalformed or ErrNotObject", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			var fe *FormatError
			if tt.want == ErrMalformed && !errors.As(err, &fe) {
				t.Fatalf("err = %v is not a *FormatError", err)
			}
		})
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing.o")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing) = %v", err)
	}
}

// FuzzParse feeds the reader mutations of a real gcc-compiled object: it
// must return an error or a model that its helpers can walk, never panic.
func FuzzParse(f *testing.F) {
	f.Add(seedObject(f, false))
	f.Add([]byte(elf.ELFMAG))
	f.Fuzz(func(t *testing.T, raw []byte) {
		o, err := Parse(raw)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrNotObject) {
				t.Fatalf("error wraps neither sentinel: %v", err)
			}
			return
		}
		for _, sec := range o.Sections {
			for _, r := range sec.Relocs {
				if s, _ := r.Target(); s == nil {
					t.Fatalf("relocation without symbol in %s", sec.Name)
				}
			}
			sec.RelocsIn(0, sec.Size)
			sec.SymbolAt(0)
			sec.String(0)
		}
		for _, s := range o.Symbols {
			s.Bytes()
		}
		o.DWARF()
	})
}
