package fingerprint_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

// checksFile is where the guest finds the host's checks.
const checksFile = "/fingerprint-checks.json"

// bootReport is the line the guest prints for the host.
var bootReport = regexp.MustCompile(`BOOTED checked=(\d+) matched=(\d+) sealed=(\d+) endbr=(\d+) ret=(\d+) thunk=(\d+) retpoline_sites=(\d+) indirect=(\d+)`)

// TestVMBooted612 proves the fingerprints of 6.12 objects against the
// running 6.12.117 kernel: the host fingerprints every function of
// ImageObjects (as TestImage612 does), boots the kernel, and the guest
// reads their code through /proc/kcore (VerifyCode). It boots three
// times: as is; with mitigations=off (retpolines become indirect
// branches); and with retbleed=force,stuff spectre_v2=retpoline, which
// keeps the return thunks (call depth tracking's) and retargets calls,
// so that return thunks are seen both kept and rewritten into RET,
// whichever this CPU does by default.
func TestVMBooted612(t *testing.T) {
	testutils.RequireVM(t)
	p := testutils.Profile(t, testutils.Release612)
	res := checkImage(t, testutils.Release612, ImageObjects)
	if t.Failed() {
		t.FailNow()
	}
	data, err := json.Marshal(res.checks)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "checks.json")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, boot := range []string{"", "mitigations=off", "retbleed=force,stuff spectre_v2=retpoline"} {
		out := testutils.RunGuest(t, "^TestGuestBooted612$", vm.Options{
			Kernel: p.BootImage,
			Append: boot,
			Files:  []vm.File{{Src: path, Dst: checksFile}},
		})
		m := bootReport.FindStringSubmatch(out.Output)
		if m == nil {
			t.Fatalf("boot %q: no report from the guest", boot)
		}
		n := func(i int) int { v, _ := strconv.Atoi(m[i]); return v }
		t.Logf("boot %q: %d functions checked through /proc/kcore, %d matched; %d of %d entry ENDBRs sealed; return sites: %d RET, %d thunk; retpoline sites: %d of %d now indirect branches", boot, n(1), n(2), n(3), n(4), n(5), n(6), n(8), n(7))
		if n(1) != len(res.checks) || n(2) != n(1) {
			t.Errorf("boot %q: %d of %d functions matched", boot, n(2), len(res.checks))
		}
		if n(3) == 0 {
			t.Errorf("boot %q: no sealed ENDBR among the functions checked", boot)
		}
		if n(5) > 0 {
			seen["ret"] = true
		}
		if n(6) > 0 {
			seen["thunk"] = true
		}
	}
	if !seen["ret"] || !seen["thunk"] {
		t.Errorf("return sites seen rewritten into RET: %v, kept as the thunk: %v; both must be proven", seen["ret"], seen["thunk"])
	}
}

// TestGuestBooted612 runs in the guest: it matches the running code of
// the host's functions, and counts what the kernel did at the sites.
func TestGuestBooted612(t *testing.T) {
	testutils.RequireGuest(t)
	data, err := os.ReadFile(checksFile)
	if err != nil {
		t.Fatal(err)
	}
	var checks []bootCheck
	if err := json.Unmarshal(data, &checks); err != nil {
		t.Fatal(err)
	}
	var cc []livepatch.CodeCheck
	for _, c := range checks {
		cc = append(cc, c.CodeCheck)
	}
	k := &livepatch.Kernel{}
	results, verr := k.VerifyCode(cc)
	matched := 0
	for _, r := range results {
		if r.Checked && r.Error == "" {
			matched++
		}
	}
	kc, err := k.OpenKcore()
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	var sealed, endbr, ret, thunk, retpolines, indirect int
	for i, c := range checks {
		addr, err := strconv.ParseUint(results[i].Address, 0, 64)
		if err != nil {
			t.Fatalf("%s: address %q", c.Name, results[i].Address)
		}
		for _, s := range c.Sites {
			b, err := kc.Read(addr+uint64(s.Off), s.Len)
			if err != nil {
				t.Fatal(err)
			}
			switch s.Kind {
			case ".ibt_endbr_seal":
				endbr++
				if bytes.Equal(b, []byte{0x66, 0x0f, 0x1f, 0x00}) {
					sealed++
				}
			case ".return_sites":
				switch b[0] {
				case 0xc3:
					ret++
				case 0xe9:
					thunk++
				}
			case ".retpoline_sites":
				retpolines++
				// Still a direct branch to a thunk, or rewritten?
				direct := b[0] == 0xe8 || b[0] == 0xe9 ||
					len(b) > 1 && (b[0] == 0x2e && (b[1] == 0xe8 || b[1] == 0xe9) || b[0] == 0x0f && b[1]&0xf0 == 0x80)
				if !direct {
					indirect++
				}
			}
		}
	}
	for _, v := range []string{"retbleed", "spectre_v2"} {
		b, _ := os.ReadFile("/sys/devices/system/cpu/vulnerabilities/" + v)
		fmt.Printf("%s: %s", v, b)
	}
	fmt.Printf("BOOTED checked=%d matched=%d sealed=%d endbr=%d ret=%d thunk=%d retpoline_sites=%d indirect=%d\n", len(cc), matched, sealed, endbr, ret, thunk, retpolines, indirect)
	if verr != nil {
		t.Fatal(verr)
	}
}
