package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// vmLevel is a level of the test stream built for a real kernel.
type vmLevel struct {
	m  contract.Manifest
	ko []byte
}

// buildLevels builds levels 1 to 3 of internal/build/testdata/levels/stream
// with stitch build's engine (what `stitch build --stream FILE --level N`
// runs): level 1 fix A (MemTotal(A) in /proc/meminfo), level 2 A and B
// (Committed_AS(B), in the same function), level 3 B and C (A withdrawn;
// C patches binfmt_misc, a module).
func buildLevels(t *testing.T, profile *kernel.Profile) []vmLevel {
	t.Helper()
	s, err := build.ReadStream(filepath.Join(testutils.ModuleRoot(t), "internal/build/testdata/levels/stream"))
	if err != nil {
		t.Fatal(err)
	}
	var out []vmLevel
	for n := 1; n <= 3; n++ {
		fixes, l, err := s.Level(n)
		if err != nil {
			t.Fatal(err)
		}
		res, err := build.BuildMany(context.Background(), []*kernel.Profile{profile}, fixes, build.ManyOptions{
			Options: build.Options{Out: t.TempDir(), Level: l},
			Cache:   kernel.CacheDir(),
		})
		if err == nil && res[0].Err != nil {
			err = res[0].Err
		}
		if err != nil {
			t.Fatalf("build level %d: %v", n, err)
		}
		m, err := contract.ReadManifest(res[0].Manifest)
		if err != nil {
			t.Fatal(err)
		}
		ko, err := os.ReadFile(res[0].Module)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, vmLevel{m: *m, ko: ko})
	}
	return out
}

// TestAgentLevelsInVM rolls a patch stream's levels out to a real kernel
// through the real server, in two boots sharing the agent's directory.
// First boot: levels 1, 2 and 3 in turn, each checked from user space
// (one Stitch patch enabled, the level before gone, /proc/meminfo and
// binfmt_misc's status as the level's fixes make them). Between the
// boots level 3 is blocklisted. Second boot: `stitch agent --boot`
// (no network) loads level 3 and only it; then `stitch agent --once`
// obeys the revert order by going back to level 2.
func TestAgentLevelsInVM(t *testing.T) {
	testutils.ForEachVMKernel(t, func(t *testing.T, profile *kernel.Profile) {
		testLevelsVM(t, profile, buildLevels(t, profile))
	})
}

func testLevelsVM(t *testing.T, k *kernel.Profile, levels []vmLevel) {
	f := newFleetWith(t, policy(vmChecks...))
	state := t.TempDir()
	opts := guestOptions(t, k, f)
	opts.Shares = []vm.Share{{Host: state, Guest: "/var/lib/stitch"}}
	opts.Init = testutils.StitchBinary(t)
	opts.Files = append(opts.Files, vm.File{Src: testutils.TestBinary(t), Dst: "/guest.test"})

	// The host publishes each level once the guest has applied the one
	// before.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	targets := make([]string, len(levels))
	story := make(chan error, 1)
	go func() {
		for i, l := range levels {
			targets[i] = f.publish(l.m, l.ko)
			for f.patch(targets[i]).Applied != 1 {
				if ctx.Err() != nil {
					story <- fmt.Errorf("level %d never applied", i+1)
					return
				}
				time.Sleep(500 * time.Millisecond)
			}
			t.Logf("host: level %d applied", i+1)
		}
		story <- nil
	}()
	boot := func(name string) {
		t.Helper()
		var out strings.Builder
		o := opts
		o.Args = []string{"/guest.test", "-test.v", "-test.run", "^" + name + "$"}
		o.Output = &out
		start := time.Now()
		res, err := vm.Run(ctx, o)
		t.Logf("%s (%s):\n%s", name, time.Since(start).Round(time.Second), out.String())
		if err != nil || res.ExitCode != 0 || !strings.Contains(out.String(), "--- PASS: "+name) {
			t.Fatalf("%s: %v %+v", name, err, res)
		}
	}
	boot("TestGuestLevelsFirstBoot")
	if err := <-story; err != nil {
		t.Fatal(err)
	}
	f.operate(targets[2], "blocklist")
	boot("TestGuestLevelsSecondBoot")
	if r := f.patch(targets[1]); r.Applied != 1 || r.Failed != 0 {
		t.Errorf("server on level 2 after the fallback: %+v", r)
	}
}

const guestDir = "/var/lib/stitch"

