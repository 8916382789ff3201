package agent_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// BenchmarkIdleAgent measures the agent daemon in the real kernel: the
// guest enrolls with a server on the host, starts `stitch agent`, lets it
// check in and idle for 30 seconds (polling the kernel every 5), and
// reports its resident memory (VmRSS and the peak, VmHWM) and the CPU
// time it used. The target is under 20 MB resident.
//
//	go test ./internal/agent -run '^$' -bench IdleAgent -benchtime 1x
func BenchmarkIdleAgent(b *testing.B) {
	kernel := testutils.RequireVM(b)
	f := newFleet(b)
	rootFile := filepath.Join(b.TempDir(), "root.json")
	if err := os.WriteFile(rootFile, f.root(), 0o644); err != nil {
		b.Fatal(err)
	}
	var out strings.Builder
	res, err := vm.Run(context.Background(), vm.Options{
		Kernel: kernel, Init: testutils.StitchBinary(b),
		Files:   []vm.File{{Src: rootFile, Dst: "/root.json"}, {Src: testutils.TestBinary(b), Dst: "/guest.test"}},
		Args:    []string{"/guest.test", "-test.v", "-test.run", "^TestGuestIdleAgent$"},
		Env:     []string{"STITCH_ENROLL_KEY=" + f.key()},
		Modules: testutils.ModulesDir,
		Network: &vm.Network{Forward: []vm.Forward{{Guest: strings.TrimPrefix(guestServer, "http://"), Host: f.srv.Listener.Addr().String()}}},
		Output:  &out,
	})
	if err != nil || res.ExitCode != 0 {
		b.Fatalf("guest: %v (exit %v)\n%s", err, res, out.String())
	}
	for range b.N {
	}
	for _, l := range strings.Split(out.String(), "\n") {
		var name string
		var v float64
		if n, _ := fmt.Sscanf(strings.TrimSpace(l), "metric %s %g", &name, &v); n == 2 {
			b.ReportMetric(v, name)
		}
	}
}

// TestGuestIdleAgent is the guest side of BenchmarkIdleAgent.
func TestGuestIdleAgent(t *testing.T) {
	testutils.RequireGuest(t)
	dir := "/var/lib/stitch"
	if out, err := exec.Command("stitch", "agent", "enroll", "--server", guestServer, "--root", "/root.json", "--dir", dir).CombinedOutput(); err != nil {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	cmd := exec.Command("stitch", "agent", "--dir", dir)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	time.Sleep(30 * time.Second)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		k, v, _ := strings.Cut(l, ":")
		if k == "VmRSS" || k == "VmHWM" {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			fmt.Printf("metric %s-MB %.1f\n", k, float64(kb)/1024)
		}
	}
	// utime and stime are fields 14 and 15, in clock ticks (100 a second).
	_, rest, _ := strings.Cut(string(stat), ") ")
	f := strings.Fields(rest)
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	fmt.Printf("metric cpu-ms %d\n", (ut+st)*10)
	if st, err := exec.Command("stitch", "status", "--dir", dir).CombinedOutput(); err == nil || len(st) > 0 {
		t.Logf("status:\n%s", st)
	}
}
