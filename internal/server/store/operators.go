package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Operator is a person (or a tool, such as Prometheus) holding a named
// token with a role; the server decides what each role may do.
type Operator struct {
	Name      string
	Role      string
	TokenHash string
	CreatedAt time.Time
	RevokedAt time.Time // zero while the token works
}

// Session is a console login: a cookie whose hash is IDHash, and the
// CSRF token every form of that session carries.
type Session struct {
	IDHash    string
	Operator  string
	CSRF      string
	ExpiresAt time.Time
}

// AuditEntry is one operator action, done or refused.
type AuditEntry struct {
	At     time.Time
	ID     string // tells entries of one instant apart
	Actor  string // the operator's name
	Action string // what was asked, e.g. "rollout halt"
	Target string // what it was asked of: a patch, a key, a machine
	Detail string // the request's parameters (a reason, a delay)
	Remote string // the client's address
	Status int    // the HTTP status answered
}

// Console stores operators, console sessions and the audit log, and
// answers the console's queries.
type Console interface {
	// CreateOperator adds o; ErrExists if its name is taken.
	CreateOperator(ctx context.Context, o Operator) error
	Operators(ctx context.Context) ([]Operator, error)
	// OperatorByToken finds the operator whose token hashes to
	// tokenHash, revoked or not; ErrNotFound if none.
	OperatorByToken(ctx context.Context, tokenHash string) (Operator, error)
	// OperatorByName finds the operator name; ErrNotFound if none.
	OperatorByName(ctx context.Context, name string) (Operator, error)
	// RevokeOperator stops name's token and ends its sessions.
	RevokeOperator(ctx context.Context, name string, now time.Time) error
	CreateSession(ctx context.Context, s Session) error
	// Session finds a session that has not expired at now.
	Session(ctx context.Context, idHash string, now time.Time) (Session, error)
	// DeleteSession ends a session, and every expired one.
	DeleteSession(ctx context.Context, idHash string, now time.Time) error
	Audit(ctx context.Context, e AuditEntry) error
	// AuditLog lists at most limit entries older than before (all if
	// zero), newest first; of actor only if actor is not empty.
	AuditLog(ctx context.Context, actor string, before time.Time, limit int) ([]AuditEntry, error)

	// The console's queries (console.go).
	MachinesPage(ctx context.Context, q MachineQuery) ([]Machine, int, error)
	MachineByID(ctx context.Context, id string) (Machine, error)
	KernelCounts(ctx context.Context, staleBefore time.Time) ([]KernelCount, error)
	HealthReports(ctx context.Context, target, machineID string, limit int) ([]HealthReport, error)
}

func (s *SQL) CreateOperator(ctx context.Context, o Operator) error {
	var one int
	err := s.db.QueryRowContext(ctx, s.q(`SELECT 1 FROM operators WHERE name = ?`), o.Name).Scan(&one)
	switch {
	case err == nil:
		return fmt.Errorf("operator %s: %w", o.Name, ErrExists)
	case !errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("operator %s: %w", o.Name, err)
	}
	if _, err := s.db.ExecContext(ctx, s.q(`INSERT INTO operators (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)`),
		o.Name, o.Role, o.TokenHash, unix(o.CreatedAt)); err != nil {
		return fmt.Errorf("operator %s: %w", o.Name, err)
	}
	return nil
}

const operatorSelect = `SELECT name, role, token_hash, created_at, revoked_at FROM operators`

func scanOperator(row interface{ Scan(...any) error }) (Operator, error) {
	var o Operator
	var created, revoked int64
	err := row.Scan(&o.Name, &o.Role, &o.TokenHash, &created, &revoked)
	o.CreatedAt, o.RevokedAt = fromUnix(created), fromUnix(revoked)
	return o, err
}

