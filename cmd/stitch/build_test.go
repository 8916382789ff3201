package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
)

func TestManyExitCode(t *testing.T) {
	for _, tt := range []struct {
		codes []int
		want  int
	}{
		{[]int{0}, exitOK},
		{[]int{0, 0, 0}, exitOK},
		{[]int{0, 7}, exitSomeBuilt},
		{[]int{2, 0, 3}, exitSomeBuilt},
		{[]int{7}, exitRefused},
		{[]int{2, 2}, exitUsage},
		{[]int{2, 7}, exitFailed},
		{[]int{3, 3, 7}, exitFailed},
	} {
		if got := manyExitCode(tt.codes); got != tt.want {
			t.Errorf("manyExitCode(%v) = %d, want %d", tt.codes, got, tt.want)
		}
	}
}

// A kernel's error maps to the exit code a one-kernel build would give.
func TestKernelErrorCodes(t *testing.T) {
	port := &kbuild.PortError{Release: "r", Port: &kbuild.Port{Status: kbuild.PortFails, Reason: "x.c #1 FAILED"}}
	for _, tt := range []struct {
		err  error
		want int
	}{
		{fmt.Errorf("%w: fix: %w", build.ErrBadFix, port), exitUsage},
		{fmt.Errorf("%w: no 5.15 variant", build.ErrNoVariant), exitUsage},
		{fmt.Errorf("x: %w", build.ErrRunPre), exitRefused},
		{fmt.Errorf("x: %w", kbuild.ErrNoSource), exitUnsupported},
		{kbuild.ErrNoPatchTool, exitUnsupported},
		{errors.New("kbuild broke"), exitFailed},
	} {
		if got := exitCode(tt.err); got != tt.want {
			t.Errorf("%v: exit %d, want %d", tt.err, got, tt.want)
		}
	}
}

func TestBuildTable(t *testing.T) {
	offset := &kbuild.Port{Status: kbuild.PortOffset, Hunks: []kbuild.Hunk{{File: "fs/namei.c", Number: 1, Offset: -43, Result: kbuild.HunkApplies}}}
	results := []*build.KernelResult{
		{Release: "6.1.0-47-amd64", Outcome: build.OutcomeBuilt, Module: "out/6.1.0-47-amd64/stitch_x.ko", Functions: []string{"vmlinux:f"},
			Ports: []build.FixPort{{Fix: "x.patch", Port: offset}}, Elapsed: 2 * time.Second},
		{Release: "6.1.0-57-amd64", Outcome: build.OutcomeContained, Contained: "out/6.1.0-57-amd64/stitch_x.contained.json",
			Ports: []build.FixPort{{Fix: "x.patch", Port: &kbuild.Port{Status: kbuild.PortContained}}}},
		{Release: "6.1.0-53-amd64", Outcome: build.OutcomeNotPorted, Reason: "x.patch: x.c #1 (@@ -1 +1 @@) FAILED at 1",
			Ports: []build.FixPort{{Fix: "x.patch", Port: &kbuild.Port{Status: kbuild.PortFails}}}},
	}
	var b bytes.Buffer
	printBuildTable(&b, results)
	out := b.String()
	for _, want := range []string{
		"offset (fs/namei.c #1 -43)", "out/6.1.0-47-amd64/stitch_x.ko", "2.0s",
		"already contained", "stitch_x.contained.json",
		"fails", "does-not-apply", "FAILED at 1",
		"3 kernel(s): 1 built, 1 contained, 1 does-not-apply",
		"6.1.0-47-amd64 patches vmlinux:f",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

// stitch build's stream flags: wrong combinations and a bad stream are
// bad input (exit 2), refused before any kernel is opened.
func TestBuildStreamInput(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "stream")
	if err := os.WriteFile(bad, []byte("stream s\n2 add a.patch\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stream := "../../internal/build/testdata/levels/stream"
	var out, errOut bytes.Buffer
	st := &stdio{out: &out, err: &errOut, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, args := range [][]string{
		{"--stream", stream, "x.patch"},
		{"--stream", stream, "--name", "n"},
		{"--level", "2", "x.patch"},
		{"--stream", bad},
		{"--stream", filepath.Join(dir, "missing")},
		{"--stream", stream, "--level", "4"},
	} {
		err := runBuild(context.Background(), st, append([]string{"--cache", dir, "-o", dir}, args...))
		if exitCode(err) != exitUsage {
			t.Errorf("stitch build %q: exit %d (%v), want %d", args, exitCode(err), err, exitUsage)
		}
	}
}
