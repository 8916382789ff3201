package vm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

func TestInitramfsExtractsWithCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		testutils.Unavailable(t, "cpio not installed")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.WriteFile(src, []byte("module bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := vm.NewInitramfs()
	must(t, r.AddFile("/lib/modules/x.ko", src, 0o640))
	must(t, r.AddData("/etc/odd", []byte("abc"), 0o600)) // length not a multiple of 4
	must(t, r.AddSymlink("/init", "/bin/stitch"))
	must(t, r.AddDir("/proc"))
	if err := r.AddData("/etc/odd", nil, 0o600); err == nil {
		t.Error("adding a path twice succeeded")
	}
	if err := r.AddData("/init/x", nil, 0o600); err == nil {
		t.Error("adding a file under a symlink succeeded")
	}
	archive := filepath.Join(dir, "initramfs.cpio")
	f, err := os.Create(archive)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()

	out := filepath.Join(dir, "out")
	must(t, os.Mkdir(out, 0o755))
	in, _ := os.Open(archive)
	defer in.Close()
	cmd := exec.Command("cpio", "-id", "--quiet")
	cmd.Dir, cmd.Stdin = out, in
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id: %v\n%s", err, b)
	}
	check := func(p, want string, perm os.FileMode) {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(out, p))
		if err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", p, b, err, want)
			return
		}
		if fi, _ := os.Stat(filepath.Join(out, p)); fi.Mode().Perm() != perm {
			t.Errorf("%s mode %v, want %v", p, fi.Mode().Perm(), perm)
		}
	}
	check("lib/modules/x.ko", "module bytes", 0o640)
	check("etc/odd", "abc", 0o600)
	if target, err := os.Readlink(filepath.Join(out, "init")); err != nil || target != "/bin/stitch" {
		t.Errorf("init -> %q, %v", target, err)
	}
	if fi, err := os.Stat(filepath.Join(out, "proc")); err != nil || !fi.IsDir() {
		t.Errorf("proc: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestRunRefusesDynamicInit(t *testing.T) {
	_, err := vm.Run(context.Background(), vm.Options{Init: "/bin/ls", Args: []string{"x"}, Kernel: "/bin/ls", QEMU: "true"})
	if !errors.Is(err, vm.ErrSetup) || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("Run with a dynamic init = %v, want a setup error naming CGO_ENABLED=0", err)
	}
}

func TestRunRefusesMissingKernel(t *testing.T) {
	_, err := vm.Run(context.Background(), vm.Options{Kernel: "/nonexistent/vmlinuz", Args: []string{"x"}})
	if !errors.Is(err, vm.ErrSetup) || !strings.Contains(err.Error(), "/nonexistent/vmlinuz") {
		t.Errorf("Run with a missing kernel = %v", err)
	}
}