// TestGuestLevelsFirstBoot enrolls and runs the agent's passes until
// level 3 is live, checking each level as it comes.
func TestGuestLevelsFirstBoot(t *testing.T) {
	testutils.RequireGuest(t)
	if out, err := exec.Command("stitch", "agent", "enroll", "--server", guestServer, "--root", "/root.json", "--dir", guestDir).CombinedOutput(); err != nil {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	kl := livepatch.OpenKernelLog()
	defer kl.Close()
	a := &agent.Agent{Dir: guestDir, Kernel: &livepatch.Kernel{}, Log: kl, Version: "guest-test"}
	var seen []int
	binfmt := false
	deadline := time.Now().Add(4 * time.Minute)
	for !slices.Equal(seen, []int{1, 2, 3}) {
		if time.Now().After(deadline) {
			t.Fatalf("levels seen %v in 4 minutes", seen)
		}
		start := time.Now()
		if err := a.Once(context.Background()); err != nil {
			t.Logf("pass: %v", err)
		}
		n := liveLevel(t)
		if n == 0 || len(seen) > 0 && seen[len(seen)-1] == n {
			time.Sleep(time.Second)
			continue
		}
		t.Logf("level %d live (pass of %s)", n, time.Since(start).Round(time.Millisecond))
		seen = append(seen, n)
		if n == 3 {
			// binfmt_misc is loaded after the level that patches it.
			loadBinfmt(t)
			binfmt = true
		}
		checkLevel(t, n, binfmt)
	}
}

// TestGuestLevelsSecondBoot: the boot pass loads level 3 only; the next
// pass gets level 3's revert order and goes back to level 2.
func TestGuestLevelsSecondBoot(t *testing.T) {
	testutils.RequireGuest(t)
	if out, err := exec.Command("stitch", "agent", "--boot", "--dir", guestDir).CombinedOutput(); err != nil {
		t.Fatalf("stitch agent --boot: %v\n%s", err, out)
	}
	if n := liveLevel(t); n != 3 {
		t.Fatalf("live level after the boot pass: %d", n)
	}
	loadBinfmt(t)
	checkLevel(t, 3, true)
	out, err := exec.Command("stitch", "agent", "--once", "--dir", guestDir).CombinedOutput()
	t.Logf("stitch agent --once: %v\n%s", err, out)
	if n := liveLevel(t); n != 2 {
		t.Fatalf("live level after level 3's revert order: %d", n)
	}
	checkLevel(t, 2, true)
	st, err := agent.LoadState(guestDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Patches {
		t.Logf("%s: %s superseded=%v %s", p.Name, p.State, p.Superseded, p.Detail)
		if p.Name == contract.LevelName("stitch_test", 3) && p.State != contract.StateReverted {
			t.Errorf("level 3: %s", p.State)
		}
	}
	cmd := exec.Command("stitch", "status", "--json", "--dir", guestDir)
	out, _ = cmd.Output()
	var rep struct {
		Agent agent.Status `json:"agent"`
	}
	if err := json.Unmarshal(out, &rep); err != nil || cmd.ProcessState.ExitCode() != 0 || rep.Agent.Level != 2 ||
		rep.Agent.LiveLevel == nil || rep.Agent.LiveLevel.Stream != "stitch_test" || len(rep.Agent.LiveLevel.Fixes) != 2 {
		t.Errorf("stitch status --json: exit %d, %v\n%s", cmd.ProcessState.ExitCode(), err, out)
	}
	t.Logf("effective: %s", rep.Agent.Effective)
	text, _ := exec.Command("stitch", "status", "--dir", guestDir).Output()
	t.Logf("stitch status:\n%s", text)
}

// liveLevel is the level the agent's state calls live (0 for none).
func liveLevel(t *testing.T) int {
	t.Helper()
	st, err := agent.LoadState(guestDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Patches {
		if p.Level != nil && p.State == contract.StateApplied {
			return p.Level.Number
		}
	}
	return 0
}

// checkLevel checks from user space that level n, and only it, is in
// force: the one enabled livepatch, no other level's module, and the
// behaviour of each fix (binfmt_misc's when it is loaded).
func checkLevel(t *testing.T, n int, binfmt bool) {
	t.Helper()
	want := contract.LevelName("stitch_test", n)
	ents, err := os.ReadDir("/sys/kernel/livepatch")
	if err != nil {
		t.Fatal(err)
	}
	var patches []string
	for _, e := range ents {
		patches = append(patches, e.Name())
	}
	if !slices.Equal(patches, []string{want}) {
		t.Errorf("level %d: /sys/kernel/livepatch holds %v", n, patches)
	}
	if b, err := os.ReadFile("/sys/kernel/livepatch/" + want + "/enabled"); err != nil || strings.TrimSpace(string(b)) != "1" {
		t.Errorf("level %d: enabled %q %v", n, b, err)
	}
	for i := 1; i <= 3; i++ {
		_, err := os.Stat("/sys/module/" + contract.LevelName("stitch_test", i))
		if loaded := err == nil; loaded != (i == n) {
			t.Errorf("level %d: module of level %d loaded: %v", n, i, loaded)
		}
	}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	mem := string(b)
	a, bb := strings.Contains(mem, "MemTotal(A):"), strings.Contains(mem, "Committed_AS(B):")
	if a != (n < 3) || bb != (n >= 2) || !strings.Contains(mem, "MemFree:") {
		t.Errorf("level %d: /proc/meminfo has fix A %v, fix B %v:\n%s", n, a, bb, firstLines(mem, 3))
	}
	if binfmt {
		b, err := os.ReadFile(binfmtDir + "/status")
		got := strings.TrimSpace(string(b))
		if wantStatus := map[bool]string{true: "enabled (stitch)", false: "enabled"}[n == 3]; err != nil || got != wantStatus {
			t.Errorf("level %d: binfmt_misc status %q (%v), want %q", n, got, err, wantStatus)
		}
	}
	t.Logf("level %d checked: %v, meminfo A=%v B=%v", n, patches, a, bb)
}

const binfmtDir = "/proc/sys/fs/binfmt_misc"

func loadBinfmt(t *testing.T) {
	t.Helper()
	if err := vm.Modprobe("binfmt_misc"); err != nil {
		t.Fatalf("load binfmt_misc: %v", err)
	}
	if err := unix.Mount("none", binfmtDir, "binfmt_misc", 0, ""); err != nil && err != unix.EBUSY {
		t.Fatalf("mount binfmt_misc: %v", err)
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}
