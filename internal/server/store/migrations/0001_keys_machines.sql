CREATE TABLE enrollment_keys (
	id          TEXT PRIMARY KEY,
	secret_hash TEXT NOT NULL UNIQUE,
	max_machines INTEGER NOT NULL,
	expires_at  BIGINT NOT NULL DEFAULT 0,
	created_at  BIGINT NOT NULL
);
CREATE TABLE machines (
	id          TEXT PRIMARY KEY,
	key_id      TEXT NOT NULL REFERENCES enrollment_keys(id),
	token_hash  TEXT NOT NULL UNIQUE,
	hostname    TEXT NOT NULL,
	enrolled_at BIGINT NOT NULL
);
CREATE INDEX machines_key ON machines(key_id);