// TestBoot boots the real kernel and checks what the guest sees and what
// the host gets back: output, exit status, console, user id.
func TestBoot(t *testing.T) {
	kernel := testutils.RequireVM(t)
	stitch := testutils.StitchBinary(t)
	ctx := context.Background()
	extra := filepath.Join(t.TempDir(), "extra.txt")
	must(t, os.WriteFile(extra, []byte("x"), 0o644))

	res, err := vm.Run(ctx, vm.Options{Kernel: kernel, Init: stitch, Args: []string{"stitch", "status", "--json"}})
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Release   string `json:"release"`
		Livepatch bool   `json:"livepatch_supported"`
	}
	// 9: not covered, as no agent is enrolled in the guest.
	if res.ExitCode != 9 || json.Unmarshal([]byte(res.Output), &st) != nil {
		t.Fatalf("status in guest: exit %d, output %q", res.ExitCode, res.Output)
	}
	if st.Release != testutils.Release || !st.Livepatch {
		t.Errorf("guest status = %+v", st)
	}
	if !strings.Contains(res.Console, "Power down") {
		t.Errorf("console lacks the power-off message:\n%s", res.Console)
	}
	t.Logf("boot, status, power-off: %.1fs (%s)", res.Duration.Seconds(), res.Accel)

	// A failing command's status comes back; added files are in the guest;
	// --uid drops root.
	res, err = vm.Run(ctx, vm.Options{
		Kernel: kernel, Init: stitch, UID: 1000,
		Files: []vm.File{{Src: extra, Dst: "/extra.txt"}},
		Args:  []string{"stitch", "apply", "/extra.txt"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 3 || !strings.Contains(res.Output, "not running as root") {
		t.Errorf("apply as uid 1000: exit %d, output %q; want 3, not root", res.ExitCode, res.Output)
	}
}

func TestBootTimeoutKillsQEMU(t *testing.T) {
	kernel := testutils.RequireVM(t)
	stitch := testutils.StitchBinary(t)
	start := time.Now()
	marker := fmt.Sprintf("stitch.test=%d", time.Now().UnixNano())
	_, err := vm.Run(context.Background(), vm.Options{
		Kernel: kernel, Init: stitch, Timeout: 2 * time.Second, Append: marker,
		Args: []string{"stitch", "status"}, // the boot alone takes longer than 2s
	})
	if !errors.Is(err, vm.ErrTimeout) {
		t.Fatalf("Run = %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("timeout of 2s took %s", d)
	}
	out, _ := exec.Command("pgrep", "-f", marker).Output()
	if len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("QEMU still running after Run returned: pids %s", out)
	}
}

// TestBootTimeoutDumpsGuest lets a guest hang past its timeout: the
// error carries what the guest's kernel said when asked, through sysrq
// on the console, for its blocked tasks and its CPUs' backtraces.
func TestBootTimeoutDumpsGuest(t *testing.T) {
	kernel := testutils.RequireVM(t)
	res, err := vm.Run(context.Background(), vm.Options{
		Kernel: kernel, Init: testutils.StitchBinary(t), Timeout: 45 * time.Second,
		Files: []vm.File{{Src: testutils.TestBinary(t), Dst: "/guest.test"}},
		Args:  []string{"/guest.test", "-test.v", "-test.run", "^TestGuestHang$"},
	})
	if !errors.Is(err, vm.ErrTimeout) {
		t.Fatalf("Run = %v, want ErrTimeout", err)
	}
	if !strings.Contains(res.Output, "=== RUN   TestGuestHang") {
		t.Fatalf("the guest did not reach its hang in 45s (output %q); the dump would come from boot", res.Output)
	}
	for _, want := range []string{"Show Blocked State", "Show backtrace of all active CPUs"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the timeout error lacks the kernel's %q:\n%v", want, err)
		}
	}
}

// TestGuestHang never returns: TestBootTimeoutDumpsGuest's guest.
func TestGuestHang(t *testing.T) {
	testutils.RequireGuest(t)
	time.Sleep(time.Hour)
}

// TestBootCrashEndsError crashes a guest's kernel: the error ends with
// the crash's panic line and call trace, where a log cut to its head and
// tail still shows them.
func TestBootCrashEndsError(t *testing.T) {
	kernel := testutils.RequireVM(t)
	_, err := vm.Run(context.Background(), vm.Options{
		Kernel: kernel, Init: testutils.StitchBinary(t), Timeout: 5 * time.Minute,
		Files: []vm.File{{Src: testutils.TestBinary(t), Dst: "/guest.test"}},
		Args:  []string{"/guest.test", "-test.v", "-test.run", "^TestGuestCrash$"},
	})
	if !errors.Is(err, vm.ErrNoExit) {
		t.Fatalf("Run = %v, want ErrNoExit", err)
	}
	msg := err.Error()
	i := strings.LastIndex(msg, "the guest's kernel crashed:")
	if i < 0 {
		t.Fatalf("the error has no crash summary:\n%s", msg)
	}
	summary := msg[i:]
	for _, want := range []string{"Kernel panic - not syncing: sysrq triggered crash", "Call Trace:", "sysrq_handle_crash"} {
		if !strings.Contains(summary, want) {
			t.Errorf("the crash summary lacks %q:\n%s", want, summary)
		}
	}
}

// TestRunGuestRetriesCrash: testutils.RunGuest boots an emulated guest
// whose kernel crashed once more, and passes when the second boot does.
// The guest crashes only on its first boot, which leaves a mark in a
// share.
func TestRunGuestRetriesCrash(t *testing.T) {
	testutils.RequireVM(t)
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		t.Skip("RunGuest retries emulated guests only, and this machine has KVM")
	}
	dir := t.TempDir()
	testutils.RunGuest(t, "^TestGuestCrashOnce$", vm.Options{Modules: testutils.ModulesDir, Shares: []vm.Share{{Host: dir, Guest: "/var/lib/kept"}}})
	if _, err := os.Stat(filepath.Join(dir, "crashed")); err != nil {
		t.Errorf("the guest passed without crashing first: %v", err)
	}
}

