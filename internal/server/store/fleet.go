package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/rollout"
)

// DefaultGroup is the group of machines enrolled without one.
const DefaultGroup = "default"

// Channel is a release channel: patches reach its machines Delay after
// they were registered, and none registered after Cutoff (when set).
type Channel struct {
	Name   string
	Delay  time.Duration
	Cutoff time.Time
}

// Group is a set of machines on one channel; Pin (when set) holds the
// group at the patches registered up to then.
type Group struct {
	Name, Channel string
	Pin           time.Time
}

// MachinePatch is one patch as a machine last reported it.
type MachinePatch struct {
	MachineID, Target, Name, State, Reason string
	Since                                  time.Time
}

// CheckIn is what a machine's check-in changes.
type CheckIn struct {
	KernelRelease, KernelBuildID, AgentVersion string
	Unsupported                                string // why the kernel cannot live-patch; "" if it can
	Patches                                    []MachinePatch
}

// Patch is a registered patch and its rollout.
type Patch struct {
	Target, Name                 string
	KernelRelease, KernelBuildID string
	CVEs                         []string
	// Upstream are the upstream commits of the manifest's fixes (none
	// for builds that did not record them).
	Upstream                []string
	Description             string
	RegisteredAt, UpdatedAt time.Time
	Stage                   int
	State, Reason           string
	// StageStarted holds when each stage up to Stage began (the first is
	// the registration): a channel with a deploy delay follows the same
	// stages that much later.
	StageStarted []time.Time
	// Tolerated are the counted failures an operator accepted by resuming
	// the rollout (rollout.Status.Tolerated).
	Tolerated int
	// Level is the patch's place in its patch stream when it is a level
	// (a cumulative patch), else nil. One target per kernel, stream and
	// level number (RegisterPatch refuses another with ErrLevelTaken).
	Level *contract.Level
	// Fixes are the fixes the manifest lists; none for patches
	// registered before the server recorded them.
	Fixes []Fix
}

// Fix is one fix a patch carries, as its manifest names it.
type Fix struct {
	Name     string   `json:"name"`
	CVEs     []string `json:"cves,omitempty"`
	Upstream string   `json:"upstream,omitempty"`
}

// ErrLevelTaken refuses to register a level of a stream that another
// target already is, for the same kernel; it comes as a *LevelTakenError.
var ErrLevelTaken = errors.New("level already registered")

// LevelTakenError names the target that holds the level already.
type LevelTakenError struct {
	Release, BuildID, Stream string
	Number                   int
	Target                   string // the registered one
}

func (e *LevelTakenError) Error() string {
	return fmt.Sprintf("level %d of stream %s for kernel %s (build-id %s): %v as %s", e.Number, e.Stream, e.Release, e.BuildID, ErrLevelTaken, e.Target)
}

func (e *LevelTakenError) Unwrap() error { return ErrLevelTaken }

// Offer is a patch offered to a machine.
type Offer struct {
	Target, MachineID string
}

// RolloutMachine is a machine that applied (or failed to apply) a patch.
type RolloutMachine struct {
	Target, MachineID string
	AppliedAt         time.Time
	Checks            int
	Failed            bool
	Reason            string
	// LastReport is the machine's latest health report on the patch:
	// with its last check-in, it tells a silent machine (lost) from one
	// still working through its checks.
	LastReport time.Time
}

// HealthReport is a machine's latest report at one check of one patch.
type HealthReport struct {
	Target, MachineID, Check string
	Healthy                  bool
	Reason, Detail           string
	At                       time.Time
}

// RolloutTx works on one patch's rollout inside a transaction that holds
// the patch's row (locked on PostgreSQL, so replicas take turns).
type RolloutTx interface {
	Machine(id string) (RolloutMachine, bool, error)
	PutMachine(RolloutMachine) error
	// Offered says whether the patch was offered to the machine.
	Offered(machineID string) (bool, error)
	// Counts are the rollout's machines by enrollment key (see
	// Fleet.RolloutCounts).
	Counts(checks int, silentBefore time.Time) ([]rollout.KeyCounts, error)
	PutHealth(HealthReport) error
}

