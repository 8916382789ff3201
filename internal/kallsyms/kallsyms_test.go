package kallsyms

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

func TestMain(m *testing.M) {
	// The VM test boots this test binary as the guest's /init.
	if os.Getpid() == 1 {
		vm.GuestInit()
		return
	}
	os.Exit(m.Run())
}

// loaded is the target kernel's image, extracted and decoded once for all
// tests of the package.
type loaded struct {
	once sync.Once
	im   *Image
	err  error
	took time.Duration
}

var target loaded

func targetImage(t testing.TB) *Image {
	t.Helper()
	if testutils.InGuest() {
		t.Skip("host only")
	}
	image := testutils.BootImage(t)
	target.once.Do(func() {
		cache := kernel.CacheDir()
		if err := os.MkdirAll(cache, 0o755); err != nil || writable(cache) != nil {
			cache = filepath.Join(os.TempDir(), "stitch-kallsyms-test")
		}
		start := time.Now()
		target.im, target.err = OpenImage(context.Background(), image, cache, nil)
		target.took = time.Since(start)
	})
	if target.err != nil {
		t.Fatalf("open %s: %v", image, target.err)
	}
	return target.im
}

// writable tells whether dir can be written, by writing to it.
func writable(dir string) error {
	f, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return err
	}
	f.Close()
	return os.Remove(f.Name())
}

func TestExtractVmlinux(t *testing.T) {
	if testutils.InGuest() {
		t.Skip("host only")
	}
	image, err := os.ReadFile(testutils.BootImage(t))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	v, err := ExtractVmlinux(image)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("extracted %d bytes in %v", len(v), time.Since(start))
	if _, err := elf.NewFile(bytes.NewReader(v)); err != nil {
		t.Fatalf("extracted vmlinux: %v", err)
	}
	im := targetImage(t)
	if len(im.data) != len(v) {
		t.Errorf("cached vmlinux has %d bytes, fresh extraction %d", len(im.data), len(v))
	}
}

