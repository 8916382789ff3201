package bundle

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// Warning is something the refresher cannot do by itself: an operator
// must, with the command Msg names.
type Warning struct {
	Role string // the role concerned; "layout" for the repository's layout
	Msg  string
}

// Freshness is what RefreshIfDue found and did.
type Freshness struct {
	Status   Status
	Resigned []string // roles signed anew, in signing order
	Warnings []Warning
}

// rootWarnFraction: the refresher warns once less than this part of the
// root's life is left (two months of a year), time enough to fetch the
// offline root key.
const rootWarnFraction = 6

// RefreshIfDue re-signs, with the online keys, whatever is due:
//
//   - targets once half their life is gone, or when the root no longer
//     trusts their signature (a rotated key);
//   - snapshot when targets changed, at half its life, or when untrusted;
//   - timestamp when snapshot changed, at half its life, or when untrusted.
//
// The root key is offline: a root nearing expiry, and a role whose key is
// not here (a mirror has no keys), become Warnings naming the command
// that fixes them. Status is filled whenever the metadata could be read,
// even with an error.
func (r *Repo) RefreshIfDue() (f Freshness, err error) {
	unlock, err := r.lock()
	if err != nil {
		return f, fmt.Errorf("refresh: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return f, fmt.Errorf("refresh: %w", err)
	}
	defer func() { f.Status = st.status() }()
	now, e := r.now(), r.exp()
	f.Warnings = r.rootWarnings(st, now)
	missing := func(role string, exp time.Time) bool {
		if r.hasKey(role) {
			return false
		}
		f.Warnings = append(f.Warnings, Warning{role, fmt.Sprintf(
			"%s metadata is due for signing (expires %s) but %s is not here (a mirror has no keys): import a newer export before then (`stitch repo import`), or copy the key in",
			role, exp.Format(time.RFC3339), r.KeyPath(role))})
		return true
	}
	needT := r.targetsDue(st, now)
	if needT && missing(metadata.TARGETS, st.targets.Signed.Expires) {
		needT = false
	}
	needS := needT || due(now, st.snapshot.Signed.Expires, e.Snapshot) ||
		!names(st.snapshot.Signed.Meta, "targets.json", st.targets.Signed.Version) ||
		!verifies(st.root, metadata.SNAPSHOT, st.snapshot)
	if needS && missing(metadata.SNAPSHOT, st.snapshot.Signed.Expires) {
		needS = false
	}
	needTS := needS || due(now, st.timestamp.Signed.Expires, e.Timestamp) ||
		!names(st.timestamp.Signed.Meta, "snapshot.json", st.snapshot.Signed.Version) ||
		!verifies(st.root, metadata.TIMESTAMP, st.timestamp)
	if needTS && missing(metadata.TIMESTAMP, st.timestamp.Signed.Expires) {
		needTS = false
	}
	if needT {
		if err := r.signTargets(st, now.Add(e.Targets)); err != nil {
			return f, fmt.Errorf("refresh targets: %w", err)
		}
		f.Resigned = append(f.Resigned, metadata.TARGETS)
	}
	if needS {
		if err := r.signSnapshot(st, now.Add(e.Snapshot)); err != nil {
			return f, fmt.Errorf("refresh snapshot: %w", err)
		}
		f.Resigned = append(f.Resigned, metadata.SNAPSHOT)
	}
	if needTS {
		if _, err := r.signTimestamp(st, now.Add(e.Timestamp), true); err != nil {
			return f, fmt.Errorf("refresh timestamp: %w", err)
		}
		f.Resigned = append(f.Resigned, metadata.TIMESTAMP)
		r.prune(st)
	}
	return f, nil
}

// names says whether meta names version v of file: whether the snapshot
// or timestamp holding meta is over the current targets or snapshot.
func names(meta map[string]*metadata.MetaFiles, file string, v int64) bool {
	mf := meta[file]
	return mf != nil && mf.Version == v
}

// rootWarnings: the root near its expiry, and the old layout.
func (r *Repo) rootWarnings(st *state, now time.Time) []Warning {
	var w []Warning
	cmd := "stitch keys renew-root --dir " + r.Dir
	if r.KeysDir != "" {
		cmd += " --keys " + r.KeysDir
	}
	if exp := st.root.Signed.Expires; exp.Sub(now) < r.exp().Root/rootWarnFraction {
		w = append(w, Warning{metadata.ROOT, fmt.Sprintf(
			"root metadata expires %s (in %s); after that every agent refuses the repository: run `%s` where the offline root key is, before then",
			exp.Format(time.RFC3339), exp.Sub(now).Round(time.Hour), cmd)})
	}
	if !st.root.Signed.ConsistentSnapshot {
		w = append(w, Warning{"layout", fmt.Sprintf(
			"the repository predates consistent snapshots: an agent fetching during a publish or refresh may be refused; run `stitch repo refresh --dir %s` once with the root key present to switch", r.Dir)})
	}
	return w
}

// warnEvery is how often KeepFresh repeats a standing warning.
const warnEvery = 24 * time.Hour

// KeepFresh runs RefreshIfDue at once and then every interval until ctx
// ends: what `stitch server` does so that its metadata never expires for
// want of a cron job. It logs what it re-signed, errors, and each standing
// warning once a day; report (when not nil) gets every role's expiry after
// each run.
func (r *Repo) KeepFresh(ctx context.Context, every time.Duration, log *slog.Logger, report func(map[string]time.Time)) {
	warned := map[string]time.Time{}
	run := func() {
		f, err := r.RefreshIfDue()
		if err != nil {
			log.Error("repository refresh failed", "dir", r.Dir, "err", err)
		}
		if len(f.Resigned) > 0 {
			log.Info("repository metadata re-signed", "dir", r.Dir, "roles", f.Resigned,
				"timestamp_expires", f.Status.Roles[metadata.TIMESTAMP].Expires)
		}
		now := r.now()
		for _, w := range f.Warnings {
			if last, ok := warned[w.Role]; ok && now.Sub(last) < warnEvery {
				continue
			}
			warned[w.Role] = now
			log.Warn("repository needs an operator", "dir", r.Dir, "role", w.Role, "msg", w.Msg)
		}
		if report != nil && f.Status.Roles != nil {
			report(f.Status.Expires())
		}
	}
	run()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			run()
		}
	}
}
