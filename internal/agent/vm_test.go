package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// guestServer is where the guest reaches the host's server: QEMU's
// user-mode network, restricted to this one forwarded address.
const guestServer = "http://10.0.2.100:8440"

// vmChecks are the health checks of the VM tests' server, which the guest
// agent learns at its first check-in.
var vmChecks = []time.Duration{3 * time.Second, 5 * time.Second, 7 * time.Second}

// vmPatches are the bundles of the VM tests, built on the host for the
// real kernel the VM boots.
type vmPatches struct {
	demo, badCode, warn contract.Manifest
	demoKo, warnKo      []byte
}

// buildPatches builds the demo fix (internal/demo/fix/cmdline.patch) with
// stitch build's engine, a copy of its manifest whose pre-fix fingerprint
// no longer matches the kernel, and the livepatch package's lp_warn test
// module (it WARNs whenever /proc/cmdline is read) with a manifest made
// from the demo's, since both replace cmdline_proc_show.
func buildPatches(t *testing.T, profile *kernel.Profile) *vmPatches {
	t.Helper()
	root := testutils.ModuleRoot(t)
	ctx := context.Background()
	env, err := build.OpenEnv(ctx, profile, kernel.CacheDir(), nil)
	if errors.Is(err, kbuild.ErrNoSource) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	diff, err := os.ReadFile(filepath.Join(root, "internal/demo/fix/cmdline.patch"))
	if err != nil {
		t.Fatal(err)
	}
	fix, err := build.ParseFix("cmdline.patch", diff)
	if err != nil {
		t.Fatal(err)
	}
	res, err := env.Build(ctx, []*build.Fix{fix}, build.Options{Out: t.TempDir(), Name: "stitch_agent_demo"})
	if err != nil {
		t.Fatal(err)
	}
	p := &vmPatches{demo: *res.Manifest}
	p.demo.CVEs = []string{"CVE-2099-0001"} // a test id: the demo fix fixes none
	if p.demoKo, err = os.ReadFile(res.Module); err != nil {
		t.Fatal(err)
	}
	// The bad-code patch carries lp_warn's module (the demo's is loaded
	// when it comes), under the module's own name.
	p.badCode = p.demo
	p.badCode.Name, p.badCode.Module = "lp_warn", "lp_warn.ko"
	p.badCode.CVEs = []string{"CVE-2099-0002"}
	p.badCode.Objects = []contract.Object{p.demo.Objects[0]}
	p.badCode.Objects[0].Functions = append([]contract.Function(nil), p.demo.Objects[0].Functions...)
	fp := &p.badCode.Objects[0].Functions[0].Fingerprint
	fp.SHA256 = strings.Repeat("0", 64)

	kos := testutils.BuildModules(t, profile, filepath.Join(root, "internal/livepatch/testdata/modules"), "lp_warn")
	if p.warnKo, err = os.ReadFile(kos["lp_warn"]); err != nil {
		t.Fatal(err)
	}
	p.badCode.ModuleHash = ""
	p.warn = p.demo
	p.warn.Name, p.warn.Module, p.warn.ModuleHash = "lp_warn", "lp_warn.ko", ""
	p.warn.CVEs = []string{"CVE-2099-0003"}
	return p
}

// TestAgentInVM runs the agent in each real kernel of
// testutils.VMKernels (6.1 and 6.12) against a server on the host's
// loopback, which the guest reaches only through the one forwarded port.
func TestAgentInVM(t *testing.T) {
	testutils.ForEachVMKernel(t, func(t *testing.T, profile *kernel.Profile) {
		p := buildPatches(t, profile)
		t.Run("rollout", func(t *testing.T) { testRollout(t, profile, p) })
		t.Run("crash-loop", func(t *testing.T) { testCrashLoop(t, profile, p) })
		if profile.Release == testutils.Release {
			t.Run("secure-boot-rollout", func(t *testing.T) { testSecureBootRollout(t, profile, p) })
		}
	})
}

