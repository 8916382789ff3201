// Package store keeps the server's fleet state behind one interface, over
// embedded SQLite (no set-up) or PostgreSQL (shared by several server
// replicas). Schema migrations are versioned SQL files in migrations/,
// applied in order at open, under an advisory lock on PostgreSQL so that
// replicas starting together do not race.
package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // PostgreSQL through database/sql
	_ "modernc.org/sqlite"             // the pure-Go SQLite driver, no cgo
)

//go:embed migrations/*.sql
var migrations embed.FS

// Sentinel errors; ErrLimit and ErrExpired are what an enrolling machine
// is told, ErrNotFound means an unknown id or credential.
var (
	ErrNotFound = errors.New("not found")
	ErrLimit    = errors.New("machine limit reached")
	ErrExpired  = errors.New("enrollment key expired")
	ErrExists   = errors.New("already exists")
	ErrRevoked  = errors.New("enrollment key revoked")
	// ErrGroupMismatch refuses an enrollment that names a group other
	// than its key's: a key decides its machines' group.
	ErrGroupMismatch = errors.New("machines join their key's group")
	// ErrUnknownGroup wraps ErrNotFound: a machine group that does not exist.
	ErrUnknownGroup = fmt.Errorf("machine group %w", ErrNotFound)
)

// Key is an enrollment key (the secret is stored only as a hash).
type Key struct {
	ID          string
	SecretHash  string
	MaxMachines int
	ExpiresAt   time.Time // zero: never
	CreatedAt   time.Time
	Group       string    // machines enrolled with it join this group
	RevokedAt   time.Time // zero: not revoked; else it enrolls nothing more
}

// KeyInfo is a key with the number of machines enrolled with it.
type KeyInfo struct {
	Key
	Machines int
}

// Machine is an enrolled machine, with what its last check-in said and
// what its group's channel makes of patch eligibility.
type Machine struct {
	ID, KeyID, TokenHash, Hostname string
	EnrolledAt                     time.Time
	Group                          string
	KernelRelease, KernelBuildID   string
	AgentVersion                   string
	Unsupported                    string // why its kernel cannot live-patch, as last reported
	LastCheckIn                    time.Time
	// From the machine's group and channel (read-only here).
	Channel     string
	Delay       time.Duration // the channel's deploy delay
	Cutoff, Pin time.Time     // zero: none

	// HostID identifies the host across enrollments (an app-specific
	// hash of its /etc/machine-id); empty for agents that send none.
	HostID string
}

// Store is the storage interface the server uses.
type Store interface {
	CreateKey(ctx context.Context, k Key) error
	// Enroll adds m under the key whose secret hashes to secretHash,
	// atomically checking the key's revocation, expiry and machine limit
	// at now. The machine joins the key's group: m.Group may only repeat
	// it (else ErrGroupMismatch). When m.HostID is set and the key already
	// has a machine with that host id, that record is kept (its id, group,
	// kernel, reports) and gets m's token and hostname instead, taking no
	// other slot of the key's limit; the old token stops working. Read
	// the enrolled record with MachineByToken(m.TokenHash).
	Enroll(ctx context.Context, secretHash string, m Machine, now time.Time) (Key, error)
	MachineByToken(ctx context.Context, tokenHash string) (Machine, error)
	CountMachines(ctx context.Context, keyID string) (int, error)
	// Keys lists every enrollment key with its machine count.
	Keys(ctx context.Context) ([]KeyInfo, error)
	// RevokeKey stops key id from enrolling (a second revocation keeps
	// the first time). Its machines stay enrolled unless deleteMachines,
	// which deletes them as DeleteMachine does; it returns how many.
	RevokeKey(ctx context.Context, id string, now time.Time, deleteMachines bool) (int, error)
	// DeleteMachine removes a machine and everything it reported: its
	// token stops working at once and its reports leave every rollout's
	// counts.
	DeleteMachine(ctx context.Context, id string) error
	Fleet
	Console
	Close() error
}

// SQL is a Store over database/sql, for SQLite and PostgreSQL alike.
type SQL struct {
	db       *sql.DB
	postgres bool // $n placeholders and row locks
}

