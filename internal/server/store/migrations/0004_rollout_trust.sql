CREATE TABLE patch_offers (
	target     TEXT NOT NULL REFERENCES patches(target),
	machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
	offered_at BIGINT NOT NULL,
	PRIMARY KEY (target, machine_id)
);
INSERT INTO patch_offers (target, machine_id, offered_at) SELECT target, machine_id, applied_at FROM rollout_machines;
ALTER TABLE rollout_machines ADD COLUMN last_report BIGINT NOT NULL DEFAULT 0;
UPDATE rollout_machines SET last_report = applied_at;
ALTER TABLE patches ADD COLUMN tolerated INTEGER NOT NULL DEFAULT 0