// testSecureBootRollout is testRollout on a machine that boots with UEFI
// Secure Boot on and so loads only signed modules: the repository signs
// every module it publishes with its module-signing key, whose
// certificate the machine's firmware holds in db. The guest checks too
// that status sees the fleet's key trusted.
func testSecureBootRollout(t *testing.T, k *kernel.Profile, p *vmPatches) {
	f := newFleetWith(t, policy(vmChecks...))
	key, err := f.repo.InitSigning(modsign.RSA, "Stitch fleet test", 0)
	if err != nil {
		t.Fatal(err)
	}
	opts := guestOptions(t, k, f)
	sb := testutils.SecureBoot(t, k, key.Cert)
	opts.Kernel, opts.UEFI = sb.Kernel, sb.UEFI
	opts.Env = append(opts.Env, "STITCH_TEST_SECURE_BOOT=1")
	story := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { story <- driveStory(ctx, t, f, p) }()
	testutils.RunGuest(t, "^TestGuestAgent$", opts)
	cancel()
	if err := <-story; err != nil {
		t.Fatal(err)
	}
}

// guestOptions are the VM options of a guest agent of the kernel k
// talking to f.
func guestOptions(t *testing.T, k *kernel.Profile, f *fleet) vm.Options {
	rootFile := filepath.Join(t.TempDir(), "root.json")
	if err := os.WriteFile(rootFile, f.root(), 0o644); err != nil {
		t.Fatal(err)
	}
	return vm.Options{
		Kernel:  k.BootImage,
		Modules: k.Modules,
		Network: &vm.Network{Forward: []vm.Forward{{Guest: strings.TrimPrefix(guestServer, "http://"), Host: f.srv.Listener.Addr().String()}}},
		Files:   []vm.File{{Src: rootFile, Dst: "/root.json"}},
		Env:     []string{"STITCH_ENROLL_KEY=" + f.key()},
		Memory:  1024,
	}
}

// testRollout: the host drives the story through the server as the guest
// agent reports. The demo patch is rolled out, applied and reported
// healthy at every check; then a patch whose pre-fix code does not match
// the running kernel (refused, reported, nothing loaded); then a patch
// that warns once loaded (reverted, reported); then the demo patch is
// blocklisted and the agent reverts it.
func testRollout(t *testing.T, k *kernel.Profile, p *vmPatches) {
	f := newFleetWith(t, policy(vmChecks...))
	story := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { story <- driveStory(ctx, t, f, p) }()
	testutils.RunGuest(t, "^TestGuestAgent$", guestOptions(t, k, f))
	cancel()
	if err := <-story; err != nil {
		t.Fatal(err)
	}
}

// testCrashLoop boots twice with the agent's directory kept on the host.
// In the first boot, with panic_on_warn, the agent applies lp_warn and
// the kernel panics at its first warning, inside the patch's first watch.
// In the second, the boot pass finds the crash marker, does not load the
// patch, and the next pass reports the crash loop to the server.
func testCrashLoop(t *testing.T, k *kernel.Profile, p *vmPatches) {
	f := newFleetWith(t, policy(vmChecks...))
	target := f.publish(p.warn, p.warnKo)
	state := t.TempDir()
	opts := guestOptions(t, k, f)
	opts.Shares = []vm.Share{{Host: state, Guest: "/var/lib/stitch"}}
	opts.Init = testutils.StitchBinary(t)
	opts.Files = append(opts.Files, vm.File{Src: testutils.TestBinary(t), Dst: "/guest.test"})

	var out strings.Builder
	first := opts
	first.Append = "panic_on_warn=1"
	first.Args = []string{"/guest.test", "-test.v", "-test.run", "^TestGuestCrashFirstBoot$"}
	first.Output = &out
	res, err := vm.Run(context.Background(), first)
	t.Logf("first boot: %v\n%s", err, out.String())
	if err == nil && res.ExitCode == 0 {
		t.Fatal("the first boot did not go down")
	}
	if _, err := os.Stat(filepath.Join(state, "loading", "lp_warn")); err != nil {
		t.Fatalf("no crash marker survived the panic: %v", err)
	}

	second := opts
	second.Args = []string{"/guest.test", "-test.v", "-test.run", "^TestGuestCrashSecondBoot$"}
	out.Reset()
	second.Output = &out
	res, err = vm.Run(context.Background(), second)
	t.Logf("second boot:\n%s", out.String())
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("second boot: %v %+v", err, res)
	}
	if r := f.patch(target); r.Failed != 1 {
		t.Errorf("server did not hear of the crash loop: %+v", r)
	}
}

