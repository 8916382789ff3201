package agent_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stitchpatch/stitch/internal/agent"
	"github.com/stitchpatch/stitch/internal/livepatch"
)

// FuzzState feeds arbitrary bytes to the agent as its state file: a file
// damaged by a disk or a person must give an error or a status, never a
// panic.
func FuzzState(f *testing.F) {
	f.Add([]byte(`{"patches":[{"target":"6.1.0-54-amd64/a-0123456789abcdef.stitch","name":"a","state":"applied","release":"6.1.0-54-amd64","build_id":"ab"}],"pending":["x"]}`))
	f.Add([]byte(`{"patches":[null,{}],"outbox":[null]}`))
	f.Add([]byte(`{"patches":`))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"server":"http://127.0.0.1:1","repo":"http://127.0.0.1:1/v1/repo"}`), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "root.json"), []byte("{}"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "state.json"), data, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := agent.LoadState(dir); err != nil {
			return
		}
		a := &agent.Agent{Dir: dir}
		ks := &livepatch.Status{Release: "6.1.0-54-amd64", BuildID: "ab", Livepatch: true, Patches: []livepatch.Patch{{Name: "a", Enabled: true}}}
		if _, err := a.Status(ks); err != nil {
			t.Fatalf("state loaded but status failed: %v", err)
		}
	})
}
