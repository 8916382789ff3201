package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// The console's queries: one page of machines at a time and counts from
// indexes, so that they stay fast with 100,000 machines.

// MachineQuery selects and orders machines for a page.
type MachineQuery struct {
	Search      string // a part of the hostname or id
	Kernel      string // a release exactly
	Group       string
	State       string    // "", "stale", "unsupported" or "never" (never checked in)
	StaleBefore time.Time // a machine last heard from before this is stale
	Sort        string    // "hostname" (default), "kernel", "group", "last_checkin"
	Desc        bool
	Limit       int // 0: all
	Offset      int
}

// MachineStates are MachineQuery.State's values.
var MachineStates = []string{"stale", "unsupported", "never"}

// MachineSorts are MachineQuery.Sort's values, with their columns.
var MachineSorts = map[string]string{"hostname": "m.hostname", "kernel": "m.kernel_release", "group": "m.group_name", "last_checkin": "m.last_checkin"}

// MachinesPage returns the machines q selects, in q's order, within its
// limit, and how many it selects in all.
func (s *SQL) MachinesPage(ctx context.Context, q MachineQuery) ([]Machine, int, error) {
	var where []string
	var args []any
	if q.Search != "" {
		like := "%" + strings.NewReplacer(`\`, `\\`, "%", `\%`, "_", `\_`).Replace(strings.ToLower(q.Search)) + "%"
		where, args = append(where, `(LOWER(m.hostname) LIKE ? ESCAPE '\' OR m.id LIKE ? ESCAPE '\')`), append(args, like, like)
	}
	if q.Kernel != "" {
		where, args = append(where, `m.kernel_release = ?`), append(args, q.Kernel)
	}
	if q.Group != "" {
		where, args = append(where, `m.group_name = ?`), append(args, q.Group)
	}
	switch q.State {
	case "":
	case "stale":
		where, args = append(where, `m.last_checkin > 0 AND m.last_checkin < ?`), append(args, unix(q.StaleBefore))
	case "unsupported":
		where = append(where, `m.unsupported <> ''`)
	case "never":
		where = append(where, `m.last_checkin = 0`)
	default:
		return nil, 0, fmt.Errorf("machine state %q: want one of %v", q.State, MachineStates)
	}
	cond := ""
	if len(where) > 0 {
		cond = " WHERE " + strings.Join(where, " AND ")
	}
	var total int
	if err := s.db.QueryRowContext(ctx, s.q(`SELECT COUNT(*) FROM machines m`+cond), args...).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("count machines: %w", err)
	}
	col, ok := MachineSorts[q.Sort]
	if q.Sort == "" {
		col, ok = MachineSorts["hostname"], true
	}
	if !ok {
		return nil, 0, fmt.Errorf("sort %q: want hostname, kernel, group or last_checkin", q.Sort)
	}
	dir := " ASC"
	if q.Desc {
		dir = " DESC"
	}
	query := machineSelect + cond + ` ORDER BY ` + col + dir + `, m.id` + dir
	if q.Limit > 0 {
		query, args = query+` LIMIT ? OFFSET ?`, append(args, q.Limit, q.Offset)
	}
	rows, err := s.db.QueryContext(ctx, s.q(query), args...)
	if err != nil {
		return nil, 0, fmt.Errorf("machines: %w", err)
	}
	defer rows.Close()
	var out []Machine
	for rows.Next() {
		m, err := scanMachine(rows)
		if err != nil {
			return nil, 0, fmt.Errorf("machines: %w", err)
		}
		out = append(out, m)
	}
	return out, total, rows.Err()
}

// MachineByID finds one machine; ErrNotFound if none.
func (s *SQL) MachineByID(ctx context.Context, id string) (Machine, error) {
	m, err := scanMachine(s.db.QueryRowContext(ctx, s.q(machineSelect+` WHERE m.id = ?`), id))
	if errors.Is(err, sql.ErrNoRows) {
		return Machine{}, ErrNotFound
	}
	return m, err
}

// KernelCount is how many machines run one kernel build, and how many of
// them are stale or unsupported.
type KernelCount struct {
	Release, BuildID             string
	Machines, Stale, Unsupported int
}

// KernelCounts counts machines by kernel (most first); machines that never
// checked in have an empty release.
func (s *SQL) KernelCounts(ctx context.Context, staleBefore time.Time) ([]KernelCount, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT kernel_release, kernel_build_id, COUNT(*),
		SUM(CASE WHEN last_checkin > 0 AND last_checkin < ? THEN 1 ELSE 0 END), SUM(CASE WHEN unsupported <> '' THEN 1 ELSE 0 END)
		FROM machines GROUP BY kernel_release, kernel_build_id ORDER BY COUNT(*) DESC, kernel_release`), unix(staleBefore))
	if err != nil {
		return nil, fmt.Errorf("kernel counts: %w", err)
	}
	defer rows.Close()
	var out []KernelCount
	for rows.Next() {
		var k KernelCount
		if err := rows.Scan(&k.Release, &k.BuildID, &k.Machines, &k.Stale, &k.Unsupported); err != nil {
			return nil, fmt.Errorf("kernel counts: %w", err)
		}
		out = append(out, k)
	}
	return out, rows.Err()
}

// HealthReports are the health reports on target (if not empty) by
// machineID (if not empty), newest first, at most limit.
func (s *SQL) HealthReports(ctx context.Context, target, machineID string, limit int) ([]HealthReport, error) {
	var where []string
	var args []any
	if target != "" {
		where, args = append(where, `target = ?`), append(args, target)
	}
	if machineID != "" {
		where, args = append(where, `machine_id = ?`), append(args, machineID)
	}
	q := `SELECT target, machine_id, check_name, healthy, reason, detail, at FROM health_reports`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	rows, err := s.db.QueryContext(ctx, s.q(q+` ORDER BY at DESC LIMIT ?`), append(args, limit)...)
	if err != nil {
		return nil, fmt.Errorf("health reports: %w", err)
	}
	defer rows.Close()
	var out []HealthReport
	for rows.Next() {
		var h HealthReport
		var healthy, at int64
		if err := rows.Scan(&h.Target, &h.MachineID, &h.Check, &healthy, &h.Reason, &h.Detail, &at); err != nil {
			return nil, fmt.Errorf("health reports: %w", err)
		}
		h.Healthy, h.At = healthy != 0, fromUnix(at)
		out = append(out, h)
	}
	return out, rows.Err()
}
