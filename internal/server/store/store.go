// Package store keeps the server's fleet state behind one interface, with
// an embedded SQLite implementation that needs no set-up. Schema migrations
// are versioned SQL files in migrations/, applied in order at open.
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
)

// Key is an enrollment key (the secret is stored only as a hash).
type Key struct {
	ID          string
	SecretHash  string
	MaxMachines int
	ExpiresAt   time.Time // zero: never
	CreatedAt   time.Time
}

// Machine is an enrolled machine.
type Machine struct {
	ID, KeyID, TokenHash, Hostname string
	EnrolledAt                     time.Time
}

// Store is the storage interface the server uses.
type Store interface {
	CreateKey(ctx context.Context, k Key) error
	// Enroll adds m under the key whose secret hashes to secretHash,
	// atomically checking the key's expiry and machine limit at now.
	Enroll(ctx context.Context, secretHash string, m Machine, now time.Time) (Key, error)
	MachineByToken(ctx context.Context, tokenHash string) (Machine, error)
	CountMachines(ctx context.Context, keyID string) (int, error)
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
	s := &SQL{db: db, postgres: true}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	return s, nil
}

// OpenSQLite opens (creating) the database at path and migrates it.
func OpenSQLite(ctx context.Context, path string) (*SQL, error) {
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)")
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

func (s *SQL) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, s.q(`CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY)`)); err != nil {
		return err
	}
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		var one int
		err := s.db.QueryRowContext(ctx, s.q(`SELECT 1 FROM schema_migrations WHERE version = ?`), n).Scan(&one)
		if err == nil {
			continue
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		body, _ := migrations.ReadFile(n)
		tx, err := s.db.BeginTx(ctx, nil)
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
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO enrollment_keys (id, secret_hash, max_machines, expires_at, created_at) VALUES (?, ?, ?, ?, ?)`),
		k.ID, k.SecretHash, k.MaxMachines, unix(k.ExpiresAt), unix(k.CreatedAt))
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
	err = tx.QueryRowContext(ctx, s.q(`SELECT id, secret_hash, max_machines, expires_at, created_at FROM enrollment_keys WHERE secret_hash = ?`+s.lock()), secretHash).
		Scan(&k.ID, &k.SecretHash, &k.MaxMachines, &exp, &created)
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
	if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO machines (id, key_id, token_hash, hostname, enrolled_at) VALUES (?, ?, ?, ?, ?)`),
		m.ID, k.ID, m.TokenHash, m.Hostname, unix(now)); err != nil {
		return k, fmt.Errorf("enroll %s: %w", m.ID, err)
	}
	return k, tx.Commit()
}

func (s *SQL) MachineByToken(ctx context.Context, tokenHash string) (Machine, error) {
	var m Machine
	var at int64
	err := s.db.QueryRowContext(ctx, s.q(`SELECT id, key_id, token_hash, hostname, enrolled_at FROM machines WHERE token_hash = ?`), tokenHash).
		Scan(&m.ID, &m.KeyID, &m.TokenHash, &m.Hostname, &at)
	if errors.Is(err, sql.ErrNoRows) {
		return Machine{}, ErrNotFound
	}
	m.EnrolledAt = fromUnix(at)
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
