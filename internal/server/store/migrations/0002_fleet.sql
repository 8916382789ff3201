CREATE TABLE channels (
	name          TEXT PRIMARY KEY,
	delay_seconds BIGINT NOT NULL DEFAULT 0,
	cutoff        BIGINT NOT NULL DEFAULT 0
);
INSERT INTO channels (name, delay_seconds) VALUES ('canary', 0), ('main', 86400), ('stable', 604800);
CREATE TABLE machine_groups (
	name    TEXT PRIMARY KEY,
	channel TEXT NOT NULL REFERENCES channels(name),
	pin     BIGINT NOT NULL DEFAULT 0
);
INSERT INTO machine_groups (name, channel) VALUES ('default', 'main');
ALTER TABLE enrollment_keys ADD COLUMN group_name TEXT NOT NULL DEFAULT 'default';
ALTER TABLE machines ADD COLUMN group_name TEXT NOT NULL DEFAULT 'default';
ALTER TABLE machines ADD COLUMN kernel_release TEXT NOT NULL DEFAULT '';
ALTER TABLE machines ADD COLUMN kernel_build_id TEXT NOT NULL DEFAULT '';
ALTER TABLE machines ADD COLUMN agent_version TEXT NOT NULL DEFAULT '';
ALTER TABLE machines ADD COLUMN last_checkin BIGINT NOT NULL DEFAULT 0;
CREATE INDEX machines_kernel ON machines(kernel_release, kernel_build_id);
CREATE TABLE machine_patches (
	machine_id TEXT NOT NULL REFERENCES machines(id),
	target     TEXT NOT NULL,
	name       TEXT NOT NULL,
	state      TEXT NOT NULL,
	since      BIGINT NOT NULL,
	reason     TEXT NOT NULL DEFAULT '',
	PRIMARY KEY (machine_id, target)
);
CREATE TABLE patches (
	target          TEXT PRIMARY KEY,
	name            TEXT NOT NULL,
	kernel_release  TEXT NOT NULL,
	kernel_build_id TEXT NOT NULL,
	cves            TEXT NOT NULL DEFAULT '',
	description     TEXT NOT NULL DEFAULT '',
	registered_at   BIGINT NOT NULL,
	stage           INTEGER NOT NULL DEFAULT 0,
	state           TEXT NOT NULL,
	reason          TEXT NOT NULL DEFAULT '',
	updated_at      BIGINT NOT NULL
);
CREATE INDEX patches_kernel ON patches(kernel_release, kernel_build_id);
CREATE TABLE rollout_machines (
	target     TEXT NOT NULL REFERENCES patches(target),
	machine_id TEXT NOT NULL REFERENCES machines(id),
	applied_at BIGINT NOT NULL,
	checks     INTEGER NOT NULL DEFAULT 0,
	failed     INTEGER NOT NULL DEFAULT 0,
	reason     TEXT NOT NULL DEFAULT '',
	PRIMARY KEY (target, machine_id)
);
CREATE TABLE health_reports (
	target     TEXT NOT NULL,
	machine_id TEXT NOT NULL REFERENCES machines(id),
	check_name TEXT NOT NULL,
	healthy    INTEGER NOT NULL,
	reason     TEXT NOT NULL DEFAULT '',
	detail     TEXT NOT NULL DEFAULT '',
	at         BIGINT NOT NULL,
	PRIMARY KEY (target, machine_id, check_name)
)
