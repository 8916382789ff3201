package kmod

import (
	"bytes"
	"errors"
	"os"
	"reflect"
	"testing"

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
	m, err := Open(realModule)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "zram" || m.Release() != testutils.Release || m.Livepatch || !m.Signed {
		t.Errorf("module = name %q release %q livepatch %v signed %v", m.Name, m.Release(), m.Livepatch, m.Signed)
	}
	if got := m.Info["depends"]; !reflect.DeepEqual(got, []string{"zsmalloc"}) {
		t.Errorf("depends = %q", got)
	}
	if err := m.CheckLivepatch(); !errors.Is(err, ErrNotLivepatch) {
		t.Errorf("CheckLivepatch = %v, want ErrNotLivepatch", err)
	}
	if err := m.CheckRelease(testutils.Release); err != nil {
		t.Errorf("CheckRelease(own release) = %v", err)
	}
	if err := m.CheckRelease("6.1.0-55-amd64"); !errors.Is(err, ErrVermagic) {
		t.Errorf("CheckRelease(other) = %v, want ErrVermagic", err)
	}
}

func TestReadBadInput(t *testing.T) {
	good := readReal(t)
	cases := map[string]struct {
		data []byte
		want error
	}{
		"empty":     {nil, ErrNotELF},
		"text":      {[]byte("hello, world\n"), ErrNotELF},
		"truncated": {good[:len(good)/2], ErrNotModule},
		"header":    {good[:64], ErrNotModule},
		"not REL":   {withByte(good, 16, byte(2)), ErrNotModule}, // e_type = ET_EXEC
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Read(bytes.NewReader(c.data))
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
	got := ParseModinfo([]byte("license=GPL\x00alias=a\x00alias=b\x00\x00junk\x00livepatch=Y\x00"))
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
		m, err := Read(bytes.NewReader(data))
		if err == nil && (m.Name == "" || m.Vermagic == "") {
			t.Fatalf("accepted a module without name or vermagic: %+v", m)
		}
	})
}