// TestGuestCrashFirstBoot enrolls and runs a pass while reading
// /proc/cmdline, which makes lp_warn warn and, with panic_on_warn, the
// kernel panic. It fails if the kernel survives.
func TestGuestCrashFirstBoot(t *testing.T) {
	testutils.RequireGuest(t)
	if out, err := exec.Command("stitch", "agent", "enroll", "--server", guestServer, "--root", "/root.json", "--dir", "/var/lib/stitch").CombinedOutput(); err != nil {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	go func() {
		for {
			os.ReadFile("/proc/cmdline")
			time.Sleep(200 * time.Millisecond)
		}
	}()
	a := &agent.Agent{Dir: "/var/lib/stitch", Kernel: &livepatch.Kernel{}, Version: "guest-test"}
	err := a.Once(context.Background())
	t.Fatalf("the kernel survived lp_warn with panic_on_warn (pass: %v)", err)
}

// TestGuestCrashSecondBoot: the boot pass must not load lp_warn again.
func TestGuestCrashSecondBoot(t *testing.T) {
	testutils.RequireGuest(t)
	if out, err := exec.Command("stitch", "agent", "--boot", "--dir", "/var/lib/stitch").CombinedOutput(); err != nil {
		t.Fatalf("stitch agent --boot: %v\n%s", err, out)
	}
	if _, err := os.Stat("/sys/kernel/livepatch/lp_warn"); err == nil {
		t.Fatal("lp_warn loaded again after the crash")
	}
	st, err := agent.LoadState("/var/lib/stitch")
	if err != nil || len(st.Patches) != 1 || st.Patches[0].State != contract.StateFailed || st.Patches[0].Reason != contract.ReasonCrashLoop {
		t.Fatalf("state after the crash: %v %+v", err, st)
	}
	t.Logf("lp_warn: %s", st.Patches[0].Detail)
	if out, err := exec.Command("stitch", "agent", "--once", "--dir", "/var/lib/stitch").CombinedOutput(); err != nil {
		t.Fatalf("stitch agent --once: %v\n%s", err, out)
	}
	if _, err := os.Stat("/sys/kernel/livepatch/lp_warn"); err == nil {
		t.Fatal("lp_warn loaded by the next pass")
	}
}

// driveStory publishes each patch once the guest has dealt with the
// previous one, and finally blocklists the demo patch.
func driveStory(ctx context.Context, t *testing.T, f *fleet, p *vmPatches) error {
	wait := func(target, what string, ok func(api.PatchReport) bool) error {
		for ctx.Err() == nil {
			if r := f.patch(target); ok(r) {
				t.Logf("host: %s %s: %+v", target, what, r)
				return nil
			}
			time.Sleep(500 * time.Millisecond)
		}
		return fmt.Errorf("host: %s never %s", target, what)
	}
	demo := f.publish(p.demo, p.demoKo)
	if err := wait(demo, "healthy at every check", func(r api.PatchReport) bool { return r.Healthy == 1 }); err != nil {
		return err
	}
	bad := f.publish(p.badCode, p.warnKo)
	if err := wait(bad, "failed", func(r api.PatchReport) bool { return r.Failed == 1 }); err != nil {
		return err
	}
	warn := f.publish(p.warn, p.warnKo)
	if err := wait(warn, "failed", func(r api.PatchReport) bool { return r.Failed == 1 }); err != nil {
		return err
	}
	f.operate(demo, "blocklist")
	return nil
}

// TestGuestAgent is the guest side of TestAgentInVM: it enrolls with the
// command, then runs the agent's passes until the story is told, reading
// /proc/cmdline all along (which is what makes lp_warn warn).
func TestGuestAgent(t *testing.T) {
	testutils.RequireGuest(t)
	dir := "/var/lib/stitch"
	out, err := exec.Command("stitch", "agent", "enroll", "--server", guestServer, "--root", "/root.json", "--dir", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("stitch agent enroll: %v\n%s", err, out)
	}
	if os.Getenv("STITCH_TEST_SECURE_BOOT") == "1" {
		checkSecureBootTrusted(t, dir, string(out))
	}
	before := readCmdline(t)
	var sawPatched atomic.Bool
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(300 * time.Millisecond):
			}
			if b, err := os.ReadFile("/proc/cmdline"); err == nil && strings.Contains(string(b), "patched live by stitch") {
				sawPatched.Store(true)
			}
		}
	}()

	kl := livepatch.OpenKernelLog()
	defer kl.Close()
	a := &agent.Agent{Dir: dir, Kernel: &livepatch.Kernel{}, Log: kl, Version: "guest-test"}
	done := func() bool {
		st, err := agent.LoadState(dir)
		if err != nil {
			t.Fatal(err)
		}
		// By CVE: the bad-code patch and lp_warn share a module name.
		want := map[string]string{"CVE-2099-0001": contract.StateReverted, "CVE-2099-0002": contract.StateRefused, "CVE-2099-0003": contract.StateFailed}
		for _, p := range st.Patches {
			if len(p.CVEs) == 1 && want[p.CVEs[0]] == p.State {
				delete(want, p.CVEs[0])
			}
		}
		return len(want) == 0
	}
	deadline := time.Now().Add(6 * time.Minute)
	for !done() {
		if time.Now().After(deadline) {
			t.Fatal("the story did not finish in 6 minutes")
		}
		if err := a.Once(context.Background()); err != nil {
			t.Logf("pass: %v", err)
		}
		time.Sleep(time.Second)
	}

	st, _ := agent.LoadState(dir)
	for _, p := range st.Patches {
		t.Logf("%s: %s %s %s", p.Name, p.State, p.Reason, firstLine(p.Detail))
		switch p.CVEs[0] {
		case "CVE-2099-0002":
			if p.Reason != contract.ReasonFingerprintMismatch {
				t.Errorf("bad code patch refused for %q, want %q", p.Reason, contract.ReasonFingerprintMismatch)
			}
		case "CVE-2099-0003":
			if p.Reason != contract.ReasonKernelWarning || !strings.Contains(p.Detail, "[lp_warn]") {
				t.Errorf("lp_warn failed for %q: %s", p.Reason, p.Detail)
			}
		}
	}
	if !sawPatched.Load() {
		t.Error("/proc/cmdline never showed the demo patch")
	}
	if after := readCmdline(t); after != before {
		t.Errorf("/proc/cmdline not restored: %q", after)
	}
	if ents, _ := os.ReadDir("/sys/kernel/livepatch"); len(ents) != 0 {
		t.Errorf("livepatches left loaded: %v", ents)
	}

	// One more pass by the command: nothing to do, and it says so.
	once := exec.Command("stitch", "agent", "--once", "--json", "--dir", dir)
	out, err = once.Output()
	var after struct {
		Agent agent.Status `json:"agent"`
	}
	if err != nil || json.Unmarshal(out, &after) != nil || after.Agent.LastCheckIn.IsZero() || len(after.Agent.Patches) != 3 {
		t.Errorf("stitch agent --once --json: %v\n%s", err, out)
	}

	// stitch status: the failed and refused patches leave the machine
	// not covered (exit 9).
	cmd := exec.Command("stitch", "status", "--json", "--dir", dir)
	out, _ = cmd.Output()
	var rep struct {
		Agent agent.Status `json:"agent"`
	}
	if err := json.Unmarshal(out, &rep); err != nil || cmd.ProcessState.ExitCode() != 9 || rep.Agent.Coverage != agent.NotCovered || rep.Agent.Level != 0 {
		t.Errorf("stitch status: exit %d, %v, %+v", cmd.ProcessState.ExitCode(), err, rep.Agent)
	}
}

