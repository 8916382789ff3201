package livepatch_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// TestSecureBoot boots each VM kernel (6.1 and 6.12) with UEFI Secure Boot on, under
// the test's own keys, with the test's module-signing certificate
// enrolled in db (Debian's kernel trusts db keys for modules), and runs
// the TestSecureBootGuest* tests in it: the kernel is locked down, a
// module signed with the enrolled key applies and reverts, and an
// unsigned module, one signed with another key and one whose signature
// no longer matches are refused, each with its reason, changing nothing.
func TestSecureBoot(t *testing.T) {
	testutils.ForEachVMKernel(t, testSecureBoot)
}

func testSecureBoot(t *testing.T, p *kernel.Profile) {
	keyFile, certFile := testutils.ModuleSigningKey(t)
	opts := testutils.SecureBoot(t, p, certFile)
	kos := testutils.BuildModules(t, p, "testdata/modules", "lp_cmdline")

	dir := t.TempDir()
	otherKey, otherCert, err := modsign.NewKey("rsa", "Stitch test other key", time.Now().AddDate(1, 0, 0))
	if err != nil {
		t.Fatal(err)
	}
	otherKeyFile, otherCertFile := filepath.Join(dir, "other.key"), filepath.Join(dir, "other.der")
	if err := modsign.WriteKey(otherKeyFile, otherKey); err != nil {
		t.Fatal(err)
	}
	if err := modsign.WriteCert(otherCertFile, otherCert); err != nil {
		t.Fatal(err)
	}
	signed := testutils.SignModule(t, kos["lp_cmdline"], keyFile, certFile)
	other := testutils.SignModule(t, kos["lp_cmdline"], otherKeyFile, otherCertFile)
	// A signed module changed after signing: one letter of the text it
	// puts in /proc/cmdline, so it still parses as the same module.
	data, err := os.ReadFile(signed)
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(data), "cmdline patched")
	if i < 0 {
		t.Fatal("lp_cmdline.ko lacks its text")
	}
	data[i] ^= 0x20
	tampered := filepath.Join(dir, "tampered.ko")
	if err := os.WriteFile(tampered, data, 0o644); err != nil {
		t.Fatal(err)
	}
	opts.Files = []vm.File{
		{Src: kos["lp_cmdline"], Dst: "/unsigned/lp_cmdline.ko"},
		{Src: signed, Dst: "/signed/lp_cmdline.ko"},
		{Src: other, Dst: "/other/lp_cmdline.ko"},
		{Src: tampered, Dst: "/tampered/lp_cmdline.ko"},
		{Src: certFile, Dst: "/signing.der"},
		{Src: otherCertFile, Dst: "/other.der"},
	}
	testutils.RunGuest(t, "^TestSecureBootGuest", opts)
}

func TestSecureBootGuestPolicy(t *testing.T) {
	testutils.RequireGuest(t)
	var k livepatch.Kernel
	s, err := k.Signing()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("signing: %+v", s)
	if !s.SecureBoot || s.Lockdown != "integrity" || !s.Required() {
		t.Errorf("signing = %+v, want Secure Boot on, lockdown integrity, signatures required", s)
	}
	mine, err := modsign.ReadCert("/signing.der")
	if err != nil {
		t.Fatal(err)
	}
	other, err := modsign.ReadCert("/other.der")
	if err != nil {
		t.Fatal(err)
	}
	// The kernel loaded db's certificates into its platform keyring and
	// names them as KeyDescription does.
	if !s.Trusts(mine) {
		t.Errorf("the kernel does not list the enrolled certificate %q among %q", modsign.KeyDescription(mine), s.Keys)
	}
	if s.Trusts(other) {
		t.Errorf("the kernel trusts the certificate that was never enrolled")
	}
	code, out, _ := stitch(t, 0, "status", "--json")
	var st struct {
		Signing *livepatch.Signing `json:"module_signing"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Signing == nil || !st.Signing.Required() {
		t.Errorf("status --json (exit %d): module_signing = %+v, %v", code, st.Signing, err)
	}
}

func TestSecureBootGuestRefused(t *testing.T) {
	testutils.RequireGuest(t)
	for _, c := range []struct{ dir, reason, says string }{
		{"unsigned", "unsigned", "is not signed"},
		{"other", "untrusted", "Stitch test other key"},
		{"tampered", "corrupt", "cannot verify"},
	} {
		before := snapshot(t)
		code, out, stderr := stitch(t, 0, "apply", "--json", "/"+c.dir+"/lp_cmdline.ko")
		if code != 7 {
			t.Errorf("apply %s: exit %d, want 7 (refused)", c.dir, code)
		}
		var rep struct {
			Error     string                    `json:"error"`
			Signature *livepatch.SignatureError `json:"signature"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Errorf("apply %s --json: %v in %q", c.dir, err, out)
		}
		if rep.Signature == nil || rep.Signature.Reason != c.reason || !strings.Contains(rep.Error+stderr, c.says) {
			t.Errorf("apply %s: signature %+v, error %q; want reason %s, saying %q", c.dir, rep.Signature, rep.Error, c.reason, c.says)
		}
		if after := snapshot(t); after != before {
			t.Errorf("apply %s changed the kernel:\nbefore %s\nafter  %s", c.dir, before, after)
		}
	}
}

func TestSecureBootGuestSigned(t *testing.T) {
	testutils.RequireGuest(t)
	before := cmdline(t)
	if code, _, _ := stitch(t, 0, "apply", "/signed/lp_cmdline.ko"); code != 0 {
		t.Fatalf("apply the signed module: exit %d", code)
	}
	if got := cmdline(t); got != "stitch-test: cmdline patched\n" {
		t.Errorf("/proc/cmdline after apply = %q", got)
	}
	if code, _, _ := stitch(t, 0, "revert", "lp_cmdline"); code != 0 {
		t.Fatalf("revert: exit %d", code)
	}
	if got := cmdline(t); got != before {
		t.Errorf("/proc/cmdline after revert = %q, want %q", got, before)
	}
}