// Fleet is the storage of check-ins, patches and rollouts.
type Fleet interface {
	// CheckIn records a machine's kernel and replaces its reported patches.
	CheckIn(ctx context.Context, machineID string, c CheckIn, now time.Time) error
	MachinePatches(ctx context.Context, machineID string) ([]MachinePatch, error)
	Machines(ctx context.Context) ([]Machine, error)
	// FleetMachines is every machine, in no order, with only what
	// fleet-wide figures use: id, group and its channel's rules, kernel,
	// unsupported, last check-in (no hostname, key, token or agent
	// version).
	FleetMachines(ctx context.Context) ([]Machine, error)
	// AppliedTargets is, by machine, the targets it reports applied.
	AppliedTargets(ctx context.Context) (map[string]map[string]bool, error)
	// MachineCounts counts the fleet by index, for gauges: never reading
	// every machine's record.
	MachineCounts(ctx context.Context, staleBefore time.Time) (MachineCounts, error)
	SetMachineGroup(ctx context.Context, machineID, group string) error

	PutChannel(ctx context.Context, c Channel) error
	Channels(ctx context.Context) ([]Channel, error)
	PutGroup(ctx context.Context, g Group) error
	Groups(ctx context.Context) ([]Group, error)

	RegisterPatch(ctx context.Context, p Patch) error
	Patch(ctx context.Context, target string) (Patch, error)
	Patches(ctx context.Context) ([]Patch, error)
	PatchesForKernel(ctx context.Context, release, buildID string) ([]Patch, error)
	RolloutMachines(ctx context.Context, target string) ([]RolloutMachine, error)
	// RolloutCounts are the machines that reported on the patch, by the
	// enrollment key they enrolled with: failed, healthy (not failed, at
	// least checks passed), unfinished (short of checks, heard from, by a
	// check-in or a report on the patch, at or after silentBefore) and
	// lost (short of checks and silent since before it).
	RolloutCounts(ctx context.Context, target string, checks int, silentBefore time.Time) ([]rollout.KeyCounts, error)
	// RecordOffers records that machineID was offered targets at at (a
	// target offered before keeps its first time).
	RecordOffers(ctx context.Context, machineID string, targets []string, at time.Time) error
	// MachineOffers are the targets machineID was ever offered.
	MachineOffers(ctx context.Context, machineID string) ([]string, error)
	// LevelOffers are the offers of every registered level.
	LevelOffers(ctx context.Context) ([]Offer, error)
	// Rollout runs fn on the patch's rollout in one transaction; p is
	// written back when fn returns nil and changed it.
	Rollout(ctx context.Context, target string, fn func(tx RolloutTx, p *Patch) error) error

	// AddContained records a published contained record; one already
	// known (by target) is kept as it is, and added says which.
	AddContained(ctx context.Context, c Contained) (added bool, err error)
	// Contained lists the known contained records, by kernel and name.
	Contained(ctx context.Context) ([]Contained, error)
}

// Contained is a published record that a kernel's own source already
// contains a fix (contract.Contained), as the server learned it from the
// repository: the kernel's machines are fixed for its CVEs without a
// patch.
type Contained struct {
	Target, Name                 string
	KernelRelease, KernelBuildID string
	CVEs                         []string // the record's and its fixes'
	Upstream                     []string // its fixes' upstream commits
	Checked                      time.Time
	LearnedAt                    time.Time
}

func (s *SQL) CheckIn(ctx context.Context, id string, c CheckIn, now time.Time) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("checkin %s: %w", id, err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, s.q(`UPDATE machines SET kernel_release = ?, kernel_build_id = ?, agent_version = ?, unsupported = ?, last_checkin = ? WHERE id = ?`),
		c.KernelRelease, c.KernelBuildID, c.AgentVersion, c.Unsupported, unix(now), id)
	if err != nil {
		return fmt.Errorf("checkin %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return fmt.Errorf("checkin %s: machine %w", id, ErrNotFound)
	}
	if _, err := tx.ExecContext(ctx, s.q(`DELETE FROM machine_patches WHERE machine_id = ?`), id); err != nil {
		return fmt.Errorf("checkin %s: %w", id, err)
	}
	for _, p := range c.Patches {
		if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO machine_patches (machine_id, target, name, state, since, reason) VALUES (?, ?, ?, ?, ?, ?)`),
			id, p.Target, p.Name, p.State, unix(p.Since), p.Reason); err != nil {
			return fmt.Errorf("checkin %s: patch %s: %w", id, p.Target, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("checkin %s: %w", id, err)
	}
	return nil
}

func (s *SQL) machinePatches(ctx context.Context, where string, args ...any) ([]MachinePatch, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT machine_id, target, name, state, since, reason FROM machine_patches`+where+` ORDER BY machine_id, target`), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []MachinePatch
	for rows.Next() {
		var p MachinePatch
		var since int64
		if err := rows.Scan(&p.MachineID, &p.Target, &p.Name, &p.State, &since, &p.Reason); err != nil {
			return nil, err
		}
		p.Since = fromUnix(since)
		out = append(out, p)
	}
	return out, rows.Err()
}

