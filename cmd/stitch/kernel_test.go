package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// stitch kernel's exit codes: bad input 2 (an unknown release naming the
// available ones), a kernel whose exact source is gone 3, with nothing
// written to the cache.
func TestKernelCommandExitCodes(t *testing.T) {
	ctx := context.Background()
	cache := t.TempDir()
	var out, errOut bytes.Buffer
	st := &stdio{out: &out, err: &errOut, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	cmd := func(args ...string) error {
		out.Reset()
		errOut.Reset()
		return runKernel(ctx, st, append(args[:1:1], append([]string{"--cache", cache}, args[1:]...)...))
	}
	for _, args := range [][]string{{"add", "foo"}, {"add", "6.1.0-54-arm64"}, {"rm", "6.1.0-1-amd64"}, {"list", "extra"}} {
		if err := cmd(args...); exitCode(err) != exitUsage {
			t.Errorf("stitch kernel %q: exit %d (%v), want %d", args, exitCode(err), err, exitUsage)
		}
	}
	if err := runKernel(ctx, st, nil); exitCode(err) != exitUsage {
		t.Errorf("no subcommand: exit %d", exitCode(err))
	}
	if _, err := os.Stat("/boot/vmlinuz-" + kernel.Default); err == nil {
		if err := cmd("rm", kernel.Default); exitCode(err) != exitUsage || !errors.Is(err, kernel.ErrSystem) {
			t.Errorf("rm of the system's kernel: exit %d (%v)", exitCode(err), err)
		}
	}

	offers, err := kernel.Archive(ctx)
	if errors.Is(err, kernel.ErrNoLists) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	var named string // an amd64 kernel the archive has with its source
	for _, o := range offers {
		if o.Flavour == "amd64" && o.SourceAvailable {
			named = o.Release
		}
	}
	err = cmd("add", "6.1.0-1-amd64")
	if exitCode(err) != exitUsage || named == "" || !strings.Contains(err.Error(), named) {
		t.Errorf("unknown release: exit %d (%v)", exitCode(err), err)
	}
	for _, o := range offers {
		if !o.SourceAvailable {
			err := cmd("add", o.Release)
			if exitCode(err) != exitUnsupported || !strings.Contains(err.Error(), "no source in the archive") {
				t.Errorf("%s: exit %d (%v), want %d", o.Release, exitCode(err), err, exitUnsupported)
			}
			break
		}
	}
	if ents, _ := os.ReadDir(cache); len(ents) != 0 {
		t.Errorf("refused adds wrote %d entries into the cache", len(ents))
	}
	// list --json: the archive's kernels with their state.
	if err := cmd("list", "--json"); err != nil {
		t.Fatal(err)
	}
	var l struct {
		Ready   []kernel.Profile `json:"ready"`
		Archive []struct {
			Release string `json:"release"`
			State   string `json:"state"`
		} `json:"archive"`
	}
	if err := json.Unmarshal(out.Bytes(), &l); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	states := map[string]int{}
	for _, a := range l.Archive {
		states[a.State]++
	}
	if len(l.Archive) != len(offers) || states["no-source"] == 0 || states["available"]+states["ready"] == 0 {
		t.Errorf("archive states %v of %d", states, len(l.Archive))
	}
}
