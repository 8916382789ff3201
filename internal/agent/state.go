package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
)

// stateVersion is State.Version as this agent writes it.
const stateVersion = 2

// State is what the agent remembers between runs and boots.
type State struct {
	// Version 1 records each patch's server (Patch.Server); 0 did not.
	// Version 2 records each patch's level (Patch.Level, Replace).
	Version int `json:"version,omitempty"`
	// Patches in the order they were first applied. At boot the live
	// level of each stream is loaded again first, then the other patches
	// in this order.
	Patches     []*Patch  `json:"patches"`
	LastCheckIn time.Time `json:"last_checkin,omitzero"`
	// LastAttempt and LastError tell of the last check-in that failed.
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	NextCheckIn time.Time `json:"next_checkin,omitzero"`
	// Pending are the targets the server offered at the last check-in
	// that are not applied yet (loading off, or the work was cut short).
	Pending []string `json:"pending,omitempty"`
	// Outbox holds health reports the server has not acknowledged.
	Outbox []api.Health `json:"outbox,omitempty"`
	// Schedule is the health-check schedule the server gave last.
	Schedule contract.Schedule `json:"schedule,omitempty"`
	// RepoError is the last refusal of the repository (TUF) or failed
	// download, at RepoErrorAt; empty once a fetch succeeds again. It is
	// a problem of the distribution, not of any patch.
	RepoError   string    `json:"repo_error,omitempty"`
	RepoErrorAt time.Time `json:"repo_error_at,omitzero"`
}

// Patch is one patch the agent was told about or found, and its fate.
type Patch struct {
	Target      string   `json:"target"`
	Name        string   `json:"name"`
	CVEs        []string `json:"cves,omitempty"`
	Description string   `json:"description,omitempty"`
	// Release and BuildID are the kernel the patch is for: after a reboot
	// into another kernel it is kept, but not loaded or reported.
	Release string `json:"release,omitempty"`
	BuildID string `json:"build_id,omitempty"`
	// State is the agent's decision: applied (wanted loaded), reverted,
	// failed or refused (contract.State*). Whether an applied patch is loaded
	// now is the kernel's to say.
	State  string    `json:"state"`
	Since  time.Time `json:"since"`
	Reason string    `json:"reason,omitempty"` // contract.Reason* for failed and refused
	Detail string    `json:"detail,omitempty"`
	// BundleSHA256 is the bundle's hash as the signed metadata gave it;
	// Bundle is the verified copy, reused at boot without a network.
	Bundle       string `json:"bundle,omitempty"`
	BundleSHA256 string `json:"bundle_sha256,omitempty"`
	// Server is the server that offered the patch to this machine (its
	// base URL); only that server's revert orders are obeyed for it.
	// Empty for a mirror's patches.
	Server string `json:"server,omitempty"`
	// AppliedAt is the last load, in boot BootID, with the taint the
	// kernel had just before it; Checks are the health checks reported
	// since.
	AppliedAt time.Time `json:"applied_at,omitzero"`
	BootID    string    `json:"boot_id,omitempty"`
	Taint     uint64    `json:"taint"`
	Checks    []string  `json:"checks,omitempty"`
	// Replace marks a cumulative patch (klp atomic replace), Level a
	// level of a patch stream, both from the verified manifest. The
	// applied level of a stream is the live one: the only one loaded
	// again at boot.
	Replace bool            `json:"replace,omitempty"`
	Level   *contract.Level `json:"level,omitempty"`
	// Fixes names the fixes the patch carries (the manifest's).
	Fixes []string `json:"fixes,omitempty"`
	// Superseded marks a level a newer level of its stream replaced
	// while it was good: a level to fall back to. Its bundle is kept.
	Superseded bool `json:"superseded,omitempty"`
	// HotFix marks a patch that is no level, loaded on top of a live
	// level; a level's transition drops it and the agent loads it again.
	HotFix bool `json:"hot_fix,omitempty"`
}

func (s *State) patch(target string) *Patch {
	for _, p := range s.Patches {
		if p.Target == target {
			return p
		}
	}
	return nil
}

// byName finds the patch holding a module name, which the kernel allows
// once.
func (s *State) byName(name string) *Patch {
	for _, p := range s.Patches {
		if p.Name == name && p.State == contract.StateApplied {
			return p
		}
	}
	return nil
}

func (p *Patch) set(state, reason, detail string, now time.Time) {
	p.State, p.Reason, p.Detail, p.Since = state, reason, detail, now
	p.Superseded = false
}

// number is p's level, 0 for a patch that is no level.
func (p *Patch) number() int {
	if p == nil || p.Level == nil {
		return 0
	}
	return p.Level.Number
}

// inStream says whether p is a level of stream.
func (p *Patch) inStream(stream string) bool { return p.Level != nil && p.Level.Stream == stream }

func (p *Patch) checked(name string) bool { return slices.Contains(p.Checks, name) }

// watched says whether some health check of p is still to come.
func (p *Patch) watched(checks contract.Schedule) bool {
	return slices.ContainsFunc(checks, func(c contract.Check) bool { return !p.checked(c.Name) })
}

// LoadState reads the state in dir; a missing file is an empty state.
func LoadState(dir string) (*State, error) {
	s := &State{}
	if err := readJSON(filepath.Join(dir, "state.json"), s); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	// A damaged file may hold nulls; they name no patch.
	s.Patches = slices.DeleteFunc(s.Patches, func(p *Patch) bool { return p == nil })
	return s, nil
}

func (a *Agent) saveState(s *State) error {
	return writeJSON(a.path("state.json"), s, 0o600)
}

// marker is a crash marker's content.
type marker struct {
	Target string    `json:"target"`
	BootID string    `json:"boot_id"`
	At     time.Time `json:"at"`
}

func (a *Agent) markerPath(name string) string { return a.path("loading", name) }

// mark writes a patch's crash marker, synced to disk before the module is
// loaded: if the kernel dies, the marker is what survives to tell.
func (a *Agent) mark(p *Patch) error {
	if err := os.MkdirAll(a.path("loading"), 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(marker{Target: p.Target, BootID: a.bootID(), At: a.now()})
	if err != nil {
		return err
	}
	return writeFile(a.markerPath(p.Name), b, 0o600)
}

func (a *Agent) unmark(name string) {
	os.Remove(a.markerPath(name))
}

// markers lists the crash markers left behind, by patch name.
func (a *Agent) markers() (map[string]marker, error) {
	ents, err := os.ReadDir(a.path("loading"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]marker{}
	for _, e := range ents {
		var m marker
		if err := readJSON(a.path("loading", e.Name()), &m); err != nil {
			// A marker cut short by the crash still names its patch.
			m = marker{}
		}
		out[e.Name()] = m
	}
	return out, nil
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w (remove it to start afresh)", path, err)
	}
	return nil
}

func writeJSON(path string, v any, perm os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFile(path, append(b, '\n'), perm)
}

// writeFile replaces path atomically and durably: a power cut leaves the
// old content or the new, never a torn file.
func writeFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