func (s *SQL) MachinePatches(ctx context.Context, id string) ([]MachinePatch, error) {
	return s.machinePatches(ctx, ` WHERE machine_id = ?`, id)
}

func (s *SQL) Machines(ctx context.Context) ([]Machine, error) {
	rows, err := s.db.QueryContext(ctx, machineSelect+` ORDER BY m.id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Machine
	for rows.Next() {
		m, err := scanMachine(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// FleetMachines reads the narrow columns and joins each machine's group
// and channel in Go from the two small tables: with 100,000 machines,
// reading the full records through the join took most of a fleet-wide
// report's time.
func (s *SQL) FleetMachines(ctx context.Context) ([]Machine, error) {
	channels, err := s.Channels(ctx)
	if err != nil {
		return nil, err
	}
	groups, err := s.Groups(ctx)
	if err != nil {
		return nil, err
	}
	channel := map[string]Channel{}
	for _, c := range channels {
		channel[c.Name] = c
	}
	group := map[string]Group{}
	for _, g := range groups {
		group[g.Name] = g
	}
	rows, err := s.db.QueryContext(ctx, `SELECT id, group_name, kernel_release, kernel_build_id, unsupported, last_checkin FROM machines`)
	if err != nil {
		return nil, fmt.Errorf("fleet machines: %w", err)
	}
	defer rows.Close()
	var out []Machine
	for rows.Next() {
		var m Machine
		var last int64
		if err := rows.Scan(&m.ID, &m.Group, &m.KernelRelease, &m.KernelBuildID, &m.Unsupported, &last); err != nil {
			return nil, fmt.Errorf("fleet machines: %w", err)
		}
		g := group[m.Group]
		c := channel[g.Channel]
		m.LastCheckIn, m.Channel, m.Pin, m.Delay, m.Cutoff = fromUnix(last), g.Channel, g.Pin, c.Delay, c.Cutoff
		out = append(out, m)
	}
	return out, rows.Err()
}

func (s *SQL) AppliedTargets(ctx context.Context) (map[string]map[string]bool, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT machine_id, target FROM machine_patches WHERE state = ?`), contract.StateApplied)
	if err != nil {
		return nil, fmt.Errorf("applied targets: %w", err)
	}
	defer rows.Close()
	out := map[string]map[string]bool{}
	for rows.Next() {
		var id, target string
		if err := rows.Scan(&id, &target); err != nil {
			return nil, fmt.Errorf("applied targets: %w", err)
		}
		if out[id] == nil {
			out[id] = map[string]bool{}
		}
		out[id][target] = true
	}
	return out, rows.Err()
}