// checkSecureBootTrusted: the kernel is locked down under Secure Boot,
// and enrolling found the fleet's certificate trusted (db holds it), so
// it asked the operator for nothing.
func checkSecureBootTrusted(t *testing.T, dir, enrollOut string) {
	t.Helper()
	if strings.Contains(enrollOut, "SECURE BOOT") {
		t.Errorf("enroll asks to enroll a certificate the kernel trusts:\n%s", enrollOut)
	}
	out, _ := exec.Command("stitch", "status", "--json", "--dir", dir).Output()
	var rep struct {
		Signing *livepatch.Signing `json:"module_signing"`
		Agent   agent.Status       `json:"agent"`
	}
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("stitch status --json: %v\n%s", err, out)
	}
	sg := rep.Agent.Signing
	if rep.Signing == nil || !rep.Signing.SecureBoot || !rep.Signing.Required() || sg == nil || !sg.Required || !sg.Trusted || len(sg.Keys) != 1 {
		t.Errorf("status under Secure Boot: kernel %+v, agent %+v", rep.Signing, sg)
	}
	text, _ := exec.Command("stitch", "status", "--dir", dir).Output()
	if !strings.Contains(string(text), "signing key trusted: yes") {
		t.Errorf("stitch status does not say the key is trusted:\n%s", text)
	}
}

func readCmdline(t *testing.T) string {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
