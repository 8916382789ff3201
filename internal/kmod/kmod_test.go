package kmod_test

import (
	"bytes"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// realModule is a signed in-tree module of the test kernel's image package.
const realModule = "/lib/modules/" + testutils.Release + "/kernel/drivers/block/zram/zram.ko"

func readReal(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(realModule)
	if err != nil {
		testutils.Unavailable(t, "%s: %v", realModule, err)
	}
	return b
}

func TestOpenRealModule(t *testing.T) {
	readReal(t)
	m, err := kmod.Open(realModule)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "zram" || m.Release() != testutils.Release || m.Livepatch || !m.Signed {
		t.Errorf("module = name %q release %q livepatch %v signed %v", m.Name, m.Release(), m.Livepatch, m.Signed)
	}
	if got := m.Info["depends"]; !reflect.DeepEqual(got, []string{"zsmalloc"}) {
		t.Errorf("depends = %q", got)
	}
	if err := m.CheckLivepatch(); !errors.Is(err, kmod.ErrNotLivepatch) {
		t.Errorf("CheckLivepatch = %v, want kmod.ErrNotLivepatch", err)
	}
	if err := m.CheckRelease(testutils.Release); err != nil {
		t.Errorf("CheckRelease(own release) = %v", err)
	}
	if err := m.CheckRelease("6.1.0-55-amd64"); !errors.Is(err, kmod.ErrVermagic) {
		t.Errorf("CheckRelease(other) = %v, want kmod.ErrVermagic", err)
	}
}

func TestReadBadInput(t *testing.T) {
	good := readReal(t)
	cases := map[string]struct {
		data []byte
		want error
	}{
		"empty":     {nil, kmod.ErrNotELF},
		"text":      {[]byte("hello, world\n"), kmod.ErrNotELF},
		"truncated": {good[:len(good)/2], kmod.ErrNotModule},
		"header":    {good[:64], kmod.ErrNotModule},
		"not REL":   {withByte(good, 16, byte(2)), kmod.ErrNotModule}, // e_type = ET_EXEC
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := kmod.Read(bytes.NewReader(c.data))
			if !errors.Is(err, c.want) {
				t.Errorf("Read = %v, want %v", err, c.want)
			}
		})
	}
}

func withByte(b []byte, off int, v byte) []byte {
	c := bytes.Clone(b)
	c[off] = v
	return c
}

func TestParseModinfo(t *testing.T) {
	got := kmod.ParseModinfo([]byte("license=GPL\x00alias=a\x00alias=b\x00\x00junk\x00livepatch=Y\x00"))
	want := map[string][]string{"license": {"GPL"}, "alias": {"a", "b"}, "livepatch": {"Y"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseModinfo = %v, want %v", got, want)
	}
}

func FuzzRead(f *testing.F) {
	if b, err := os.ReadFile(realModule); err == nil {
		f.Add(b)
		f.Add(b[:4096])
	}
	f.Add([]byte("\x7fELF"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := kmod.Read(bytes.NewReader(data))
		if err == nil && (m.Name == "" || m.Vermagic == "") {
			t.Fatalf("accepted a module without name or vermagic: %+v", m)
		}
	})
}

func TestBuildIDOfRealModule(t *testing.T) {
	readReal(t)
	f, err := elf.Open(realModule)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	notes, err := f.Section(".note.gnu.build-id").Data()
	if err != nil {
		t.Fatal(err)
	}
	id, err := kmod.BuildID(notes)
	if err != nil || len(id) != 40 {
		t.Fatalf("BuildID = %q, %v; want 20 bytes of hex", id, err)
	}
	// readelf must agree.
	out, err := exec.Command("readelf", "-n", realModule).Output()
	if err == nil && !strings.Contains(string(out), id) {
		t.Errorf("readelf -n does not show build-id %s:\n%s", id, out)
	}
	if _, err := kmod.BuildID(notes[:len(notes)-3]); !errors.Is(err, kmod.ErrNoBuildID) {
		t.Errorf("truncated notes: %v", err)
	}
}

func FuzzBuildID(f *testing.F) {
	f.Add([]byte("\x04\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00GNU\x00\xab\xcd\x00\x00"))
	f.Fuzz(func(t *testing.T, notes []byte) {
		kmod.BuildID(notes) // must not panic
	})
}