func (s *SQL) SetMachineGroup(ctx context.Context, id, group string) error {
	if err := s.groupExists(ctx, s.db, group); err != nil {
		return fmt.Errorf("set group of %s: %w", id, err)
	}
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE machines SET group_name = ? WHERE id = ?`), group, id)
	if err != nil {
		return fmt.Errorf("set group of %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return fmt.Errorf("machine %s: %w", id, ErrNotFound)
	}
	return nil
}

// upsert is INSERT ... ON CONFLICT (key) DO UPDATE, which SQLite and
// PostgreSQL both understand.
func (s *SQL) upsert(ctx context.Context, db interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, table, key string, cols []string, vals ...any) error {
	var set []string
	for _, c := range cols {
		if !strings.Contains(","+strings.ReplaceAll(key, " ", "")+",", ","+c+",") {
			set = append(set, c+" = excluded."+c)
		}
	}
	q := fmt.Sprintf(`INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (%s) DO UPDATE SET %s`, table, strings.Join(cols, ", "),
		strings.TrimSuffix(strings.Repeat("?, ", len(cols)), ", "), key, strings.Join(set, ", "))
	_, err := db.ExecContext(ctx, s.q(q), vals...)
	return err
}

func (s *SQL) PutChannel(ctx context.Context, c Channel) error {
	if err := s.upsert(ctx, s.db, "channels", "name", []string{"name", "delay_seconds", "cutoff"}, c.Name, int64(c.Delay/time.Second), unix(c.Cutoff)); err != nil {
		return fmt.Errorf("channel %s: %w", c.Name, err)
	}
	return nil
}

func (s *SQL) Channels(ctx context.Context) ([]Channel, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name, delay_seconds, cutoff FROM channels ORDER BY delay_seconds, name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Channel
	for rows.Next() {
		var c Channel
		var d, cut int64
		if err := rows.Scan(&c.Name, &d, &cut); err != nil {
			return nil, err
		}
		c.Delay, c.Cutoff = time.Duration(d)*time.Second, fromUnix(cut)
		out = append(out, c)
	}
	return out, rows.Err()
}

func (s *SQL) PutGroup(ctx context.Context, g Group) error {
	var one int
	if err := s.db.QueryRowContext(ctx, s.q(`SELECT 1 FROM channels WHERE name = ?`), g.Channel).Scan(&one); err != nil {
		return fmt.Errorf("group %s: channel %q: %w", g.Name, g.Channel, ErrNotFound)
	}
	if err := s.upsert(ctx, s.db, "machine_groups", "name", []string{"name", "channel", "pin"}, g.Name, g.Channel, unix(g.Pin)); err != nil {
		return fmt.Errorf("group %s: %w", g.Name, err)
	}
	return nil
}

func (s *SQL) Groups(ctx context.Context) ([]Group, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name, channel, pin FROM machine_groups ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Group
	for rows.Next() {
		var g Group
		var pin int64
		if err := rows.Scan(&g.Name, &g.Channel, &pin); err != nil {
			return nil, err
		}
		g.Pin = fromUnix(pin)
		out = append(out, g)
	}
	return out, rows.Err()
}

func (s *SQL) RegisterPatch(ctx context.Context, p Patch) error {
	var l contract.Level
	if p.Level != nil {
		l = *p.Level
	}
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO patches (target, name, kernel_release, kernel_build_id, cves, description, registered_at, stage, state, reason, updated_at, stage_started, tolerated, upstream,
		level_stream, level_number, level_supersedes, level_withdrawn, fixes)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
		p.Target, p.Name, p.KernelRelease, p.KernelBuildID, strings.Join(p.CVEs, " "), p.Description, unix(p.RegisteredAt), p.Stage, p.State, p.Reason, unix(p.UpdatedAt), joinTimes(p.StageStarted), p.Tolerated,
		strings.Join(p.Upstream, " "), l.Stream, l.Number, l.Supersedes, jsonList(l.Withdrawn), jsonList(p.Fixes))
	if err != nil {
		if _, e := s.Patch(ctx, p.Target); e == nil {
			return fmt.Errorf("patch %s: %w", p.Target, ErrExists)
		}
		if p.Level != nil {
			var other string
			if e := s.db.QueryRowContext(ctx, s.q(`SELECT target FROM patches WHERE kernel_release = ? AND kernel_build_id = ? AND level_stream = ? AND level_number = ?`),
				p.KernelRelease, p.KernelBuildID, l.Stream, l.Number).Scan(&other); e == nil {
				return fmt.Errorf("register %s: %w", p.Target, &LevelTakenError{Release: p.KernelRelease, BuildID: p.KernelBuildID, Stream: l.Stream, Number: l.Number, Target: other})
			}
		}
		return fmt.Errorf("register %s: %w", p.Target, err)
	}
	return nil
}

// jsonList stores a list as JSON, "" when empty: names may hold spaces.
func jsonList[T any](v []T) string {
	if len(v) == 0 {
		return ""
	}
	b, _ := json.Marshal(v) // strings and string structs always marshal
	return string(b)
}

// parseList reads what jsonList stored.
func parseList[T any](s string) ([]T, error) {
	if s == "" {
		return nil, nil
	}
	var v []T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return nil, err
	}
	return v, nil
}

const patchSelect = `SELECT target, name, kernel_release, kernel_build_id, cves, description, registered_at, stage, state, reason, updated_at, stage_started, tolerated, upstream,
	level_stream, level_number, level_supersedes, level_withdrawn, fixes FROM patches`

func scanPatch(row interface{ Scan(...any) error }) (Patch, error) {
	var p Patch
	var cves, started, upstream, withdrawn, fixes string
	var reg, upd int64
	var l contract.Level
	err := row.Scan(&p.Target, &p.Name, &p.KernelRelease, &p.KernelBuildID, &cves, &p.Description, &reg, &p.Stage, &p.State, &p.Reason, &upd, &started, &p.Tolerated, &upstream,
		&l.Stream, &l.Number, &l.Supersedes, &withdrawn, &fixes)
	if err != nil {
		return p, err
	}
	p.CVEs, p.Upstream, p.RegisteredAt, p.UpdatedAt = strings.Fields(cves), strings.Fields(upstream), fromUnix(reg), fromUnix(upd)
	for _, f := range strings.Fields(started) {
		v, _ := strconv.ParseInt(f, 10, 64)
		p.StageStarted = append(p.StageStarted, fromUnix(v))
	}
	if l.Stream != "" {
		if l.Withdrawn, err = parseList[string](withdrawn); err != nil {
			return p, fmt.Errorf("patch %s: level_withdrawn: %w", p.Target, err)
		}
		p.Level = &l
	}
	if p.Fixes, err = parseList[Fix](fixes); err != nil {
		return p, fmt.Errorf("patch %s: fixes: %w", p.Target, err)
	}
	return p, nil
}

// joinTimes stores times as space-separated Unix seconds.
func joinTimes(ts []time.Time) string {
	var b strings.Builder
	for i, t := range ts {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.FormatInt(unix(t), 10))
	}
	return b.String()
}

func (s *SQL) Patch(ctx context.Context, target string) (Patch, error) {
	p, err := scanPatch(s.db.QueryRowContext(ctx, s.q(patchSelect+` WHERE target = ?`), target))
	if errors.Is(err, sql.ErrNoRows) {
		return Patch{}, fmt.Errorf("patch %s: %w", target, ErrNotFound)
	}
	return p, err
}

func (s *SQL) patches(ctx context.Context, where string, args ...any) ([]Patch, error) {
	rows, err := s.db.QueryContext(ctx, s.q(patchSelect+where+` ORDER BY registered_at, target`), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Patch
	for rows.Next() {
		p, err := scanPatch(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, rows.Err()
}

func (s *SQL) Patches(ctx context.Context) ([]Patch, error) { return s.patches(ctx, "") }

func (s *SQL) PatchesForKernel(ctx context.Context, release, buildID string) ([]Patch, error) {
	return s.patches(ctx, ` WHERE kernel_release = ? AND kernel_build_id = ?`, release, buildID)
}

func (s *SQL) RolloutMachines(ctx context.Context, target string) ([]RolloutMachine, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT target, machine_id, applied_at, checks, failed, reason, last_report FROM rollout_machines WHERE target = ? ORDER BY machine_id`), target)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []RolloutMachine
	for rows.Next() {
		var m RolloutMachine
		var at, last int64
		var failed int
		if err := rows.Scan(&m.Target, &m.MachineID, &at, &m.Checks, &failed, &m.Reason, &last); err != nil {
			return nil, err
		}
		m.AppliedAt, m.Failed, m.LastReport = fromUnix(at), failed != 0, fromUnix(last)
		out = append(out, m)
	}
	return out, rows.Err()
}

