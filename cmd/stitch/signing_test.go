package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/stitchpatch/stitch/internal/testutils/buildout"
)

// The operator's path through module signing: a key for the repository,
// an output tree and a single module published signed, a rotation with
// both certificates published, and the old key retired.
func TestKeysSigning(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	var out, errOut bytes.Buffer
	st := &stdio{out: &out, err: &errOut, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	cmd := func(run func(context.Context, *stdio, []string) error, args ...string) error {
		out.Reset()
		errOut.Reset()
		return run(ctx, st, args)
	}
	if err := cmd(runRepo, "init", "--dir", repoDir); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runKeys, "signing", "list", "--dir", repoDir); err != nil || !strings.Contains(out.String(), "no module-signing key") {
		t.Fatalf("list without a key: %v %s", err, out.String())
	}
	if err := cmd(runKeys, "signing", "init", "--dir", repoDir, "--algorithm", "dsa"); exitCode(err) != exitUsage {
		t.Fatalf("--algorithm dsa: %v", err)
	}
	if err := cmd(runKeys, "signing", "init", "--dir", repoDir, "--subject", "Example fleet signing", "--json"); err != nil {
		t.Fatal(err)
	}
	var first bundle.SigningKey
	if err := json.Unmarshal(out.Bytes(), &first); err != nil || !first.Current || first.Description != "Example fleet signing: "+first.KeyID {
		t.Fatalf("init: %v %s", err, out.String())
	}
	if err := cmd(runKeys, "signing", "init", "--dir", repoDir); exitCode(err) != exitUsage || !strings.Contains(err.Error(), "rotate") {
		t.Fatalf("second init: %v (exit %d)", err, exitCode(err))
	}
	cert, err := modsign.ReadCert(first.Cert)
	if err != nil {
		t.Fatal(err)
	}

	// A build's tree: every module published signed.
	fix := buildout.Fix{Name: "stitch_cmdline", CVEs: []string{"CVE-2026-1111"}}
	k47 := buildout.Kernel{Release: "6.1.0-47-amd64", BuildID: "4747474747474747474747474747474747474747"}
	k53 := buildout.Kernel{Release: "6.1.0-53-amd64", BuildID: "5353535353535353535353535353535353535353"}
	tree := buildout.Write(t, filepath.Join(dir, "OUT"), fix, k47, k53)
	if err := cmd(runPublish, "--dir", repoDir, "--json", tree); err != nil {
		t.Fatal(err)
	}
	var pub struct{ Published []bundle.Published }
	if err := json.Unmarshal(out.Bytes(), &pub); err != nil || len(pub.Published) != 2 {
		t.Fatalf("publish OUT/: %v %s", err, out.String())
	}
	r := &bundle.Repo{Dir: repoDir}
	for _, p := range pub.Published {
		b, err := r.Open(p.Target)
		if err != nil {
			t.Fatal(err)
		}
		if c, err := modsign.Verify(b.Module, []*x509.Certificate{cert}); err != nil || c != cert || p.Signer != first.KeyID {
			t.Fatalf("%s: %v (signer %q)", p.Target, err, p.Signer)
		}
	}
	// --module and --manifest: the same module again, the same target.
	ko, js := filepath.Join(tree, k47.Release, "stitch_cmdline.ko"), filepath.Join(tree, k47.Release, "stitch_cmdline.json")
	if err := cmd(runPublish, "--dir", repoDir, "--json", "--module", ko, "--manifest", js); err != nil {
		t.Fatal(err)
	}
	var one map[string]string
	if err := json.Unmarshal(out.Bytes(), &one); err != nil || one["target"] != pub.Published[0].Target || one["signer"] != first.KeyID || one["sha256"] != pub.Published[0].SHA256 {
		t.Fatalf("publish --module: %v %v, want %+v", err, one, pub.Published[0])
	}

	// Rotation: the new certificate is published, the old key signs on.
	if err := cmd(runKeys, "signing", "rotate", "--dir", repoDir, "--algorithm", "ecdsa", "--json"); err != nil {
		t.Fatal(err)
	}
	var second bundle.SigningKey
	if err := json.Unmarshal(out.Bytes(), &second); err != nil || second.Current || second.Target == "" {
		t.Fatalf("rotate: %v %s", err, out.String())
	}
	if !strings.Contains(errOut.String(), "6.1") {
		t.Errorf("no warning that Debian 6.1 cannot verify ECDSA: %q", errOut.String())
	}
	if err := cmd(runKeys, "signing", "list", "--dir", repoDir); err != nil {
		t.Fatal(err)
	}
	if lines := strings.Split(strings.TrimSpace(out.String()), "\n"); len(lines) != 3 || !strings.Contains(lines[1], first.KeyID) || !strings.Contains(lines[1], "yes") {
		t.Fatalf("list after rotate:\n%s", out.String())
	}
	if err := cmd(runKeys, "signing", "use", second.KeyID, "--dir", repoDir); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runKeys, "signing", "retire", first.KeyID, "--dir", repoDir); err == nil || !strings.Contains(err.Error(), "publish them again") {
		t.Fatalf("retire with bundles signed by it: %v", err)
	}
	if err := cmd(runKeys, "signing", "retire", first.KeyID, "--dir", repoDir, "--force", "--json"); err != nil {
		t.Fatal(err)
	}
	if err := cmd(runKeys, "signing", "list", "--dir", repoDir, "--json"); err != nil {
		t.Fatal(err)
	}
	var list struct{ Keys []bundle.SigningKey }
	if err := json.Unmarshal(out.Bytes(), &list); err != nil || len(list.Keys) != 2 || list.Keys[0].KeyID != second.KeyID || list.Keys[1].Target != "" {
		t.Fatalf("list after retire: %v %s", err, out.String())
	}
	// The private keys stay private.
	for _, k := range []string{first.KeyID, second.KeyID} {
		fi, err := os.Stat(filepath.Join(repoDir, "keys", "module-signing", k+".key"))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("key %s: %v", k, err)
		}
	}
}