func mustELF(t testing.TB, data []byte) *elf.File {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestDecodeVmlinux(t *testing.T) {
	im := targetImage(t)
	tb := im.Table
	t.Logf("%d symbols; extraction (or cache) and decoding took %v", tb.Len(), target.took)
	if tb.Len() < 50000 {
		t.Fatalf("only %d symbols", tb.Len())
	}
	// _text starts .text, whose address the ELF headers give independently.
	text, err := tb.Find(Vmlinux, "_text", 0)
	if err != nil {
		t.Fatal(err)
	}
	f := mustELF(t, im.data)
	if s := f.Section(".text"); s == nil || s.Addr != text.Addr {
		t.Errorf("_text at %#x, .text section at %+v", text.Addr, s)
	}
	// The function livepatch's sample replaces: code that starts with
	// the call to __fentry__ and ends with a return or a jump to the
	// return thunk before the next symbol.
	b, s, err := im.Bytes("cmdline_proc_show", 0)
	if err != nil {
		t.Fatal(err)
	}
	if s.Type != 't' || s.Size == 0 || s.Size > 256 || b[0] != 0xe8 {
		t.Errorf("cmdline_proc_show: %+v % x", s, b)
	}
}

// TestDecodeVmlinux612 decodes a 6.12 image: a zstd payload, and the
// kallsyms tables in the order kernels have written them since 6.4.
func TestDecodeVmlinux612(t *testing.T) {
	p := testutils.Profile(t, testutils.Release612)
	im, err := OpenImage(context.Background(), p.BootImage, kernel.CacheDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if im.Table.Len() < 50000 {
		t.Fatalf("only %d symbols", im.Table.Len())
	}
	text, err := im.Table.Find(Vmlinux, "_text", 0)
	if err != nil {
		t.Fatal(err)
	}
	if s := mustELF(t, im.data).Section(".text"); s == nil || s.Addr != text.Addr {
		t.Errorf("_text at %#x, .text section at %+v", text.Addr, s)
	}
	// IBT and call padding: ENDBR64, then the fentry call; the padding
	// before it is its __pfx_ symbol's.
	b, s, err := im.Bytes("cmdline_proc_show", 0)
	if err != nil {
		t.Fatal(err)
	}
	if s.Type != 't' || len(b) < 9 || !bytes.Equal(b[:4], []byte{0xf3, 0x0f, 0x1e, 0xfa}) || b[4] != 0xe8 {
		t.Errorf("cmdline_proc_show: %+v % x", s, b)
	}
	if pfx, err := im.Table.Find(Vmlinux, "__pfx_cmdline_proc_show", 0); err != nil || pfx.Addr != s.Addr-16 {
		t.Errorf("__pfx_cmdline_proc_show: %+v, %v; want 16 bytes before %#x", pfx, err, s.Addr)
	}
}

// TestSympos uses a static function defined in several files: each copy
// gets its position in kallsyms order, and livepatch's rules for sympos 0.
func TestSympos(t *testing.T) {
	tb := targetImage(t).Table
	var dup []Symbol
	for _, s := range tb.Symbols() {
		if s.IsText() && s.Sympos == 3 {
			dup = tb.Lookup(Vmlinux, s.Name)
			break
		}
	}
	if len(dup) < 3 {
		t.Fatal("no function name defined three times in vmlinux")
	}
	name := dup[0].Name
	t.Logf("%s occurs %d times", name, len(dup))
	for i, s := range dup {
		if s.Sympos != i+1 || i > 0 && s.Addr <= dup[i-1].Addr {
			t.Errorf("%s #%d: %+v", name, i+1, s)
		}
		got, err := tb.Find(Vmlinux, name, i+1)
		if err != nil || got != s {
			t.Errorf("Find(%s, %d) = %+v, %v", name, i+1, got, err)
		}
		if tb.KlpSympos(s) != i+1 {
			t.Errorf("KlpSympos = %d", tb.KlpSympos(s))
		}
	}
	_, err := tb.Find(Vmlinux, name, 0)
	var se *SymbolError
	if !errors.Is(err, ErrAmbiguous) || !errors.As(err, &se) || se.Count != len(dup) {
		t.Errorf("sympos 0 of a duplicate: %v", err)
	}
	if _, err := tb.Find(Vmlinux, name, len(dup)+1); !errors.Is(err, ErrNotFound) {
		t.Errorf("sympos past the last: %v", err)
	}
	u, err := tb.Find(Vmlinux, "cmdline_proc_show", 0)
	if err != nil || tb.KlpSympos(u) != 0 {
		t.Errorf("a unique name: %+v %v", u, err)
	}
}

func TestModule(t *testing.T) {
	if testutils.InGuest() {
		t.Skip("host only")
	}
	dir := filepath.Join("/lib/modules", testutils.Release)
	ko := filepath.Join(dir, "kernel/drivers/block/loop.ko")
	if _, err := os.Stat(ko); err != nil {
		testutils.Unavailable(t, "modules of %s not installed", testutils.Release)
	}
	m, err := ReadModule(ko)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "loop" {
		t.Errorf("name %q", m.Name)
	}
	b, s, err := m.Bytes("loop_configure", 0)
	if err != nil {
		t.Fatal(err)
	}
	if s.Object != "loop" || !s.IsText() || uint64(len(b)) != s.Size || b[0] != 0xe8 {
		t.Errorf("loop_configure: %+v % x", s, b[:min(len(b), 8)])
	}
	// An exported function is upper case, as /proc/kallsyms shows it.
	if s, err := m.Table.Find("loop", "loop_register_transfer", 0); err == nil && s.Type != 'T' {
		t.Errorf("exported loop_register_transfer has type %c", s.Type)
	}
	if _, err := m.Table.Find("loop", "no_such_function", 0); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing symbol: %v", err)
	}
	// Init code is listed only while the module loads.
	if _, err := m.Table.Find("loop", "loop_init", 0); !errors.Is(err, ErrNotFound) || !m.Shadowed("loop_init") || m.Shadowed("loop_configure") {
		t.Errorf("loop_init: %v, shadowed %v; loop_configure shadowed %v", err, m.Shadowed("loop_init"), m.Shadowed("loop_configure"))
	}
}

// TestFindObject checks rows of the fix corpus's index (which matched the
// objects' function names against the booted kernel): function names from
// each fixed file, and the object the index found for it.
func TestFindObject(t *testing.T) {
	im := targetImage(t)
	dir := filepath.Join("/lib/modules", testutils.Release)
	if _, err := os.Stat(filepath.Join(dir, "kernel")); err != nil {
		testutils.Unavailable(t, "modules of %s not installed", testutils.Release)
	}
	mods := NewModules(dir, nil)
	for _, c := range []struct {
		file  string
		funcs []string
		want  string
	}{
		{"fs/dcache.c", []string{"d_set_mounted"}, "vmlinux"},
		{"kernel/dma/direct.c", []string{"dma_direct_optimal_gfp_mask", "dma_direct_alloc_from_pool", "dma_direct_alloc_no_mapping"}, "vmlinux"},
		{"fs/autofs/root.c", []string{"autofs_catatonic_mode"}, "autofs4"},
		{"net/bluetooth/hci_core.c", []string{"hci_send_acl", "hci_send_iso", "hci_sched_acl"}, "bluetooth"},
		{"net/bridge/br_multicast.c", []string{"br_multicast_find_del_pg", "br_mc_disabled_update", "br_multicast_del_pg", "br_multicast_port_ctx_deinit", "br_multicast_add_port"}, "bridge"},
		{"net/sched/sch_fifo.c", []string{"bfifo_enqueue", "pfifo_enqueue", "__fifo_dump"}, "vmlinux"},
		{"net/tipc/udp_media.c", []string{"tipc_udp_is_mcast_addr", "tipc_udp_is_known_peer", "tipc_udp_rcast_add", "cleanup_bearer"}, "tipc"},
		// The index names the file; the kernel's name has underscores.
		{"net/qrtr/mhi.c", []string{"qcom_mhi_qrtr_probe", "qcom_mhi_qrtr_remove"}, "qrtr_mhi"},
	} {
		loc, err := FindObject(context.Background(), im.Table, mods, c.funcs)
		if err != nil || loc.Object != c.want {
			t.Errorf("%s: %+v, %v; want %s", c.file, loc, err, c.want)
		}
		if c.want != Vmlinux && !strings.HasSuffix(loc.Path, ".ko") {
			t.Errorf("%s: no module path: %+v", c.file, loc)
		}
	}
	if _, err := FindObject(context.Background(), im.Table, mods, []string{"no_such_function_anywhere"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown function: %v", err)
	}
}

func TestParseProc(t *testing.T) {
	in := `0000000000000000 A fixed_percpu_data
ffffffff81000000 T _text
ffffffff81000000 T _stext
ffffffff81000010 t helper
ffffffff81000040 t helper
ffffffff81000080 T last
ffffffffc0002000 t helper	[loop]
ffffffffc0001000 t loop_probe	[loop]
`
	tb, err := ParseProc(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if tb.Len() != 8 || strings.Join(tb.Objects(), ",") != "vmlinux,loop" {
		t.Fatalf("%v", tb)
	}
	h := tb.Lookup(Vmlinux, "helper")
	if len(h) != 2 || h[1].Sympos != 2 || h[0].Size != 0x30 || h[1].Size != 0x40 {
		t.Errorf("helper: %+v", h)
	}
	if s, err := tb.Find("loop", "helper", 0); err != nil || s.Sympos != 1 {
		t.Errorf("module helper: %+v %v", s, err)
	}
	if s, _ := tb.Find("loop", "loop_probe", 0); s.Size != 0x1000 {
		t.Errorf("module symbols are sized by address, not listing order: %+v", s)
	}
	if s, _ := tb.Find(Vmlinux, "_text", 0); s.Size != 0x10 {
		t.Errorf("aliases share the size to the next address: %+v", s)
	}
	for _, bad := range []string{"zz T x\n", "ffff TT x\n", "ffff T x [m\n", "ffff\n"} {
		if _, err := ParseProc(strings.NewReader(bad)); !errors.Is(err, ErrFormat) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestExtractErrors(t *testing.T) {
	hdr := func(payload []byte) []byte {
		img := make([]byte, 0x400)
		img[0x1f1] = 1
		copy(img[0x202:], "HdrS")
		img[0x206], img[0x207] = 0x0f, 0x02
		img = append(img, payload...)
		img = append(img, 0, 0, 0, 0)
		putLE32(img[0x248:], 0)
		putLE32(img[0x24c:], uint32(len(payload)+4))
		return img
	}
	for _, c := range []struct {
		payload []byte
		want    error
		text    string
	}{
		{[]byte("\x28\xb5\x2f\xfdxxxx"), ErrFormat, "zstd"},
		{zstdFrame(t, []byte("not an ELF file")), ErrFormat, "not an ELF"},
		{[]byte("BZh91AY"), ErrUnsupported, "bzip2"},
		{[]byte("nothing"), ErrFormat, "unknown"},
		{[]byte(xzMagic + "\x00\x01garbage"), ErrFormat, "checksum"},
	} {
		_, err := ExtractVmlinux(hdr(c.payload))
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("%q: %v", c.payload, err)
		}
	}
	// A zstd payload (6.12's images) comes out whole.
	elfish := append([]byte(elfMagic), bytes.Repeat([]byte("kernel text "), 1000)...)
	if got, err := ExtractVmlinux(hdr(zstdFrame(t, elfish))); err != nil || !bytes.Equal(got, elfish) {
		t.Errorf("zstd payload: %d bytes, %v; want the %d bytes compressed", len(got), err, len(elfish))
	}
	if _, err := ExtractVmlinux([]byte("MZ")); !errors.Is(err, ErrFormat) {
		t.Errorf("not a bzImage: %v", err)
	}
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// TestBuiltin reads the real kernel's modules.builtin: code that could be
// a module but is built into the image.
func TestBuiltin(t *testing.T) {
	dir := filepath.Join("/lib/modules", testutils.Release)
	if _, err := os.Stat(filepath.Join(dir, "modules.builtin")); err != nil {
		testutils.Unavailable(t, "modules of %s not installed", testutils.Release)
	}
	mods := NewModules(dir, nil)
	ctx := context.Background()
	// The file names kernel/arch/x86/events/amd/amd-uncore.ko.
	if p, ok, err := mods.Builtin(ctx, "amd_uncore"); err != nil || !ok || p != "kernel/arch/x86/events/amd/amd-uncore.ko" {
		t.Errorf("amd_uncore: %q, %v, %v; want built in", p, ok, err)
	}
	if _, ok, err := mods.Builtin(ctx, "binfmt_misc"); err != nil || ok {
		t.Errorf("binfmt_misc (a loadable module): built in %v, %v", ok, err)
	}
	if _, err := mods.Path(ctx, "binfmt_misc"); err != nil {
		t.Error(err)
	}
	// Without the file nothing is built in, and that is no error.
	empty := NewModules(t.TempDir(), nil)
	if err := os.MkdirAll(filepath.Join(empty.dir, "kernel"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := empty.Builtin(ctx, "amd_uncore"); err != nil || ok {
		t.Errorf("no modules.builtin: %v, %v", ok, err)
	}
}

func zstdFrame(t *testing.T, data []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(data, nil)
}