// countsQuery sorts a rollout's machines by key into the classes of
// rollout.KeyCounts. Machines rows are joined, so a machine that no
// longer exists does not count.
const countsQuery = `SELECT m.key_id,
	COALESCE(SUM(CASE WHEN rm.failed <> 0 THEN 1 ELSE 0 END), 0),
	COALESCE(SUM(CASE WHEN rm.failed = 0 AND rm.checks >= ? THEN 1 ELSE 0 END), 0),
	COALESCE(SUM(CASE WHEN rm.failed = 0 AND rm.checks < ? AND (m.last_checkin >= ? OR rm.last_report >= ?) THEN 1 ELSE 0 END), 0),
	COALESCE(SUM(CASE WHEN rm.failed = 0 AND rm.checks < ? AND m.last_checkin < ? AND rm.last_report < ? THEN 1 ELSE 0 END), 0)
	FROM rollout_machines rm JOIN machines m ON m.id = rm.machine_id
	WHERE rm.target = ? GROUP BY m.key_id ORDER BY m.key_id`

func (s *SQL) rolloutCounts(ctx context.Context, db interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}, target string, checks int, silentBefore time.Time) ([]rollout.KeyCounts, error) {
	cut := unix(silentBefore)
	rows, err := db.QueryContext(ctx, s.q(countsQuery), checks, checks, cut, cut, checks, cut, cut, target)
	if err != nil {
		return nil, fmt.Errorf("rollout counts %s: %w", target, err)
	}
	defer rows.Close()
	var out []rollout.KeyCounts
	for rows.Next() {
		var k rollout.KeyCounts
		if err := rows.Scan(&k.Key, &k.Failed, &k.Healthy, &k.Unfinished, &k.Lost); err != nil {
			return nil, fmt.Errorf("rollout counts %s: %w", target, err)
		}
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("rollout counts %s: %w", target, err)
	}
	return out, nil
}

