package agent_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/server/api"
)

// The host id is systemd's app-specific id of the machine id, never the
// machine id itself.
func TestHostID(t *testing.T) {
	// From `systemd-id128 machine-id --app-specific=cacd1e4d871d43748a262963cc505efd`
	// on a machine whose /etc/machine-id held the first.
	got, err := agent.HostID("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
	if err != nil || got != "4c3e400026f548cd8faf72e1c128f623" {
		t.Fatalf("HostID: %q %v", got, err)
	}
	for _, bad := range []string{"", "uninitialized\n", "3d1219c7c4c5404aaa1f6d2a48adfd", "3d1219c7c4c5404aaa1f6d2a48adfda4aa"} {
		if id, err := agent.HostID(bad); err == nil {
			t.Errorf("machine id %q gave %q", bad, id)
		}
	}
	mid, err := os.ReadFile("/etc/machine-id")
	if err != nil {
		return
	}
	out, err := exec.Command("systemd-id128", "machine-id", "--app-specific=cacd1e4d871d43748a262963cc505efd").Output()
	if err != nil {
		return // no systemd here
	}
	if id, err := agent.HostID(string(mid)); err != nil || id != strings.TrimSpace(string(out)) {
		t.Fatalf("HostID of this machine: %q %v, systemd-id128 says %q", id, err, out)
	}
}

// A host enrolling again (its state directory wiped, a reinstall) keeps
// its one record on the server and the old token dies (finding 7).
func TestReEnrollmentReplacesTheRecord(t *testing.T) {
	f := newFleet(t)
	key := f.key()
	m1, m2 := newMachine(t), newMachine(t)
	m2.Root = m1.Root // the same host: the same /etc/machine-id
	if err := os.MkdirAll(filepath.Join(m1.Root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(m1.Root, "etc/machine-id"), []byte("0123456789abcdef0123456789abcdef\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	first, err := m1.Enroll(ctx, agent.EnrollOptions{Server: f.srv.URL, Key: key, Root: f.root(), Hostname: "web"})
	if err != nil {
		t.Fatal(err)
	}
	second, err := m2.Enroll(ctx, agent.EnrollOptions{Server: f.srv.URL, Key: key, Root: f.root(), Hostname: "web"})
	if err != nil {
		t.Fatal(err)
	}
	if second.MachineID != first.MachineID {
		t.Fatalf("re-enrollment made machine %s beside %s", second.MachineID, first.MachineID)
	}
	if _, err := (&api.Client{BaseURL: f.srv.URL, Token: first.Token}).Self(ctx); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("the first enrollment's token still works: %v", err)
	}
	m2.pass(t)
	var keys []api.KeyInfo
	if err := f.admin.Do(ctx, "GET", api.PathAdminKeys, nil, &keys); err != nil || len(keys) != 1 || keys[0].Machines != 1 {
		t.Fatalf("keys: %+v %v, want one machine", keys, err)
	}
}
