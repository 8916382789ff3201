package demo

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/build"
	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// TestDemo runs the README's first command end to end on the default
// kernel and every test kernel (testutils.TestKernels: 6.1.0-47, -53...):
// the demo fix built for all of them in one build, then each kernel's own
// VM applying and reverting its own module. The prepared trees in the
// cache are shared with the other tests.
func TestDemo(t *testing.T) {
	testutils.RequireVM(t)
	releases := []string{kernel.Default}
	for _, r := range testutils.TestKernels() {
		if r != kernel.Default {
			releases = append(releases, r)
		}
	}
	testutils.Profiles(t, releases...) // skips (fails in CI) when one is not ready
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	dir := t.TempDir()
	var out strings.Builder
	start := time.Now()
	results, err := Run(ctx, Options{Releases: releases, Stitch: testutils.StitchBinary(t), Dir: dir, Out: &out})
	t.Logf("demo on %d kernel(s) in %.1fs:\n%s", len(releases), time.Since(start).Seconds(), out.String())
	if errors.Is(err, kbuild.ErrNoSource) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != len(releases) {
		t.Fatalf("%d results for %d kernels", len(results), len(releases))
	}
	text := out.String()

	// One build for all: every kernel's build is reported before the
	// first VM boots.
	firstBoot := strings.Index(text, "booting ")
	for i, r := range releases {
		done := fmt.Sprintf("[%d/%d] %s: built", i+1, len(releases), r)
		if at := strings.Index(text, done); at < 0 || at > firstBoot {
			t.Errorf("%q is not reported before the first VM boots", done)
		}
	}

	for i, r := range results {
		rel := releases[i]
		if r.Release != rel || !r.OK() || r.Build == nil || r.Build.Outcome != build.OutcomeBuilt {
			t.Errorf("%s: result %+v", rel, r)
			continue
		}
		// The module in DIR/RELEASE/ is the kernel's own.
		ko := filepath.Join(dir, rel, ModuleName+".ko")
		if r.Build.Module != ko {
			t.Errorf("%s: module %s, want %s", rel, r.Build.Module, ko)
		}
		m, err := kmod.Open(ko)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
		} else if m.Release() != rel || !m.Livepatch {
			t.Errorf("%s: module vermagic %q livepatch %v, want vermagic naming %s and livepatch=Y", rel, m.Vermagic, m.Livepatch, rel)
		}
		// Its VM ran that kernel and saw /proc/cmdline patched, then
		// restored to what it was.
		lines := guestLines(r.Guest)
		if got := lines["running kernel"]; got != rel {
			t.Errorf("%s: the VM ran %q", rel, got)
		}
		before := lines["/proc/cmdline before"]
		if !strings.HasPrefix(before, "console=ttyS0") {
			t.Errorf("%s: /proc/cmdline before: %q", rel, before)
		}
		if got, want := lines["/proc/cmdline patched"], before+" (patched live by stitch)"; got != want {
			t.Errorf("%s: /proc/cmdline patched: %q, want %q", rel, got, want)
		}
		if got := lines["/proc/cmdline restored"]; got != before {
			t.Errorf("%s: /proc/cmdline restored: %q, want %q", rel, got, before)
		}
		if !strings.Contains(r.Guest, "patched and restored without a reboot") {
			t.Errorf("%s: the guest did not finish", rel)
		}
	}

	// The output ends with a summary line per kernel.
	tail := strings.Split(strings.TrimRight(text, "\n"), "\n")
	if len(tail) < len(releases) {
		t.Fatalf("output too short")
	}
	tail = tail[len(tail)-len(releases):]
	for i, rel := range releases {
		if f := strings.Fields(tail[i]); len(f) < 2 || f[0] != rel || !strings.HasPrefix(strings.Join(f[1:], " "), "patched live and restored") {
			t.Errorf("summary line %d: %q, want %s patched live and restored", i+1, tail[i], rel)
		}
	}
}

// guestLines maps the guest's "-- WHAT: VALUE" lines.
func guestLines(s string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(l), "-- "), ":"); ok && strings.HasPrefix(strings.TrimSpace(l), "-- ") {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}