func (s *SQL) RolloutCounts(ctx context.Context, target string, checks int, silentBefore time.Time) ([]rollout.KeyCounts, error) {
	return s.rolloutCounts(ctx, s.db, target, checks, silentBefore)
}

func (s *SQL) RecordOffers(ctx context.Context, machineID string, targets []string, at time.Time) error {
	for _, t := range targets {
		if _, err := s.db.ExecContext(ctx, s.q(`INSERT INTO patch_offers (target, machine_id, offered_at) VALUES (?, ?, ?) ON CONFLICT (target, machine_id) DO NOTHING`),
			t, machineID, unix(at)); err != nil {
			return fmt.Errorf("offer %s to %s: %w", t, machineID, err)
		}
	}
	return nil
}

func (s *SQL) MachineOffers(ctx context.Context, machineID string) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT target FROM patch_offers WHERE machine_id = ? ORDER BY target`), machineID)
	if err != nil {
		return nil, fmt.Errorf("offers to %s: %w", machineID, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var t string
		if err := rows.Scan(&t); err != nil {
			return nil, fmt.Errorf("offers to %s: %w", machineID, err)
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

func (s *SQL) LevelOffers(ctx context.Context) ([]Offer, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT o.target, o.machine_id FROM patch_offers o JOIN patches p ON p.target = o.target
		WHERE p.level_stream <> '' ORDER BY o.machine_id, o.target`)
	if err != nil {
		return nil, fmt.Errorf("level offers: %w", err)
	}
	defer rows.Close()
	var out []Offer
	for rows.Next() {
		var o Offer
		if err := rows.Scan(&o.Target, &o.MachineID); err != nil {
			return nil, fmt.Errorf("level offers: %w", err)
		}
		out = append(out, o)
	}
	return out, rows.Err()
}

