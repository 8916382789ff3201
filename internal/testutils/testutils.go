// Package testutils holds what Stitch's tests share: finding the real
// kernel, QEMU and headers (skipping without them on a developer machine,
// failing without them in CI), building static binaries and kernel
// modules, and running a package's tests inside a VM.
package testutils

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/stitchpatch/stitch/internal/vm"
)

// The tests' kernels come in two lists, because booting costs CI far
// more than building does (no KVM there: QEMU emulates):
//
//   - TestKernels ($TEST_KERNELS, the Makefile's list, which `make
//     kernels` fetches) are the kernels besides Release that the tests
//     build for: TestDemo builds and boots the demo on each, BuildMany's
//     tests build for several.
//   - VMKernels are the kernels the VM tests of livepatch, build and
//     agent boot, each in its own subtest: Release and one 6.12, whose
//     code generation (IBT, call padding, call thunks) and packaging
//     (.ko.xz modules) differ most from 6.1's. Each is Release or in the
//     Makefile's TEST_KERNELS (TestKernelLists checks), so `make kernels`
//     fetches it.

// Release is the default kernel (kernel.Default): the one the tests that
// need a single real kernel read and boot.
const Release = kernel.Default

// Release612 is the 6.12 kernel of VMKernels.
const Release612 = "6.12.117+deb12-amd64"

// VMKernels are the kernels the VM tests boot: Release, then Release612.
func VMKernels() []string { return []string{Release, Release612} }

// ForEachVMKernel runs fn in a subtest per VMKernels release (named by
// it) with that kernel's profile, one after the other (one VM at a time).
// It skips without QEMU; a subtest skips (fails in CI) when its kernel is
// not in the cache or the system.
func ForEachVMKernel(t *testing.T, fn func(t *testing.T, p *kernel.Profile)) {
	t.Helper()
	requireQEMU(t)
	for _, r := range VMKernels() {
		t.Run(r, func(t *testing.T) { fn(t, Profile(t, r)) })
	}
}

// Unavailable skips the test, or fails it when CI is set: CI must run
// every test, so a missing dependency there is a bug in .ci/run.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") != "" {
		t.Fatalf("%s (CI must install this: see scripts/install-deps.sh)", msg)
	}
	t.Skipf("skipped: %s (run scripts/install-deps.sh as root to enable)", msg)
}

// RequireVM returns the kernel image to boot, or skips/fails when QEMU or
// the kernel is missing.
func RequireVM(t testing.TB) string {
	t.Helper()
	requireQEMU(t)
	return BootImage(t)
}

func requireQEMU(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipped in -short mode: boots a VM")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		Unavailable(t, "qemu-system-x86_64 not installed")
	}
}

// Profile opens the profile of release (kernel.Open, from the default
// cache or the system), or skips the test without it (fails it in CI).
func Profile(t testing.TB, release string) *kernel.Profile {
	t.Helper()
	p, err := kernel.Open(context.Background(), kernel.CacheDir(), release)
	if err != nil {
		Unavailable(t, "kernel %s: %v", release, err)
	}
	return p
}

// Profiles opens the profiles of releases, or skips the test when one is
// missing (fails it in CI, where `make kernels` fetches them).
func Profiles(t testing.TB, releases ...string) []*kernel.Profile {
	t.Helper()
	var out []*kernel.Profile
	var missing []string
	for _, r := range releases {
		p, err := kernel.Open(context.Background(), kernel.CacheDir(), r)
		if err != nil {
			missing = append(missing, err.Error())
			continue
		}
		out = append(out, p)
	}
	if len(missing) > 0 {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s (CI must fetch these kernels: make kernels)", strings.Join(missing, "; "))
		}
		t.Skipf("skipped: %s (run `make kernels` as root to enable)", strings.Join(missing, "; "))
	}
	return out
}

