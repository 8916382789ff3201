package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/server/api"
)

// TestAgentCommandInput checks the agent commands' answers to bad input
// and their exit codes; the agent itself is tested in internal/agent.
func TestAgentCommandInput(t *testing.T) {
	dir := t.TempDir()
	run := func(args ...string) (string, int) {
		var out, errs strings.Builder
		st := &stdio{in: strings.NewReader(""), out: &out, err: &errs, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		err := runAgent(context.Background(), st, args)
		if err != nil {
			errs.WriteString(err.Error())
			return out.String() + errs.String(), exitCode(err)
		}
		return out.String() + errs.String(), 0
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"bogus"}, exitUsage, "unknown subcommand"},
		{[]string{"--once", "--boot", "--dir", dir}, exitUsage, "not both"},
		{[]string{"--once", "--dir", dir}, exitUsage, "stitch agent enroll"},
		{[]string{"enroll", "--server", "http://127.0.0.1:1", "--dir", dir}, exitUsage, "--root is required"},
		{[]string{"enroll", "--server", "http://127.0.0.1:1", "--key", "k", "--root", filepath.Join(dir, "missing.json"), "--dir", dir}, exitUsage, "missing.json"},
		{[]string{"disable", "--dir", dir}, exitOK, "patch loading disabled"},
	} {
		out, code := run(c.args...)
		if code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("stitch agent %s: exit %d, want %d; output %q lacks %q", strings.Join(c.args, " "), code, c.code, out, c.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "off")); err != nil {
		t.Errorf("disable left no off file: %v", err)
	}
	if out, code := run("enable", "--dir", dir); code != 0 || !strings.Contains(out, "enabled") {
		t.Errorf("enable: %d %q", code, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "off")); err == nil {
		t.Error("enable left the off file")
	}
}

func TestVersionIsAcceptedByTheServer(t *testing.T) {
	ci := api.CheckIn{KernelRelease: "6.1.0-54-amd64", KernelBuildID: strings.Repeat("ab", 20), AgentVersion: version(), Patches: []api.PatchState{}}
	if err := ci.Validate(); err != nil {
		t.Errorf("version %q: %v", version(), err)
	}
}

// The outcomes of a transition each have their exit code; a failed
// rollback wraps the stall or trouble it could not undo, and must not be
// taken for it (5 says the kernel is as it was).
func TestTransitionExitCodes(t *testing.T) {
	stall := &livepatch.TransitionError{Patch: "p", Enabling: true}
	trouble := &livepatch.TroubleError{Patch: "p"}
	for _, c := range []struct {
		err  error
		code int
	}{
		{&livepatch.TransitionError{Patch: "p", Enabling: true, RolledBack: true}, exitRolledBack},
		{&livepatch.TroubleError{Patch: "p", RolledBack: true}, exitTrouble},
		{&livepatch.RollbackError{Patch: "p", Cause: stall, Err: &livepatch.TransitionError{Patch: "p"}}, exitRollbackFailed},
		{fmt.Errorf("apply: %w", &livepatch.RollbackError{Patch: "p", Cause: trouble, Err: errors.New("unload p: busy")}), exitRollbackFailed},
	} {
		if got := exitCode(c.err); got != c.code {
			t.Errorf("%v: exit %d, want %d", c.err, got, c.code)
		}
	}
}
