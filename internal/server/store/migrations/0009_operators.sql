CREATE TABLE operators (
	name TEXT PRIMARY KEY,
	role TEXT NOT NULL,
	token_hash TEXT NOT NULL UNIQUE,
	created_at BIGINT NOT NULL,
	revoked_at BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE console_sessions (
	id_hash TEXT PRIMARY KEY,
	operator TEXT NOT NULL,
	csrf TEXT NOT NULL,
	expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions(expires_at);
CREATE TABLE audit_log (
	at_ns BIGINT NOT NULL,
	id TEXT NOT NULL,
	actor TEXT NOT NULL,
	action TEXT NOT NULL,
	target TEXT NOT NULL,
	detail TEXT NOT NULL,
	remote TEXT NOT NULL,
	status INTEGER NOT NULL,
	PRIMARY KEY (at_ns, id)
);
CREATE INDEX audit_log_actor ON audit_log(actor, at_ns);
CREATE INDEX machines_last_checkin ON machines(last_checkin);
CREATE INDEX machines_hostname ON machines(hostname);
CREATE INDEX health_reports_machine ON health_reports(machine_id, at)