// TestKernels are the kernels `make kernels` fetches for the tests
// besides the installed Release, which the tests build for:
// $TEST_KERNELS, as the Makefile sets it, or the Makefile's default
// (DefaultTestKernels) when a test runs without make.
func TestKernels() []string {
	if s := os.Getenv("TEST_KERNELS"); strings.TrimSpace(s) != "" {
		return strings.Fields(s)
	}
	return DefaultTestKernels()
}

// DefaultTestKernels is the Makefile's default TEST_KERNELS
// (TestKernelLists checks that they agree).
func DefaultTestKernels() []string {
	return []string{"6.1.0-47-amd64", "6.1.0-53-amd64", "6.1.0-57-amd64", Release612}
}

// DefaultProfile is the profile of Release, the kernel the tests boot.
func DefaultProfile(t testing.TB) *kernel.Profile {
	t.Helper()
	return Profile(t, Release)
}

// BootImage is the boot image of Release.
func BootImage(t testing.TB) string {
	t.Helper()
	return DefaultProfile(t).BootImage
}

// RequireHeaders returns the linux-headers tree of Release.
func RequireHeaders(t testing.TB) string {
	t.Helper()
	return DefaultProfile(t).HeadersDir
}

// KallsymsAddr finds a vmlinux symbol's address in the running kernel's
// /proc/kallsyms (in a guest test).
func KallsymsAddr(t testing.TB, name string) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/kallsyms")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && f[2] == name {
			addr, err := strconv.ParseUint(f[0], 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return addr
		}
	}
	t.Fatalf("%s not in /proc/kallsyms", name)
	return 0
}

// InGuest reports whether this process runs inside a stitch VM.
func InGuest() bool { return os.Getenv("STITCH_IN_VM") == "1" }

// RequireGuest skips a test that must run inside the VM (the host side
// starts it there).
func RequireGuest(t testing.TB) {
	t.Helper()
	if !InGuest() {
		t.Skip("runs inside the VM only; started by the host-side test")
	}
}

// RunningRelease is the running kernel's release (uname -r). Guest tests
// compare with it, not with Release: the host boots each of VMKernels.
func RunningRelease(t testing.TB) string {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatalf("uname: %v", err)
	}
	return unix.ByteSliceToString(u.Release[:])
}

// ModuleRoot is the repository's root directory.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(out)) == "" {
		t.Fatalf("find module root: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// StitchBinary builds a static stitch binary for the host and the guest.
func StitchBinary(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "stitch")
	goBuild(t, ModuleRoot(t), "build", "-o", out, "./cmd/stitch")
	return out
}

// TestBinary compiles the calling package's tests into a static binary
// that can run inside the guest.
func TestBinary(t testing.TB) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), filepath.Base(wd)+".test")
	goBuild(t, wd, "test", "-c", "-o", out, ".")
	return out
}

func goBuild(t testing.TB, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// BuildModules copies the kbuild directory src to a temporary directory,
// builds it against the headers of the kernel p, and returns the path of
// each named module's .ko.
func BuildModules(t testing.TB, p *kernel.Profile, src string, names ...string) map[string]string {
	t.Helper()
	headers := p.HeadersDir
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS(src)); err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	kos := map[string]string{}
	for i, name := range names {
		var ko string
		var err error
		if i == 0 {
			// One kbuild run builds every module in the directory.
			ko, err = kbuild.BuildModule(ctx, headers, dir, name, nil)
		} else {
			ko = filepath.Join(dir, name+".ko")
			_, err = os.Stat(ko)
		}
		if err != nil {
			t.Fatalf("build %s: %v", name, err)
		}
		kos[name] = ko
	}
	return kos
}

// RunGuestTests boots the VM with the calling package's test binary and
// the stitch binary, runs the tests matching run inside it, and fails t if
// any of them fail. Each guest output line is logged as it arrives.
func RunGuestTests(t *testing.T, run string, files ...vm.File) *vm.Result {
	t.Helper()
	return RunGuest(t, run, vm.Options{Files: files})
}

// ModulesDir is the test kernel's module directory, as installed by
// scripts/install-deps.sh (DefaultProfile(t).Modules finds it wherever).
const ModulesDir = "/lib/modules/" + Release