// TestGuestCrashOnce crashes the kernel unless the share says it did.
func TestGuestCrashOnce(t *testing.T) {
	testutils.RequireGuest(t)
	mark := "/var/lib/kept/crashed"
	if _, err := os.Stat(mark); err == nil {
		return
	}
	f, err := os.Create(mark)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	unix.Sync()
	TestGuestCrash(t)
}

// TestGuestCrash crashes the kernel: TestBootCrashEndsError's guest.
func TestGuestCrash(t *testing.T) {
	testutils.RequireGuest(t)
	if err := os.WriteFile("/proc/sysrq-trigger", []byte("c"), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Hour)
}

// TestBootWithModules shares the kernel's module directory with the guest:
// a module named in Load is loaded at boot, and the kernel's own
// request_module (mounting a filesystem whose module is not loaded) runs
// the guest's /sbin/modprobe, which resolves the alias "fs-xfs" and the
// soft dependency of libcrc32c on crc32c.
func TestBootWithModules(t *testing.T) {
	testutils.RunGuest(t, "^TestGuestModprobe$", vm.Options{Modules: testutils.ModulesDir, Load: []string{"virtio-net"}})
}

func TestGuestModprobe(t *testing.T) {
	testutils.RequireGuest(t)
	loaded := func(name string) bool {
		b, err := os.ReadFile("/proc/modules")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(b), "\n"+name+" ") || strings.HasPrefix(string(b), name+" ")
	}
	if !loaded("virtio_net") {
		t.Error("virtio_net, asked for with Load, is not loaded")
	}
	if loaded("xfs") {
		t.Fatal("xfs loaded before anything asked for it")
	}
	// The mount fails (no such device), but only after the kernel loaded
	// the filesystem through the module helper.
	err := unix.Mount("/dev/nonexistent", "/tmp", "xfs", unix.MS_RDONLY, "")
	t.Logf("mount xfs: %v", err)
	for _, m := range []string{"xfs", "libcrc32c"} {
		if !loaded(m) {
			t.Errorf("%s not loaded after the kernel asked for fs-xfs", m)
		}
	}
	if !loaded("crc32c_intel") && !loaded("crc32c_generic") {
		t.Error("libcrc32c's soft dependency crc32c not loaded")
	}
}