// q rewrites ? placeholders to PostgreSQL's $n.
func (s *SQL) q(query string) string {
	if !s.postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			fmt.Fprintf(&b, "$%d", n)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// OpenPostgres connects to dsn (several server replicas may share it) and
// migrates the schema.
func OpenPostgres(ctx context.Context, dsn string) (*SQL, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	// database/sql keeps only 2 idle connections by default, so a busy
	// server would reconnect all the time; bound the total instead (the
	// Debian default max_connections is 100, shared by replicas).
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	s := &SQL{db: db, postgres: true}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	return s, nil
}

// OpenSQLite opens (creating) the database at path and migrates it. The
// database holds token and key hashes: it is created 0600, and an older
// database more open than that is narrowed to it, with its -wal and -shm
// files (which SQLite creates with the database file's mode).
func OpenSQLite(ctx context.Context, path string) (*SQL, error) {
	if err := privateFiles(path); err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=foreign_keys(1)")
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	// One writer: SQLite serializes writes anyway, and this keeps
	// transactions from failing with SQLITE_BUSY.
	db.SetMaxOpenConns(1)
	s := &SQL{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return s, nil
}

// privateFiles creates the database file at path with mode 0600 when it
// is missing, and takes group and other permissions off it and its WAL
// files when they exist.
func privateFiles(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm", path + "-journal"} {
		fi, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o077 != 0 {
			if err := os.Chmod(p, fi.Mode().Perm()&0o700); err != nil {
				return err
			}
		}
	}
	return nil
}

// migrationLock is the PostgreSQL advisory lock key held while migrating
// (an arbitrary constant: "stitch" in ASCII).
const migrationLock = 0x737469746368

func (s *SQL) migrate(ctx context.Context) error {
	// One connection throughout: PostgreSQL's advisory lock belongs to the
	// session that took it.
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if s.postgres {
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, migrationLock); err != nil {
			return fmt.Errorf("migration lock: %w", err)
		}
		defer conn.ExecContext(context.Background(), `SELECT pg_advisory_unlock($1)`, migrationLock)
	}
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY)`); err != nil {
		return err
	}
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		var one int
		err := conn.QueryRowContext(ctx, s.q(`SELECT 1 FROM schema_migrations WHERE version = ?`), n).Scan(&one)
		if err == nil {
			continue
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		body, _ := migrations.ReadFile(n)
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		for _, stmt := range strings.Split(string(body), ";") {
			if strings.TrimSpace(stmt) == "" {
				continue
			}
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				tx.Rollback()
				return fmt.Errorf("migration %s: %w", n, err)
			}
		}
		if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO schema_migrations (version) VALUES (?)`), n); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	return nil
}