func (s *SQL) Operators(ctx context.Context) ([]Operator, error) {
	rows, err := s.db.QueryContext(ctx, operatorSelect+` ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("operators: %w", err)
	}
	defer rows.Close()
	var out []Operator
	for rows.Next() {
		o, err := scanOperator(rows)
		if err != nil {
			return nil, fmt.Errorf("operators: %w", err)
		}
		out = append(out, o)
	}
	return out, rows.Err()
}

func (s *SQL) operator(ctx context.Context, where string, arg string) (Operator, error) {
	o, err := scanOperator(s.db.QueryRowContext(ctx, s.q(operatorSelect+where), arg))
	if errors.Is(err, sql.ErrNoRows) {
		return Operator{}, ErrNotFound
	}
	return o, err
}

func (s *SQL) OperatorByToken(ctx context.Context, tokenHash string) (Operator, error) {
	return s.operator(ctx, ` WHERE token_hash = ?`, tokenHash)
}

func (s *SQL) OperatorByName(ctx context.Context, name string) (Operator, error) {
	return s.operator(ctx, ` WHERE name = ?`, name)
}

func (s *SQL) RevokeOperator(ctx context.Context, name string, now time.Time) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("revoke operator %s: %w", name, err)
	}
	defer tx.Rollback()
	var revoked int64
	switch err := tx.QueryRowContext(ctx, s.q(`SELECT revoked_at FROM operators WHERE name = ?`), name).Scan(&revoked); {
	case errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("operator %s: %w", name, ErrNotFound)
	case err != nil:
		return fmt.Errorf("revoke operator %s: %w", name, err)
	}
	if revoked == 0 { // a second revocation keeps the first time
		if _, err := tx.ExecContext(ctx, s.q(`UPDATE operators SET revoked_at = ? WHERE name = ?`), unix(now), name); err != nil {
			return fmt.Errorf("revoke operator %s: %w", name, err)
		}
	}
	if _, err := tx.ExecContext(ctx, s.q(`DELETE FROM console_sessions WHERE operator = ?`), name); err != nil {
		return fmt.Errorf("revoke operator %s: %w", name, err)
	}
	return tx.Commit()
}

func (s *SQL) CreateSession(ctx context.Context, se Session) error {
	if _, err := s.db.ExecContext(ctx, s.q(`INSERT INTO console_sessions (id_hash, operator, csrf, expires_at) VALUES (?, ?, ?, ?)`),
		se.IDHash, se.Operator, se.CSRF, unix(se.ExpiresAt)); err != nil {
		return fmt.Errorf("session: %w", err)
	}
	return nil
}

func (s *SQL) Session(ctx context.Context, idHash string, now time.Time) (Session, error) {
	var se Session
	var exp int64
	err := s.db.QueryRowContext(ctx, s.q(`SELECT id_hash, operator, csrf, expires_at FROM console_sessions WHERE id_hash = ? AND expires_at > ?`), idHash, unix(now)).
		Scan(&se.IDHash, &se.Operator, &se.CSRF, &exp)
	if errors.Is(err, sql.ErrNoRows) {
		return Session{}, ErrNotFound
	}
	se.ExpiresAt = fromUnix(exp)
	return se, err
}

func (s *SQL) DeleteSession(ctx context.Context, idHash string, now time.Time) error {
	if _, err := s.db.ExecContext(ctx, s.q(`DELETE FROM console_sessions WHERE id_hash = ? OR expires_at <= ?`), idHash, unix(now)); err != nil {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}

func (s *SQL) Audit(ctx context.Context, e AuditEntry) error {
	if _, err := s.db.ExecContext(ctx, s.q(`INSERT INTO audit_log (at_ns, id, actor, action, target, detail, remote, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`),
		e.At.UnixNano(), e.ID, e.Actor, e.Action, e.Target, e.Detail, e.Remote, e.Status); err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	return nil
}

func (s *SQL) AuditLog(ctx context.Context, actor string, before time.Time, limit int) ([]AuditEntry, error) {
	q, args := `SELECT at_ns, id, actor, action, target, detail, remote, status FROM audit_log WHERE at_ns < ?`, []any{int64(1<<63 - 1)}
	if !before.IsZero() {
		args[0] = before.UnixNano()
	}
	if actor != "" {
		q, args = q+` AND actor = ?`, append(args, actor)
	}
	rows, err := s.db.QueryContext(ctx, s.q(q+` ORDER BY at_ns DESC, id DESC LIMIT ?`), append(args, limit)...)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	defer rows.Close()
	var out []AuditEntry
	for rows.Next() {
		var e AuditEntry
		var at int64
		if err := rows.Scan(&at, &e.ID, &e.Actor, &e.Action, &e.Target, &e.Detail, &e.Remote, &e.Status); err != nil {
			return nil, fmt.Errorf("audit log: %w", err)
		}
		e.At = time.Unix(0, at).UTC()
		out = append(out, e)
	}
	return out, rows.Err()
}
