package build_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// env is what the host side of the build tests share: a prepared tree
// and the target kernel.
type env struct {
	profile *kernel.Profile
	tree    *kbuild.Tree
	kernel  *build.Kernel
}

func setup(t *testing.T, profile *kernel.Profile) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	tree, err := kbuild.PrepareTree(ctx, kbuild.OptionsFor(profile))
	if errors.Is(err, kbuild.ErrNoSource) {
		testutils.Unavailable(t, "kernel source: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	k, err := build.OpenKernel(ctx, profile, kernel.CacheDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return &env{profile: profile, tree: tree, kernel: k}
}

// build builds testdata/fixes/FIX.patch, or the variant of
// testdata/fixes/FIX/ for the kernel's series.
func (e *env) build(t *testing.T, fix, kcflags string) (*build.Result, error) {
	t.Helper()
	path := filepath.Join("testdata/fixes", fix)
	if _, err := os.Stat(path); err != nil {
		path += ".patch"
	}
	v, err := build.LoadFix(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := v.For(e.profile.Series)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	work := t.TempDir()
	src := &build.TreeSource{Tree: e.tree, HeadersDir: e.profile.HeadersDir, Work: work, KCFLAGS: kcflags}
	start := time.Now()
	res, err := build.Build(ctx, src, e.kernel, []*build.Fix{f}, build.Options{Out: t.TempDir(), Work: work, Name: "stitch_" + fix})
	t.Logf("build %s: %.1fs, err %v", fix, time.Since(start).Seconds(), err)
	return res, err
}

// TestVM builds the test fixes for the real kernel, checks the refusals,
// and applies every module inside the VM (the TestGuest* tests): for each
// kernel of testutils.VMKernels (6.1 and 6.12), with the fixes' variant
// for its series where the source differs.
func TestVM(t *testing.T) {
	testutils.ForEachVMKernel(t, testVM)
}

func testVM(t *testing.T, p *kernel.Profile) {
	e := setup(t, p)
	var files []vm.File
	for _, fix := range []string{"cmdline", "filesystems", "readdir", "binfmt_misc", "taskname"} {
		res, err := e.build(t, fix, "")
		if err != nil {
			t.Fatalf("build %s: %v", fix, err)
		}
		m := res.Manifest
		if m.Kernel.BuildID != e.kernel.BuildID() || len(m.Objects) != 1 || len(m.CVEs) != 1 {
			t.Errorf("%s: manifest %+v", fix, m)
		}
		files = append(files, vm.File{Src: res.Module, Dst: "/" + fix + ".ko"}, vm.File{Src: res.ManifestPath, Dst: "/" + fix + ".json"})
		if fix == "cmdline" {
			files = append(files, tamperedManifests(t, m)...)
		}
	}

	files = append(files, e.buildLevels(t)...)

	// The data a fix changes, which the refusal names, is the series'.
	changedData := map[string]string{"6.1": "enabled", "6.12": "bm_fs_type"}[p.Series]
	refusals := []struct {
		fix, kcflags string
		want         error
		reason       string
	}{
		{"refuse_data", "", build.ErrUnpatchable, changedData},
		{"refuse_init", "", build.ErrUnpatchable, "proc_cmdline_init"},
		{"refuse_layout", "", build.ErrUnpatchable, "getdents_callback64"},
		// Built with other code generation than the kernel's: the
		// pre-fix code is not the running code.
		{"cmdline", kbuild.DiffCFlags + " -fno-omit-frame-pointer", build.ErrRunPre, "cmdline_proc_show"},
	}
	for _, r := range refusals {
		_, err := e.build(t, r.fix, r.kcflags)
		if !errors.Is(err, r.want) || !strings.Contains(err.Error(), r.reason) {
			t.Errorf("build %s (%q): %v; want %v naming %s", r.fix, r.kcflags, err, r.want, r.reason)
		}
	}
	// The guest loads binfmt_misc from the kernel's own modules, shared
	// as on an installed system (6.12's are .ko.xz).
	testutils.RunGuest(t, "^TestGuest", vm.Options{Kernel: p.BootImage, Modules: p.Modules, Files: files})
}

// buildLevels builds every level of testdata/levels/stream, as the
// guest's /levelN.ko.
func (e *env) buildLevels(t *testing.T) []vm.File {
	t.Helper()
	s, err := build.ReadStream("testdata/levels/stream")
	if err != nil {
		t.Fatal(err)
	}
	var files []vm.File
	for n := 1; n <= s.Levels(); n++ {
		vs, level, err := s.Level(n)
		if err != nil {
			t.Fatal(err)
		}
		var fixes []*build.Fix
		for _, v := range vs {
			f, err := v.For(e.profile.Series)
			if err != nil {
				t.Fatal(err)
			}
			fixes = append(fixes, f)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		work := t.TempDir()
		src := &build.TreeSource{Tree: e.tree, HeadersDir: e.profile.HeadersDir, Work: work}
		start := time.Now()
		res, err := build.Build(ctx, src, e.kernel, fixes, build.Options{Out: t.TempDir(), Work: work, Level: level})
		cancel()
		if err != nil {
			t.Fatalf("build level %d: %v", n, err)
		}
		m := res.Manifest
		t.Logf("level %d: %d fixes, %d objects, %.1fs", n, len(m.Fixes), len(m.Objects), time.Since(start).Seconds())
		if !m.Replace || m.Level == nil || m.Level.Number != n || len(m.Fixes) != len(fixes) {
			t.Errorf("level %d: manifest replace %v, level %+v, %d fixes", n, m.Replace, m.Level, len(m.Fixes))
		}
		files = append(files, vm.File{Src: res.Module, Dst: "/level" + strconv.Itoa(n) + ".ko"})
	}
	return files
}

// tamperedManifests writes manifests that do not describe the running
// kernel: another build-id, and another pre-fix code.
func tamperedManifests(t *testing.T, m *contract.Manifest) []vm.File {
	t.Helper()
	dir := t.TempDir()
	var files []vm.File
	for name, mutate := range map[string]func(*contract.Manifest){
		"buildid": func(m *contract.Manifest) { m.Kernel.BuildID = strings.Repeat("0", 40) },
		"code":    func(m *contract.Manifest) { m.Objects[0].Functions[0].Fingerprint.SHA256 = strings.Repeat("0", 64) },
	} {
		c := *m
		c.Objects = []contract.Object{{Name: m.Objects[0].Name, Functions: append([]contract.Function(nil), m.Objects[0].Functions...)}}
		mutate(&c)
		b, err := json.Marshal(&c)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name+".json")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, vm.File{Src: p, Dst: "/tampered-" + name + ".json"})
	}
	return files
}

// TestGuestManifest repeats run-pre matching on the running kernel: the
// manifest's build-id and fingerprints must match what runs.
func TestGuestManifest(t *testing.T) {
	testutils.RequireGuest(t)
	for _, bad := range []string{"buildid", "code"} {
		out, err := exec.Command("stitch", "apply", "--manifest", "/tampered-"+bad+".json", "/cmdline.ko").CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "not built for the running kernel") {
			t.Errorf("apply with a manifest with another %s: %v\n%s", bad, err, out)
		}
	}
	if _, err := os.Stat("/sys/kernel/livepatch/stitch_cmdline"); err == nil {
		t.Fatal("a refused patch was loaded")
	}
	stitch(t, "apply", "--manifest", "/cmdline.json", "/cmdline.ko")
	stitch(t, "revert", "stitch_cmdline")
}