func unix(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

func fromUnix(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.Unix(v, 0).UTC()
}

func (s *SQL) CreateKey(ctx context.Context, k Key) error {
	if k.Group == "" {
		k.Group = DefaultGroup
	}
	if err := s.groupExists(ctx, s.db, k.Group); err != nil {
		return fmt.Errorf("create key %s: %w", k.ID, err)
	}
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO enrollment_keys (id, secret_hash, max_machines, expires_at, created_at, group_name) VALUES (?, ?, ?, ?, ?, ?)`),
		k.ID, k.SecretHash, k.MaxMachines, unix(k.ExpiresAt), unix(k.CreatedAt), k.Group)
	if err != nil {
		return fmt.Errorf("create key %s: %w", k.ID, err)
	}
	return nil
}

func (s *SQL) Enroll(ctx context.Context, secretHash string, m Machine, now time.Time) (Key, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return Key{}, err
	}
	defer tx.Rollback()
	k, err := scanKey(tx.QueryRowContext(ctx, s.q(keySelect+` WHERE secret_hash = ?`+s.lock()), secretHash))
	if errors.Is(err, sql.ErrNoRows) {
		return Key{}, fmt.Errorf("enrollment key: %w", ErrNotFound)
	}
	if err != nil {
		return Key{}, err
	}
	switch {
	case !k.RevokedAt.IsZero():
		return k, fmt.Errorf("key %s: %w on %s", k.ID, ErrRevoked, k.RevokedAt.Format(time.RFC3339))
	case !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt):
		return k, fmt.Errorf("key %s: %w on %s", k.ID, ErrExpired, k.ExpiresAt.Format(time.RFC3339))
	case m.Group != "" && m.Group != k.Group:
		return k, fmt.Errorf("key %s: %w: it enrolls into group %q, not %q", k.ID, ErrGroupMismatch, k.Group, m.Group)
	}
	if m.HostID != "" {
		// The same host enrolling again: its record takes the new token.
		var id string
		err := tx.QueryRowContext(ctx, s.q(`SELECT id FROM machines WHERE key_id = ? AND host_id = ?`), k.ID, m.HostID).Scan(&id)
		switch {
		case err == nil:
			if _, err := tx.ExecContext(ctx, s.q(`UPDATE machines SET token_hash = ?, hostname = ?, enrolled_at = ? WHERE id = ?`),
				m.TokenHash, m.Hostname, unix(now), id); err != nil {
				return k, fmt.Errorf("re-enroll %s: %w", id, err)
			}
			return k, tx.Commit()
		case !errors.Is(err, sql.ErrNoRows):
			return k, fmt.Errorf("enroll %s: %w", m.ID, err)
		}
	}
	var n int
	if err := tx.QueryRowContext(ctx, s.q(`SELECT COUNT(*) FROM machines WHERE key_id = ?`), k.ID).Scan(&n); err != nil {
		return k, err
	}
	if n >= k.MaxMachines {
		return k, fmt.Errorf("key %s: %w: %d of %d machines enrolled", k.ID, ErrLimit, n, k.MaxMachines)
	}
	if err := s.groupExists(ctx, tx, k.Group); err != nil {
		return k, fmt.Errorf("enroll %s: %w", m.ID, err)
	}
	if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO machines (id, key_id, token_hash, hostname, host_id, enrolled_at, group_name) VALUES (?, ?, ?, ?, ?, ?, ?)`),
		m.ID, k.ID, m.TokenHash, m.Hostname, m.HostID, unix(now), k.Group); err != nil {
		return k, fmt.Errorf("enroll %s: %w", m.ID, err)
	}
	return k, tx.Commit()
}

const (
	keyColumns = `id, secret_hash, max_machines, expires_at, created_at, group_name, revoked_at`
	keySelect  = `SELECT ` + keyColumns + ` FROM enrollment_keys`
)

// scanKey reads keyColumns, and the columns after them into extra.
func scanKey(row interface{ Scan(...any) error }, extra ...any) (Key, error) {
	var k Key
	var exp, created, revoked int64
	err := row.Scan(append([]any{&k.ID, &k.SecretHash, &k.MaxMachines, &exp, &created, &k.Group, &revoked}, extra...)...)
	k.ExpiresAt, k.CreatedAt, k.RevokedAt = fromUnix(exp), fromUnix(created), fromUnix(revoked)
	return k, err
}

func (s *SQL) Keys(ctx context.Context) ([]KeyInfo, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+keyColumns+`, (SELECT COUNT(*) FROM machines m WHERE m.key_id = enrollment_keys.id)
		FROM enrollment_keys ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("keys: %w", err)
	}
	defer rows.Close()
	var out []KeyInfo
	for rows.Next() {
		var ki KeyInfo
		var err error
		if ki.Key, err = scanKey(rows, &ki.Machines); err != nil {
			return nil, fmt.Errorf("keys: %w", err)
		}
		out = append(out, ki)
	}
	return out, rows.Err()
}

func (s *SQL) RevokeKey(ctx context.Context, id string, now time.Time, deleteMachines bool) (int, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("revoke key %s: %w", id, err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, s.q(`UPDATE enrollment_keys SET revoked_at = CASE WHEN revoked_at = 0 THEN ? ELSE revoked_at END WHERE id = ?`), unix(now), id)
	if err != nil {
		return 0, fmt.Errorf("revoke key %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return 0, fmt.Errorf("key %s: %w", id, ErrNotFound)
	}
	n := 0
	if deleteMachines {
		if n, err = s.deleteMachines(ctx, tx, `key_id = ?`, id); err != nil {
			return 0, fmt.Errorf("revoke key %s: %w", id, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("revoke key %s: %w", id, err)
	}
	return n, nil
}

func (s *SQL) DeleteMachine(ctx context.Context, id string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("delete machine %s: %w", id, err)
	}
	defer tx.Rollback()
	n, err := s.deleteMachines(ctx, tx, `id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete machine %s: %w", id, err)
	}
	if n == 0 {
		return fmt.Errorf("machine %s: %w", id, ErrNotFound)
	}
	return tx.Commit()
}