// RunGuest is RunGuestTests with more of the VM's options (Files,
// Modules, Load, Memory, and Kernel: Release's if empty); the init,
// command and output are its.
func RunGuest(t *testing.T, run string, opts vm.Options) *vm.Result {
	t.Helper()
	// The default kernel unless the caller boots another (which then
	// need not have the default's profile).
	kernel := opts.Kernel
	if kernel == "" {
		kernel = RequireVM(t)
	} else {
		requireQEMU(t)
	}
	bin := TestBinary(t)
	stitch := StitchBinary(t)
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			t.Log("guest: " + sc.Text())
		}
	}()
	var console strings.Builder
	opts.Kernel, opts.Init = kernel, stitch
	opts.Files = append(opts.Files, vm.File{Src: bin, Dst: "/guest.test"})
	opts.Args = []string{"/guest.test", "-test.v", "-test.count=1", "-test.run", run}
	opts.Output, opts.Console = pw, &console
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Minute
	}
	res, err := vm.Run(context.Background(), opts)
	if errors.Is(err, vm.ErrNoExit) && res.Accel == "tcg" {
		// Emulated guests crash now and then where KVM's do not (CI saw
		// a 6.12 guest die in an interrupt between two tests that change
		// nothing). One more boot tells such a crash from one the tests
		// cause, which comes back; the first is kept in the log.
		t.Logf("VM, first try: %v\nbooting the guest once more", err)
		console.Reset()
		res, err = vm.Run(context.Background(), opts)
	}
	pw.Close()
	<-done
	if err != nil {
		t.Fatalf("VM: %v", err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("guest tests failed (exit %d); kernel console:\n%s", res.ExitCode, console.String())
	}
	if !strings.Contains(res.Output, "--- PASS") {
		t.Fatalf("guest ran no test matching %q", run)
	}
	t.Logf("guest tests passed in a %s VM that ran %.1fs", res.Accel, res.Duration.Seconds())
	return res
}

// KernelCFLAGS are the code-generation flags of an x86-64 kernel build
// that shape the objects Stitch reads (fentry calls and their
// __mcount_loc records, one section per function and object).
var KernelCFLAGS = []string{
	"-O2", "-mcmodel=kernel", "-fno-pic", "-mno-red-zone", "-pg", "-mfentry", "-mrecord-mcount",
	"-ffunction-sections", "-fdata-sections", "-fno-common", "-c",
}

