package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kernel"
)

// TestRunnerFailuresDoNotStopOthers: of three kernels, one is not built
// and one's guest fails; the third still boots, each built kernel boots
// once, in order, after the one build; the error names both failures and
// the output ends with a summary line per kernel.
func TestRunnerFailuresDoNotStopOthers(t *testing.T) {
	profiles := []*kernel.Profile{{Release: "6.1.0-47-amd64"}, {Release: "6.1.0-53-amd64"}, {Release: "6.1.0-54-amd64"}}
	errPort := fmt.Errorf("%w: cmdline.patch: hunk #1 FAILED", build.ErrBadFix)
	var events []string
	var out strings.Builder
	d := &runner{
		out: &out,
		build: func(_ context.Context, ps []*kernel.Profile, progress func(build.KernelStep)) ([]*build.KernelResult, error) {
			events = append(events, fmt.Sprintf("build %d", len(ps)))
			var res []*build.KernelResult
			for i, p := range ps {
				r := &build.KernelResult{Release: p.Release, Outcome: build.OutcomeBuilt, Module: "/out/" + p.Release + "/stitch_demo.ko",
					Functions: []string{"vmlinux:cmdline_proc_show"}, Elapsed: time.Second}
				if i == 0 {
					r = &build.KernelResult{Release: p.Release, Outcome: build.OutcomeNotPorted, Reason: "hunk #1 FAILED", Err: errPort}
				}
				progress(build.KernelStep{Index: i + 1, Total: len(ps), Release: p.Release, Step: build.Step{Name: "kernel", Detail: string(r.Outcome), Done: true}})
				res = append(res, r)
			}
			return res, nil
		},
		boot: func(_ context.Context, p *kernel.Profile, r *Result, out io.Writer) error {
			events = append(events, "boot "+p.Release)
			fmt.Fprintf(out, "-- running kernel: %s\n", p.Release)
			if p.Release == "6.1.0-53-amd64" {
				return errors.New("the guest failed (exit status 1): the patch had no visible effect")
			}
			r.VM, r.Accel = 30*time.Second, "tcg"
			return nil
		},
	}
	results, err := d.run(context.Background(), profiles, "demo")
	if want := "build 3,boot 6.1.0-53-amd64,boot 6.1.0-54-amd64"; strings.Join(events, ",") != want {
		t.Errorf("events %q, want %q", strings.Join(events, ","), want)
	}
	var derr *Error
	if !errors.As(err, &derr) || !errors.Is(err, ErrFailed) || !errors.Is(err, build.ErrBadFix) {
		t.Fatalf("error %v, want an *Error wrapping ErrFailed and the kernel's ErrBadFix", err)
	}
	for _, want := range []string{"on 2 of 3 kernel(s)", "6.1.0-47-amd64 (build: ", "hunk #1 FAILED", "6.1.0-53-amd64 (guest: ", "no visible effect"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "6.1.0-54") {
		t.Errorf("error %q names the kernel that passed", err)
	}
	if len(results) != 3 || results[0].Stage != "build" || results[1].Stage != "guest" || !results[2].OK() {
		t.Fatalf("results %+v %+v %+v", results[0], results[1], results[2])
	}
	if results[1].Guest != "-- running kernel: 6.1.0-53-amd64\n" {
		t.Errorf("guest output kept: %q", results[1].Guest)
	}
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	tail := lines[len(lines)-3:]
	for i, want := range []string{"6.1.0-47-amd64 FAILED at build", "6.1.0-53-amd64 FAILED at guest", "6.1.0-54-amd64 patched live and restored (build 1.0s, VM 30.0s, tcg)"} {
		if got := strings.Join(strings.Fields(tail[i]), " "); !strings.HasPrefix(got, want) {
			t.Errorf("summary line %d: %q, want %q...", i+1, got, want)
		}
	}
}

// TestRunnerInterrupted: a build cut short leaves the kernels it did not
// reach failed, and none of them boots.
func TestRunnerInterrupted(t *testing.T) {
	profiles := []*kernel.Profile{{Release: "6.1.0-47-amd64"}, {Release: "6.1.0-53-amd64"}}
	booted := 0
	d := &runner{
		build: func(context.Context, []*kernel.Profile, func(build.KernelStep)) ([]*build.KernelResult, error) {
			return []*build.KernelResult{{Release: "6.1.0-47-amd64", Outcome: build.OutcomeFailed, Err: context.Canceled}}, context.Canceled
		},
		boot: func(context.Context, *kernel.Profile, *Result, io.Writer) error { booted++; return nil },
	}
	results, err := d.run(context.Background(), profiles, "demo")
	if !errors.Is(err, context.Canceled) || booted != 0 || len(results) != 2 || results[1].Stage != "build" {
		t.Fatalf("err %v, %d booted, results %v", err, booted, results)
	}
}

// TestRunUnknownKernel: a release that is not ready fails before anything
// is built, naming how to get it.
func TestRunUnknownKernel(t *testing.T) {
	cache := t.TempDir()
	releases := []string{"6.1.0-99-amd64"}
	if _, err := kernel.Open(context.Background(), cache, kernel.Default); err == nil {
		releases = []string{kernel.Default, "6.1.0-99-amd64"} // a ready kernel first: it is not built either
	}
	var out strings.Builder
	_, err := Run(context.Background(), Options{Releases: releases, Cache: cache, Out: &out})
	if !errors.Is(err, kernel.ErrUnknown) || !strings.Contains(err.Error(), "stitch kernel add 6.1.0-99-amd64") {
		t.Fatalf("error %v, want kernel.ErrUnknown for 6.1.0-99-amd64", err)
	}
	if out.Len() != 0 {
		t.Errorf("output before the error: %q", out.String())
	}
	if ents, _ := os.ReadDir(cache); len(ents) != 0 {
		t.Errorf("the cache was written: %v", ents)
	}
	if _, err := os.Stat(filepath.Join(cache, "kernel")); !os.IsNotExist(err) {
		t.Errorf("a tree was prepared: %v", err)
	}
}
