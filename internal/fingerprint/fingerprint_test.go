package fingerprint

import (
	"bytes"
	"debug/elf"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils"
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
	fp, err := FromObject(obj, "fn")
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
	if _, err := FromObject([]byte("junk"), "fn"); err == nil {
		t.Error("junk accepted")
	}
	if _, err := FromObject(compile(t), "nope"); err == nil {
		t.Error("unknown function accepted")
	}
}

func FuzzFromObject(f *testing.F) {
	if seed, err := os.ReadFile("testdata/seed.o"); err == nil {
		f.Add(seed) // gcc -O2 -mcmodel=kernel -pg -mfentry -mrecord-mcount -ffunction-sections of the test's source
	}
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		FromObject(data, "fn") // must not panic
	})
}
