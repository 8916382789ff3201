package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/fingerprint"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The mirror's path through the commands: exports imported over each
// other, an older one refused (exit 7) with the mirror unchanged, and the
// root renewed with `stitch keys renew-root`.
func TestRepoMirrorAndRenewRootCommands(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	online, mirror := filepath.Join(dir, "online"), filepath.Join(dir, "mirror")
	var out bytes.Buffer
	st := &stdio{out: &out, err: io.Discard, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	cmd := func(run func(context.Context, *stdio, []string) error, args ...string) error {
		out.Reset()
		return run(ctx, st, args)
	}
	keys := filepath.Join(dir, "online-keys")
	if err := cmd(runRepo, "init", "--dir", online, "--keys", keys); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(online, "keys")); err == nil {
		t.Fatal("--keys ignored: keys in the repository directory")
	}
	publish := func(module string) {
		t.Helper()
		ko := testutils.StandInModule(t, "stitch_fix", "6.1.0-54-amd64", module)
		m := contract.Manifest{Version: contract.ManifestVersion, Name: "stitch_fix", Module: "stitch_fix.ko", ModuleHash: bundle.SHA256Hex(ko),
			Kernel: contract.KernelID{Release: "6.1.0-54-amd64", BuildID: "887cd47f03581c5baf735611814b0308637cd7f2"}, CVEs: []string{"CVE-2026-12345"},
			Objects: []contract.Object{{Name: "vmlinux", Functions: []contract.Function{{Name: "f", Fingerprint: fingerprint.Fingerprint{Size: 8, SHA256: strings.Repeat("ab", 32)}}}}}}
		mj, _ := json.Marshal(m)
		os.WriteFile(filepath.Join(dir, "fix.json"), mj, 0o644)
		os.WriteFile(filepath.Join(dir, "fix.ko"), ko, 0o644)
		if err := cmd(runPublish, "--dir", online, "--keys", keys, "--module", filepath.Join(dir, "fix.ko"), "--manifest", filepath.Join(dir, "fix.json")); err != nil {
			t.Fatal(err)
		}
	}
	publish("one")
	first, second := filepath.Join(dir, "first.tar"), filepath.Join(dir, "second.tar")
	if err := cmd(runRepo, "export", "--dir", online, "--keys", keys, first); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runRepo, "export", "--dir", online, "--valid", "800h", first); exitCode(err) != exitUsage {
		t.Fatalf("--valid 800h: %v (exit %d)", err, exitCode(err))
	}
	if err := cmd(runRepo, "import", "--dir", mirror, first); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "import a newer export before") {
		t.Errorf("import does not say when the next is due: %s", out.String())
	}
	publish("two")
	if err := cmd(runRepo, "export", "--dir", online, "--keys", keys, second); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runRepo, "import", "--dir", mirror, second); err != nil {
		t.Fatalf("a newer export over the mirror: %v", err)
	}
	if err := cmd(runRepo, "list", "--dir", mirror); err != nil || strings.Count(out.String(), "\n") != 2 {
		t.Fatalf("mirror list after the second import: %v %q", err, out.String())
	}
	if err := cmd(runRepo, "import", "--dir", mirror, first); exitCode(err) != exitRefused || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("an older export: %v (exit %d)", err, exitCode(err))
	}
	var s bundle.Status
	if err := cmd(runRepo, "status", "--dir", online, "--json"); err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(out.Bytes(), &s)
	if s.Roles["root"].Version != 1 || !s.ConsistentSnapshot || s.Targets != 2 {
		t.Fatalf("status: %+v", s)
	}
	if err := cmd(runKeys, "renew-root", "--dir", online, "--keys", keys); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runRepo, "status", "--dir", online, "--json"); err != nil {
		t.Fatal(err)
	}
	var after bundle.Status
	json.Unmarshal(out.Bytes(), &after)
	if after.Roles["root"].Version != 2 || !after.Roles["root"].Expires.After(s.Roles["root"].Expires) {
		t.Fatalf("root after renew-root: %+v, before %+v", after.Roles["root"], s.Roles["root"])
	}
	if err := cmd(runKeys, "renew-root", "--dir", online); err == nil || !strings.Contains(err.Error(), "key") {
		t.Fatalf("renew-root without the keys directory: %v", err)
	}
	if err := cmd(runKeys, "renew"); exitCode(err) != exitUsage {
		t.Fatalf("unknown keys subcommand: %v", err)
	}
}
