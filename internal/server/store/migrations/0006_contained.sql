CREATE TABLE contained (
	target          TEXT PRIMARY KEY,
	name            TEXT NOT NULL,
	kernel_release  TEXT NOT NULL,
	kernel_build_id TEXT NOT NULL,
	cves            TEXT NOT NULL DEFAULT '',
	upstream        TEXT NOT NULL DEFAULT '',
	checked_at      BIGINT NOT NULL DEFAULT 0,
	learned_at      BIGINT NOT NULL
);
CREATE INDEX contained_kernel ON contained(kernel_release, kernel_build_id);
ALTER TABLE patches ADD COLUMN upstream TEXT NOT NULL DEFAULT ''