func stitch(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("stitch", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("stitch %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestGuestCmdline(t *testing.T) {
	testutils.RequireGuest(t)
	before := read(t, "/proc/cmdline")
	stitch(t, "apply", "/cmdline.ko")
	if got, want := read(t, "/proc/cmdline"), strings.TrimSuffix(before, "\n")+" stitch-fixed\n"; got != want {
		t.Errorf("patched /proc/cmdline = %q, want %q", got, want)
	}
	stitch(t, "revert", "stitch_cmdline")
	if got := read(t, "/proc/cmdline"); got != before {
		t.Errorf("reverted /proc/cmdline = %q, want %q", got, before)
	}
}

// The new code reads the file's static list and calls its static helper.
func TestGuestFilesystems(t *testing.T) {
	testutils.RequireGuest(t)
	before := read(t, "/proc/filesystems")
	stitch(t, "apply", "/filesystems.ko")
	got := read(t, "/proc/filesystems")
	n := strings.Count(before, "\n")
	if want := before + "stitch\t" + strconv.Itoa(n) + " filesystems, proc registered\n"; got != want {
		t.Errorf("patched /proc/filesystems ends %q, want %d filesystems and proc registered", got[max(len(got)-60, 0):], n)
	}
	stitch(t, "revert", "stitch_filesystems")
	if got := read(t, "/proc/filesystems"); got != before {
		t.Errorf("reverted /proc/filesystems differs")
	}
}

func names(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n []string
	for _, e := range ents {
		n = append(n, e.Name())
	}
	return strings.Join(n, " ")
}

// filldir64 writes to user memory (exception table entries) and, patched,
// warns for one name (a bug table entry): a missing entry would oops.
func TestGuestReaddir(t *testing.T) {
	testutils.RequireGuest(t)
	dir := t.TempDir()
	for _, n := range []string{"a", "stitch-hidden", "stitch-warn"} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	all := "a stitch-hidden stitch-warn"
	if got := names(t, dir); got != all {
		t.Fatalf("before: %q", got)
	}
	kmsg := livepatch.OpenKernelLog()
	defer kmsg.Close()
	stitch(t, "apply", "/readdir.ko")
	if got := names(t, dir); got != "a stitch-warn" {
		t.Errorf("patched: %q, want stitch-hidden hidden", got)
	}
	if log := kmsg.ReadNew(); !strings.Contains(log, "WARNING:") || !strings.Contains(log, "filldir64") {
		t.Errorf("no warning from filldir64 in the kernel log:\n%s", log)
	}
	stitch(t, "revert", "stitch_readdir")
	if got := names(t, dir); got != all {
		t.Errorf("reverted: %q", got)
	}
}

const binfmtDir = "/proc/sys/fs/binfmt_misc"

func loadBinfmt(t *testing.T) {
	t.Helper()
	if err := vm.Modprobe("binfmt_misc"); err != nil {
		t.Fatalf("load binfmt_misc: %v", err)
	}
	if err := unix.Mount("none", binfmtDir, "binfmt_misc", 0, ""); err != nil {
		t.Fatalf("mount binfmt_misc: %v", err)
	}
}

func unloadBinfmt(t *testing.T) {
	t.Helper()
	if err := unix.Unmount(binfmtDir, 0); err != nil {
		t.Errorf("umount: %v", err)
	}
	if err := unix.DeleteModule("binfmt_misc", 0); err != nil {
		t.Errorf("unload binfmt_misc: %v", err)
	}
}

// A patch for a module that is loaded before the patch, and one loaded
// after it: livepatch patches the module when it arrives.
func TestGuestModule(t *testing.T) {
	testutils.RequireGuest(t)
	status := binfmtDir + "/status"

	loadBinfmt(t)
	stitch(t, "apply", "/binfmt_misc.ko")
	if got := read(t, status); got != "enabled (stitch)\n" {
		t.Errorf("loaded before: patched status = %q", got)
	}
	stitch(t, "revert", "stitch_binfmt_misc")
	if got := read(t, status); got != "enabled\n" {
		t.Errorf("loaded before: reverted status = %q", got)
	}
	unloadBinfmt(t)

	stitch(t, "apply", "/binfmt_misc.ko")
	loadBinfmt(t)
	if got := read(t, status); got != "enabled (stitch)\n" {
		t.Errorf("loaded after: patched status = %q", got)
	}
	stitch(t, "revert", "stitch_binfmt_misc")
	if got := read(t, status); got != "enabled\n" {
		t.Errorf("loaded after: reverted status = %q", got)
	}
	unloadBinfmt(t)
}

// proc_task_name is only ever called directly, so on an IBT kernel (6.12)
// objtool lists it in .ibt_endbr_seal and boot turns its ENDBR64 into a
// 4-byte NOP. The patch must still redirect it: ftrace's site is the
// fentry call after that NOP, which becomes a call to the patch's
// trampoline while the patch is on, and a NOP again once reverted.
func TestGuestSealed(t *testing.T) {
	testutils.RequireGuest(t)
	kc, err := (&livepatch.Kernel{}).OpenKcore()
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	addr := testutils.KallsymsAddr(t, "proc_task_name")
	head, err := kc.Read(addr, 9)
	if err != nil {
		t.Fatal(err)
	}
	sealed, nop5 := []byte{0x66, 0x0f, 0x1f, 0x00}, []byte{0x0f, 0x1f, 0x44, 0x00, 0x00}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	ftrace := addr // 6.1: no IBT, the fentry call comes first
	if strings.HasPrefix(unix.ByteSliceToString(uts.Release[:]), "6.12.") {
		if !bytes.Equal(head[:4], sealed) {
			t.Fatalf("proc_task_name starts with % x; want its ENDBR64 sealed (% x)", head[:4], sealed)
		}
		ftrace += 4
	}
	site := func() []byte {
		b, err := kc.Read(ftrace, 5)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if b := site(); !bytes.Equal(b, nop5) {
		t.Fatalf("proc_task_name's fentry site is % x; want ftrace's NOP", b)
	}
	name := func() string {
		for _, l := range strings.Split(read(t, "/proc/self/status"), "\n") {
			if v, ok := strings.CutPrefix(l, "Name:"); ok {
				return strings.TrimSpace(v)
			}
		}
		t.Fatal("no Name: in /proc/self/status")
		return ""
	}
	before := name()
	stitch(t, "apply", "/taskname.ko")
	if got, want := name(), before+" (patched live by stitch)"; got != want {
		t.Errorf("patched Name: %q, want %q", got, want)
	}
	if b := site(); b[0] != 0xe8 {
		t.Errorf("patched proc_task_name's fentry site is % x; want a call (e8) to the patch's trampoline", b)
	}
	stitch(t, "revert", "stitch_taskname")
	if got := name(); got != before {
		t.Errorf("reverted Name: %q, want %q", got, before)
	}
	if b := site(); !bytes.Equal(b, nop5) {
		t.Errorf("reverted proc_task_name's fentry site is % x; want the NOP back", b)
	}
}

// TestGuestLevels moves the kernel through the levels of
// testdata/levels/stream, each a cumulative patch (klp atomic replace):
// level 1 (fix A), level 2 (A and B, which changes the function A
// changes), level 3 (A withdrawn, a fix to binfmt_misc added, the module
// loaded after the level), back to level 2, then reverted. After each
// step every fix's effect is checked from user space, the kernel holds
// exactly the level's patch, and the replaced level's module is gone.
func TestGuestLevels(t *testing.T) {
	testutils.RequireGuest(t)
	meminfo := func() (a, b bool) {
		m := read(t, "/proc/meminfo")
		return strings.Contains(m, "\nMemTotal(A):") || strings.HasPrefix(m, "MemTotal(A):"), strings.Contains(m, "\nCommitted_AS(B):")
	}
	holds := func(step, want string) {
		t.Helper()
		ents, err := os.ReadDir("/sys/kernel/livepatch")
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		if len(names) != 1 || names[0] != want {
			t.Errorf("%s: /sys/kernel/livepatch holds %v, want only %s", step, names, want)
		}
		if enabled := strings.TrimSpace(read(t, "/sys/kernel/livepatch/"+want+"/enabled")); enabled != "1" {
			t.Errorf("%s: %s enabled = %s", step, want, enabled)
		}
	}
	gone := func(step string, modules ...string) {
		t.Helper()
		for _, m := range modules {
			if _, err := os.Stat("/sys/module/" + m); err == nil {
				t.Errorf("%s: module %s is still loaded", step, m)
			}
		}
	}
	check := func(step string, wantA, wantB bool) {
		t.Helper()
		if a, b := meminfo(); a != wantA || b != wantB {
			t.Errorf("%s: /proc/meminfo shows fix A %v, fix B %v; want %v, %v", step, a, b, wantA, wantB)
		}
	}

	stitch(t, "apply", "/level1.ko")
	check("level 1", true, false)
	holds("level 1", "stitch_test_l1")

	stitch(t, "apply", "/level2.ko")
	check("level 2", true, true)
	holds("level 2", "stitch_test_l2")
	gone("level 2", "stitch_test_l1")

	stitch(t, "apply", "/level3.ko")
	check("level 3", false, true)
	holds("level 3", "stitch_test_l3")
	gone("level 3", "stitch_test_l2")
	loadBinfmt(t) // after the level: patched as it arrives
	if got := read(t, binfmtDir+"/status"); got != "enabled (stitch)\n" {
		t.Errorf("level 3: binfmt_misc status = %q, want the fix's", got)
	}

	// Back to level 2: loaded again, it replaces level 3.
	stitch(t, "apply", "/level2.ko")
	check("back to level 2", true, true)
	holds("back to level 2", "stitch_test_l2")
	gone("back to level 2", "stitch_test_l3")
	if got := read(t, binfmtDir+"/status"); got != "enabled\n" {
		t.Errorf("back to level 2: binfmt_misc status = %q, want the original", got)
	}

	stitch(t, "revert", "stitch_test_l2")
	check("reverted", false, false)
	gone("reverted", "stitch_test_l2")
	if ents, _ := os.ReadDir("/sys/kernel/livepatch"); len(ents) != 0 {
		t.Errorf("reverted: /sys/kernel/livepatch still holds %d patches", len(ents))
	}
	unloadBinfmt(t)
}
