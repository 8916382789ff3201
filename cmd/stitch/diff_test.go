package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/objdiff"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// diffPair compiles a small before/after pair with kernel-like flags.
func diffPair(t *testing.T) (pre, post string) {
	cc, err := exec.LookPath("gcc-12")
	if err != nil {
		if cc, err = exec.LookPath("gcc"); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatal("no gcc")
			}
			t.Skip("no gcc")
		}
	}
	dir := t.TempDir()
	build := func(name, body string) string {
		src := filepath.Join(dir, name, "f.c")
		os.MkdirAll(filepath.Dir(src), 0o755)
		code := "extern int sink(int);\n" + body +
			"int __attribute__((section(\".init.text\"))) boot(void) { return sink(1); }\n"
		if err := os.WriteFile(src, []byte(code), 0o644); err != nil {
			t.Fatal(err)
		}
		obj := filepath.Join(dir, name, "f.o")
		out, err := exec.Command(cc, "-O2", "-mfentry", "-pg", "-ffunction-sections", "-fdata-sections",
			"-fno-pic", "-mcmodel=kernel", "-c", src, "-o", obj).CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return obj
	}
	return build("pre", "int f(int x) { return sink(x); }\n"),
		build("post", "static __attribute__((noinline)) int g(int x) { return x > 9 ? 9 : x; }\nint f(int x) { return sink(g(x)); }\n")
}

// runDiffArgs runs stitch diff for the test kernel, whose layouts it
// reads from the kernel image (skipping without it).
func runDiffArgs(t *testing.T, args ...string) (string, error) {
	testlayout.Vmlinux(t)
	args = append([]string{"--image", testlayout.Image}, args...)
	var out, errb bytes.Buffer
	st := &stdio{out: &out, err: &errb, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	err := runDiff(t.Context(), st, args)
	return out.String(), err
}

func TestDiffCommand(t *testing.T) {
	pre, post := diffPair(t)
	out, err := runDiffArgs(t, pre, post)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"changed functions (1):\n  f", "new functions (1):\n  g", "all changes can be live-patched"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}

	out, err = runDiffArgs(t, "--json", pre, post)
	if err != nil {
		t.Fatal(err)
	}
	var res objdiff.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(res.Changed) != 1 || res.Changed[0].Name != "f" || len(res.New) != 1 || res.New[0].Name != "g" {
		t.Errorf("json result: %+v", res)
	}
}

func TestDiffBadInput(t *testing.T) {
	notObj := filepath.Join(t.TempDir(), "x.o")
	os.WriteFile(notObj, []byte("text"), 0o644)
	for _, args := range [][]string{{}, {notObj}, {notObj, notObj}, {"/nonexistent.o", "/nonexistent.o"}, {"--image", "/nonexistent", notObj, notObj}} {
		if _, err := runDiffArgs(t, args...); exitCode(err) != exitUsage {
			t.Errorf("stitch diff %q: exit %d (%v), want %d", args, exitCode(err), err, exitUsage)
		}
	}
}

// A kernel whose special-section layouts cannot be read (no BTF: this
// test binary stands in for its vmlinux) is refused with exit 3.
func TestDiffNoLayout(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	_, err = layout.FromVmlinux(exe)
	if !errors.Is(err, layout.ErrNoLayout) || exitCode(err) != exitUnsupported {
		t.Errorf("no BTF: %v, exit %d; want ErrNoLayout, exit %d", err, exitCode(err), exitUnsupported)
	}
}