// TestBootWithNetwork serves HTTP on the host's loopback and has the guest
// fetch it through the one forwarded address, twice (each connection is
// its own forward), and fail to reach the same port at the host's address
// on the user-mode network, which restrict=on closes.
func TestBootWithNetwork(t *testing.T) {
	testutils.RequireVM(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	testutils.RunGuest(t, "^TestGuestNetwork$", vm.Options{
		Modules: testutils.ModulesDir,
		Network: &vm.Network{Forward: []vm.Forward{{Guest: "10.0.2.100:8440", Host: ln.Addr().String()}}},
		Env:     []string{"STITCH_TEST_HOST_PORT=" + port},
	})
}

func TestGuestNetwork(t *testing.T) {
	testutils.RequireGuest(t)
	c := &http.Client{Timeout: 10 * time.Second}
	for _, path := range []string{"/one", "/two"} {
		resp, err := c.Get("http://10.0.2.100:8440" + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "hello "+path {
			t.Errorf("GET %s = %q", path, b)
		}
	}
	// The host's loopback port, straight through the user-mode network's
	// gateway: refused by restrict=on.
	if conn, err := net.DialTimeout("tcp", "10.0.2.2:"+os.Getenv("STITCH_TEST_HOST_PORT"), 3*time.Second); err == nil {
		conn.Close()
		t.Error("the guest reached the host's port past the forward")
	}
}

// TestBootWithShare keeps a file across two boots in a read-write share,
// as a reboot would, and sees a file the host wrote in between.
func TestBootWithShare(t *testing.T) {
	testutils.RequireVM(t)
	dir := filepath.Join(t.TempDir(), "kept,state") // a comma QEMU must not split on
	must(t, os.Mkdir(dir, 0o755))
	share := []vm.Share{{Host: dir, Guest: "/var/lib/kept"}}
	testutils.RunGuest(t, "^TestGuestShare$", vm.Options{Modules: testutils.ModulesDir, Shares: share, Env: []string{"STITCH_TEST_BOOT=1"}})
	b, err := os.ReadFile(filepath.Join(dir, "sub", "boot1"))
	if err != nil || string(b) != "written in boot 1" {
		t.Fatalf("after boot 1 the host reads %q (%v)", b, err)
	}
	must(t, os.WriteFile(filepath.Join(dir, "host"), []byte("written by the host"), 0o644))
	testutils.RunGuest(t, "^TestGuestShare$", vm.Options{Modules: testutils.ModulesDir, Shares: share, Env: []string{"STITCH_TEST_BOOT=2"}})
	if _, err := os.Stat(filepath.Join(dir, "sub", "boot1")); !os.IsNotExist(err) {
		t.Errorf("boot 2 renamed the file away, the host still sees it: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "boot2")); string(b) != "written in boot 1" {
		t.Errorf("after boot 2 the host reads %q", b)
	}
	for _, c := range []struct {
		name    string
		share   vm.Share
		modules string
		want    string
	}{
		{"a relative guest path", vm.Share{Host: dir, Guest: "relative"}, testutils.ModulesDir, "not absolute"},
		{"a missing host directory", vm.Share{Host: filepath.Join(dir, "none"), Guest: "/x"}, testutils.ModulesDir, "not a directory"},
		{"no Modules", vm.Share{Host: dir, Guest: "/x"}, "", "need Modules"},
	} {
		_, err := vm.Run(context.Background(), vm.Options{Kernel: testutils.BootImage(t), Init: testutils.StitchBinary(t), Shares: []vm.Share{c.share}, Modules: c.modules, Args: []string{"true"}})
		if !errors.Is(err, vm.ErrSetup) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Run = %v, want a setup error with %q", c.name, err, c.want)
		}
	}
}

func TestGuestShare(t *testing.T) {
	testutils.RequireGuest(t)
	switch os.Getenv("STITCH_TEST_BOOT") {
	case "1":
		must(t, os.MkdirAll("/var/lib/kept/sub", 0o755))
		f, err := os.Create("/var/lib/kept/sub/boot1")
		must(t, err)
		_, err = f.WriteString("written in boot 1")
		must(t, err)
		must(t, f.Sync())
		must(t, f.Close())
	case "2":
		if b, _ := os.ReadFile("/var/lib/kept/host"); string(b) != "written by the host" {
			t.Errorf("the host's file reads %q", b)
		}
		must(t, os.Rename("/var/lib/kept/sub/boot1", "/var/lib/kept/boot2"))
	default:
		t.Fatal("STITCH_TEST_BOOT unset")
	}
}

// TestBootSecureBoot enrolls the test's own keys in an empty OVMF
// variable store, signs the kernel for them, and boots it with Secure
// Boot on: the guest must see Secure Boot enabled and the kernel locked
// down, which is what makes it refuse unsigned modules.
func TestBootSecureBoot(t *testing.T) {
	opts := testutils.SecureBoot(t, testutils.DefaultProfile(t))
	testutils.RunGuest(t, "^TestGuestSecureBoot$", opts)
}

func TestGuestSecureBoot(t *testing.T) {
	testutils.RequireGuest(t)
	sb, err := os.ReadFile("/sys/firmware/efi/efivars/SecureBoot-" + vm.GUIDGlobalVariable)
	if err != nil {
		t.Fatal(err)
	}
	// Four bytes of attributes, then the value.
	if len(sb) != 5 || sb[4] != 1 {
		t.Errorf("SecureBoot variable = %x, want value 1", sb)
	}
	lockdown, err := os.ReadFile("/sys/kernel/security/lockdown")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(lockdown), "[integrity]") {
		t.Errorf("lockdown = %q, want [integrity]", lockdown)
	}
	t.Logf("SecureBoot=%d, lockdown: %s", sb[len(sb)-1], strings.TrimSpace(string(lockdown)))
}