// deleteMachines deletes the machines that match where (over machines'
// columns, one ? for arg) with every row that refers to them, and says
// how many machines went. Their rollout rows go too, so a deleted
// machine's reports no longer count in any rollout.
func (s *SQL) deleteMachines(ctx context.Context, tx *sql.Tx, where string, arg any) (int, error) {
	sub := `SELECT id FROM machines WHERE ` + where
	for _, table := range []string{"health_reports", "rollout_machines", "machine_patches"} {
		if _, err := tx.ExecContext(ctx, s.q(`DELETE FROM `+table+` WHERE machine_id IN (`+sub+`)`), arg); err != nil {
			return 0, fmt.Errorf("%s: %w", table, err)
		}
	}
	res, err := tx.ExecContext(ctx, s.q(`DELETE FROM machines WHERE `+where), arg)
	if err != nil {
		return 0, fmt.Errorf("machines: %w", err)
	}
	n, err := res.RowsAffected()
	return int(n), err
}

// machineSelect reads a machine with its group's channel settings.
const machineSelect = `SELECT m.id, m.key_id, m.token_hash, m.hostname, m.host_id, m.enrolled_at, m.group_name,
	m.kernel_release, m.kernel_build_id, m.agent_version, m.unsupported, m.last_checkin, g.channel, c.delay_seconds, c.cutoff, g.pin
	FROM machines m JOIN machine_groups g ON g.name = m.group_name JOIN channels c ON c.name = g.channel`

func scanMachine(row interface{ Scan(...any) error }) (Machine, error) {
	var m Machine
	var at, last, delay, cutoff, pin int64
	err := row.Scan(&m.ID, &m.KeyID, &m.TokenHash, &m.Hostname, &m.HostID, &at, &m.Group,
		&m.KernelRelease, &m.KernelBuildID, &m.AgentVersion, &m.Unsupported, &last, &m.Channel, &delay, &cutoff, &pin)
	m.EnrolledAt, m.LastCheckIn = fromUnix(at), fromUnix(last)
	m.Delay, m.Cutoff, m.Pin = time.Duration(delay)*time.Second, fromUnix(cutoff), fromUnix(pin)
	return m, err
}

func (s *SQL) MachineByToken(ctx context.Context, tokenHash string) (Machine, error) {
	m, err := scanMachine(s.db.QueryRowContext(ctx, s.q(machineSelect+` WHERE m.token_hash = ?`), tokenHash))
	if errors.Is(err, sql.ErrNoRows) {
		return Machine{}, ErrNotFound
	}
	return m, err
}

func (s *SQL) CountMachines(ctx context.Context, keyID string) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, s.q(`SELECT COUNT(*) FROM machines WHERE key_id = ?`), keyID).Scan(&n)
	return n, err
}

// lock serializes enrollments under one key on PostgreSQL, so replicas
// cannot both pass the limit check; SQLite has one writer anyway.
func (s *SQL) lock() string {
	if s.postgres {
		return " FOR UPDATE"
	}
	return ""
}

func (s *SQL) Close() error { return s.db.Close() }

// groupExists returns ErrUnknownGroup for a group that does not exist.
func (s *SQL) groupExists(ctx context.Context, db interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, name string) error {
	var one int
	err := db.QueryRowContext(ctx, s.q(`SELECT 1 FROM machine_groups WHERE name = ?`), name).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%q: %w", name, ErrUnknownGroup)
	}
	return err
}
