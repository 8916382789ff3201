ALTER TABLE enrollment_keys ADD COLUMN revoked_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN host_id TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX machines_key_host ON machines(key_id, host_id) WHERE host_id <> ''