// CompileObject compiles the C file src with KernelCFLAGS (and extra
// flags) and returns the object. It skips the test without gcc.
func CompileObject(t testing.TB, src string, extra ...string) []byte {
	t.Helper()
	cc, err := exec.LookPath("gcc")
	if err != nil {
		Unavailable(t, "gcc not installed")
	}
	out := filepath.Join(t.TempDir(), "out.o")
	args := append(append(append([]string{}, KernelCFLAGS...), extra...), "-o", out, src)
	if b, err := exec.Command(cc, args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %s: %v\n%s", src, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Corpus is the repository's corpus of real 6.1 kernel fixes (corpus/6.1).
func Corpus(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(ModuleRoot(t), "corpus", "6.1")
	if _, err := os.Stat(filepath.Join(dir, "index.tsv")); err != nil {
		Unavailable(t, "the fix corpus: %v", err)
	}
	return dir
}

// StandInModule compiles a stand-in for a livepatch module: an x86-64
// ELF relocatable with the sections and modinfo (name, vermagic for
// release, livepatch=Y) that Stitch reads before loading a module, the
// ballast string (which makes two stand-ins differ), and no code. The
// kernel would refuse it; everything short of the kernel takes it for the
// real thing. It skips the test without gcc.
func StandInModule(t testing.TB, name, release, ballast string) []byte {
	t.Helper()
	return standIn(t, fmt.Sprintf(`name=%s\0vermagic=%s SMP preempt mod_unload modversions \0livepatch=Y`, name, release), ballast)
}

// StandInPlainModule is StandInModule without livepatch=Y: an ordinary
// module, which no livepatch bundle may carry.
func StandInPlainModule(t testing.TB, name, release string) []byte {
	t.Helper()
	return standIn(t, fmt.Sprintf(`name=%s\0vermagic=%s SMP preempt mod_unload modversions `, name, release), "")
}

func standIn(t testing.TB, modinfo, ballast string) []byte {
	cc, err := exec.LookPath("gcc")
	if err != nil {
		Unavailable(t, "gcc not installed")
	}
	dir := t.TempDir()
	src := fmt.Sprintf(`__attribute__((section(".modinfo"), used)) static const char info[] = "%s";
__attribute__((section(".gnu.linkonce.this_module"), used)) static int this_module;
__attribute__((section(".ballast"), used)) static const char ballast[] = %q;
`, modinfo, ballast)
	if err := os.WriteFile(filepath.Join(dir, "m.c"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "m.ko")
	if b, err := exec.Command(cc, "-c", "-o", out, filepath.Join(dir, "m.c")).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// SecureBoot prepares p's kernel to boot with UEFI Secure Boot on under
// the test's own PK, KEK and db, with the certificates db (PEM or DER
// files) enrolled in db as well, and returns VM options that boot it:
// Kernel, Modules and UEFI, with a private copy of the variable store.
// The enrolled store and the signed kernel are kept in the cache for the
// next test with the same inputs, since enrolling costs a boot.
func SecureBoot(t testing.TB, p *kernel.Profile, db ...string) vm.Options {
	t.Helper()
	requireQEMU(t)
	h := sha256.New()
	for _, c := range db {
		data, err := os.ReadFile(c)
		if err != nil {
			t.Fatal(err)
		}
		h.Write(data)
	}
	sb := &vm.SecureBoot{
		Dir:     filepath.Join(kernel.CacheDir(), "secureboot", p.Release, hex.EncodeToString(h.Sum(nil))[:16]),
		Kernel:  p.BootImage,
		Modules: p.Modules,
		DB:      db,
		Init:    StitchBinary(t),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := sb.Prepare(ctx)
	if errors.Is(err, vm.ErrSecureBootTools) {
		Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("secure boot: store and signed kernel ready in %s (%s)", sb.Dir, time.Since(start).Round(time.Second))
	vars := filepath.Join(t.TempDir(), "vars.fd")
	data, err := os.ReadFile(out.UEFI.Vars)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(vars, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return vm.Options{Kernel: out.Kernel, Modules: p.Modules, UEFI: &vm.UEFI{Code: out.UEFI.Code, Vars: vars}}
}

// ModuleSigningKey is the tests' module-signing key and certificate
// (PKCS#8 PEM, DER), made once and kept in the cache, so that the Secure
// Boot variable store that enrolls the certificate is made once too.
func ModuleSigningKey(t testing.TB) (keyFile, certFile string) {
	t.Helper()
	dir := filepath.Join(kernel.CacheDir(), "secureboot", "test-module-signing")
	keyFile, certFile = filepath.Join(dir, "signing.key"), filepath.Join(dir, "signing.der")
	if _, err := os.Stat(certFile); err == nil {
		return keyFile, certFile
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	key, cert, err := modsign.NewKey("rsa", "Stitch test module signing", time.Now().AddDate(10, 0, 0))
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(keyFile)
	if err := modsign.WriteKey(keyFile, key); err != nil {
		t.Fatal(err)
	}
	if err := modsign.WriteCert(certFile, cert); err != nil {
		t.Fatal(err)
	}
	return keyFile, certFile
}

// SignModule writes a copy of the module file src signed with the key
// and certificate files, and returns its path.
func SignModule(t testing.TB, src, keyFile, certFile string) string {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	key, err := modsign.ReadKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := modsign.ReadCert(certFile)
	if err != nil {
		t.Fatal(err)
	}
	signed, err := modsign.Sign(data, key, cert)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), filepath.Base(src))
	if err := os.WriteFile(out, signed, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}