func (s *SQL) Rollout(ctx context.Context, target string, fn func(RolloutTx, *Patch) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("rollout %s: %w", target, err)
	}
	defer tx.Rollback()
	p, err := scanPatch(tx.QueryRowContext(ctx, s.q(patchSelect+` WHERE target = ?`+s.lock()), target))
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("patch %s: %w", target, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("rollout %s: %w", target, err)
	}
	before := rolloutColumns(&p)
	if err := fn(&rolloutTx{s: s, tx: tx, ctx: ctx, target: target}, &p); err != nil {
		return err
	}
	// Most calls (a healthy report, a tick that waits) change nothing:
	// spare the patch's row a write.
	if after := rolloutColumns(&p); !slices.Equal(before, after) {
		if _, err := tx.ExecContext(ctx, s.q(`UPDATE patches SET stage = ?, state = ?, reason = ?, updated_at = ?, stage_started = ?, tolerated = ? WHERE target = ?`),
			append(after, target)...); err != nil {
			return fmt.Errorf("rollout %s: %w", target, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("rollout %s: %w", target, err)
	}
	return nil
}

// rolloutColumns are the values of the columns of patches a rollout
// changes, in the order Rollout's UPDATE sets them.
func rolloutColumns(p *Patch) []any {
	return []any{p.Stage, p.State, p.Reason, unix(p.UpdatedAt), joinTimes(p.StageStarted), p.Tolerated}
}

type rolloutTx struct {
	s      *SQL
	tx     *sql.Tx
	ctx    context.Context
	target string
}

func (r *rolloutTx) Machine(id string) (RolloutMachine, bool, error) {
	m := RolloutMachine{Target: r.target, MachineID: id}
	var at, last int64
	var failed int
	err := r.tx.QueryRowContext(r.ctx, r.s.q(`SELECT applied_at, checks, failed, reason, last_report FROM rollout_machines WHERE target = ? AND machine_id = ?`), r.target, id).
		Scan(&at, &m.Checks, &failed, &m.Reason, &last)
	if errors.Is(err, sql.ErrNoRows) {
		return m, false, nil
	}
	m.AppliedAt, m.Failed, m.LastReport = fromUnix(at), failed != 0, fromUnix(last)
	return m, err == nil, err
}

func (r *rolloutTx) Offered(id string) (bool, error) {
	var one int
	err := r.tx.QueryRowContext(r.ctx, r.s.q(`SELECT 1 FROM patch_offers WHERE target = ? AND machine_id = ?`), r.target, id).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

func (r *rolloutTx) PutMachine(m RolloutMachine) error {
	failed := 0
	if m.Failed {
		failed = 1
	}
	return r.s.upsert(r.ctx, r.tx, "rollout_machines", "target, machine_id", []string{"target", "machine_id", "applied_at", "checks", "failed", "reason", "last_report"},
		r.target, m.MachineID, unix(m.AppliedAt), m.Checks, failed, m.Reason, unix(m.LastReport))
}

func (r *rolloutTx) Counts(checks int, silentBefore time.Time) ([]rollout.KeyCounts, error) {
	return r.s.rolloutCounts(r.ctx, r.tx, r.target, checks, silentBefore)
}

func (r *rolloutTx) PutHealth(h HealthReport) error {
	healthy := 0
	if h.Healthy {
		healthy = 1
	}
	return r.s.upsert(r.ctx, r.tx, "health_reports", "target, machine_id, check_name", []string{"target", "machine_id", "check_name", "healthy", "reason", "detail", "at"},
		h.Target, h.MachineID, h.Check, healthy, h.Reason, h.Detail, unix(h.At))
}

func (s *SQL) AddContained(ctx context.Context, c Contained) (bool, error) {
	res, err := s.db.ExecContext(ctx, s.q(`INSERT INTO contained (target, name, kernel_release, kernel_build_id, cves, upstream, checked_at, learned_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (target) DO NOTHING`),
		c.Target, c.Name, c.KernelRelease, c.KernelBuildID, strings.Join(c.CVEs, " "), strings.Join(c.Upstream, " "), unix(c.Checked), unix(c.LearnedAt))
	if err != nil {
		return false, fmt.Errorf("contained %s: %w", c.Target, err)
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

func (s *SQL) Contained(ctx context.Context) ([]Contained, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT target, name, kernel_release, kernel_build_id, cves, upstream, checked_at, learned_at
		FROM contained ORDER BY kernel_release, kernel_build_id, name, target`)
	if err != nil {
		return nil, fmt.Errorf("contained: %w", err)
	}
	defer rows.Close()
	var out []Contained
	for rows.Next() {
		var c Contained
		var cves, upstream string
		var checked, learned int64
		if err := rows.Scan(&c.Target, &c.Name, &c.KernelRelease, &c.KernelBuildID, &cves, &upstream, &checked, &learned); err != nil {
			return nil, fmt.Errorf("contained: %w", err)
		}
		c.CVEs, c.Upstream, c.Checked, c.LearnedAt = strings.Fields(cves), strings.Fields(upstream), fromUnix(checked), fromUnix(learned)
		out = append(out, c)
	}
	return out, rows.Err()
}
