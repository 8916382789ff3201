package kallsyms

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
	"golang.org/x/sys/unix"
)

// digestChunk is how many lines each partial digest covers, so that a
// mismatch is located without sending 8 MB over the emulated serial port.
const digestChunk = 4096

// digest prints the count and sha256 of the vmlinux lines ("addr type
// name"), per chunk and in total, and every 1000th line in full.
func digest(tb *Table) []string {
	var out []string
	total, chunk := sha256.New(), sha256.New()
	n := 0
	for _, s := range tb.Symbols() {
		if s.Object != Vmlinux {
			continue
		}
		line := s.Line() + "\n"
		total.Write([]byte(line))
		chunk.Write([]byte(line))
		if n%1000 == 0 {
			out = append(out, "sample "+strconv.Itoa(n)+" "+s.Line())
		}
		n++
		if n%digestChunk == 0 {
			out = append(out, fmt.Sprintf("chunk %d %s", n/digestChunk-1, hex.EncodeToString(chunk.Sum(nil))))
			chunk.Reset()
		}
	}
	out = append(out, fmt.Sprintf("chunk %d %s", n/digestChunk, hex.EncodeToString(chunk.Sum(nil))))
	return append(out, fmt.Sprintf("total %d %s", n, hex.EncodeToString(total.Sum(nil))))
}

// TestVMProcKallsyms boots the target kernel with nokaslr, where
// /proc/kallsyms shows link addresses, and compares every vmlinux symbol
// the guest lists (address, type, name, order) with the table decoded
// from the boot image.
func TestVMProcKallsyms(t *testing.T) {
	kernel := testutils.RequireVM(t)
	im := targetImage(t)
	bin := testutils.TestBinary(t)
	var files []vm.File
	for _, ko := range guestModules {
		files = append(files, vm.File{Src: filepath.Join(modDir, ko), Dst: "/" + filepath.Base(ko)})
	}
	var console strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := vm.Run(ctx, vm.Options{
		Kernel:  kernel,
		Init:    bin, // this test binary, as /init, starts itself again
		Args:    []string{"/bin/stitch", "-test.run=^TestGuest", "-test.v", "-test.count=1"},
		Files:   files,
		Append:  "nokaslr",
		Console: &console,
		Timeout: 5 * time.Minute,
	})
	if err != nil {
		t.Fatalf("VM: %v", err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("guest exit %d:\n%s\nconsole:\n%s", res.ExitCode, res.Output, console.String())
	}
	t.Logf("VM (%s) ran %.1fs", res.Accel, res.Duration.Seconds())
	var guest []string
	guestMods := map[string][]string{}
	sc := bufio.NewScanner(strings.NewReader(res.Output))
	for sc.Scan() {
		if _, line, ok := strings.Cut(sc.Text(), "KMOD "); ok {
			obj, sym, _ := strings.Cut(strings.TrimSpace(line), " ")
			guestMods[obj] = append(guestMods[obj], sym)
		} else if _, line, ok := strings.Cut(sc.Text(), "KSYMS "); ok {
			guest = append(guest, strings.TrimSpace(line))
		} else if strings.Contains(sc.Text(), "parsed") {
			t.Log("guest: " + strings.TrimSpace(sc.Text()))
		}
	}
	host := digest(im.Table)
	if len(guest) == 0 {
		t.Fatalf("guest printed no digest:\n%s", res.Output)
	}
	t.Logf("guest: %s; host: %s", guest[len(guest)-1], host[len(host)-1])
	checkModules(t, guestMods)
	mismatches := 0
	for i := 0; i < max(len(guest), len(host)); i++ {
		var g, h string
		if i < len(guest) {
			g = guest[i]
		}
		if i < len(host) {
			h = host[i]
		}
		if g != h {
			mismatches++
			if mismatches <= 10 {
				t.Errorf("guest %q\n      host  %q", g, h)
			}
		}
	}
}

// TestGuestProcKallsyms runs inside the VM: it reads /proc/kallsyms with
// ParseProc and prints the digest of its vmlinux symbols.
func TestGuestProcKallsyms(t *testing.T) {
	testutils.RequireGuest(t)
	f, err := os.Open("/proc/kallsyms")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	tb, err := ParseProc(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("parsed %d symbols in %v", tb.Len(), time.Since(start))
	for _, l := range digest(tb) {
		fmt.Println("KSYMS " + l)
	}
}

// The modules the VM test loads: no dependencies, no hardware needed;
// efs and qnx4 have local names defined twice (sympos 1 and 2), and
// crc-itu-t exports a function and an object.
var guestModules = []string{"drivers/block/loop.ko", "fs/efs/efs.ko", "fs/qnx4/qnx4.ko", "lib/crc-itu-t.ko"}

var modDir = filepath.Join("/lib/modules", testutils.Release, "kernel")

// checkModules compares the loaded modules' symbols, as the guest's
// /proc/kallsyms lists them ("type name", in order, so sympos too), with
// what ReadModule reads from the same .ko files.
func checkModules(t *testing.T, guest map[string][]string) {
	t.Helper()
	for _, ko := range guestModules {
		m, err := ReadModule(filepath.Join(modDir, ko))
		if err != nil {
			t.Fatal(err)
		}
		var host []string
		for _, s := range m.Table.Symbols() {
			host = append(host, string(s.Type)+" "+s.Name)
		}
		g := guest[m.Name]
		if strings.Join(g, "\n") != strings.Join(host, "\n") {
			t.Errorf("module %s: guest lists %d symbols, ReadModule %d", m.Name, len(g), len(host))
			for i := range max(len(g), len(host)) {
				var a, b string
				if i < len(g) {
					a = g[i]
				}
				if i < len(host) {
					b = host[i]
				}
				if a != b {
					t.Logf("  #%d guest %q host %q", i, a, b)
				}
			}
			continue
		}
		t.Logf("module %s: %d symbols match /proc/kallsyms", m.Name, len(host))
	}
}

// TestGuestModuleKallsyms runs inside the VM: it loads the modules and
// prints their /proc/kallsyms entries.
func TestGuestModuleKallsyms(t *testing.T) {
	testutils.RequireGuest(t)
	for _, ko := range guestModules {
		f, err := os.Open("/" + filepath.Base(ko))
		if err != nil {
			t.Fatal(err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil {
			t.Fatalf("load %s: %v", ko, err)
		}
	}
	f, err := os.Open("/proc/kallsyms")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tb, err := ParseProc(f)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range tb.Symbols() {
		if s.Object != Vmlinux {
			fmt.Printf("KMOD %s %c %s\n", s.Object, s.Type, s.Name)
		}
	}
}
