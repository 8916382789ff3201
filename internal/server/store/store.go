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
	Group       string // machines enrolled with it join this group
}

// Machine is an enrolled machine, with what its last check-in said and
// what its group's channel makes of patch eligibility.
type Machine struct {
	ID, KeyID, TokenHash, Hostname string
	EnrolledAt                     time.Time
	Group                          string
	KernelRelease, KernelBuildID   string
	AgentVersion                   string
	LastCheckIn                    time.Time
	// From the machine's group and channel (read-only here).
	Channel     string
	Delay       time.Duration // the channel's deploy delay
	Cutoff, Pin time.Time     // zero: none
}

// Store is the storage interface the server uses.
type Store interface {
	CreateKey(ctx context.Context, k Key) error
	// Enroll adds m under the key whose secret hashes to secretHash,
	// atomically checking the key's expiry and machine limit at now.
	Enroll(ctx context.Context, secretHash string, m Machine, now time.Time) (Key, error)
	MachineByToken(ctx context.Context, tokenHash string) (Machine, error)
	CountMachines(ctx context.Context, keyID string) (int, error)
	Fleet
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

// OpenSQLite opens (creating) the database at path and migrates it.
func OpenSQLite(ctx context.Context, path string) (*SQL, error) {
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
	var k Key
	var exp, created int64
	err = tx.QueryRowContext(ctx, s.q(`SELECT id, secret_hash, max_machines, expires_at, created_at, group_name FROM enrollment_keys WHERE secret_hash = ?`+s.lock()), secretHash).
		Scan(&k.ID, &k.SecretHash, &k.MaxMachines, &exp, &created, &k.Group)
	if errors.Is(err, sql.ErrNoRows) {
		return Key{}, fmt.Errorf("enrollment key: %w", ErrNotFound)
	}
	if err != nil {
		return Key{}, err
	}
	k.ExpiresAt, k.CreatedAt = fromUnix(exp), fromUnix(created)
	if !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt) {
		return k, fmt.Errorf("key %s: %w on %s", k.ID, ErrExpired, k.ExpiresAt.Format(time.RFC3339))
	}
	var n int
	if err := tx.QueryRowContext(ctx, s.q(`SELECT COUNT(*) FROM machines WHERE key_id = ?`), k.ID).Scan(&n); err != nil {
		return k, err
	}
	if n >= k.MaxMachines {
		return k, fmt.Errorf("key %s: %w: %d of %d machines enrolled", k.ID, ErrLimit, n, k.MaxMachines)
	}
	if m.Group == "" {
		m.Group = k.Group
	}
	if err := s.groupExists(ctx, tx, m.Group); err != nil {
		return k, fmt.Errorf("enroll %s: %w", m.ID, err)
	}
	if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO machines (id, key_id, token_hash, hostname, enrolled_at, group_name) VALUES (?, ?, ?, ?, ?, ?)`),
		m.ID, k.ID, m.TokenHash, m.Hostname, unix(now), m.Group); err != nil {
		return k, fmt.Errorf("enroll %s: %w", m.ID, err)
	}
	return k, tx.Commit()
}

// machineSelect reads a machine with its group's channel settings.
const machineSelect = `SELECT m.id, m.key_id, m.token_hash, m.hostname, m.enrolled_at, m.group_name,
	m.kernel_release, m.kernel_build_id, m.agent_version, m.last_checkin, g.channel, c.delay_seconds, c.cutoff, g.pin
	FROM machines m JOIN machine_groups g ON g.name = m.group_name JOIN channels c ON c.name = g.channel`

func scanMachine(row interface{ Scan(...any) error }) (Machine, error) {
	var m Machine
	var at, last, delay, cutoff, pin int64
	err := row.Scan(&m.ID, &m.KeyID, &m.TokenHash, &m.Hostname, &at, &m.Group,
		&m.KernelRelease, &m.KernelBuildID, &m.AgentVersion, &last, &m.Channel, &delay, &cutoff, &pin)
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
