-- The fleet gauges of /metrics count machines by index, never by
-- reading every row: stale and never-checked-in machines by their last
-- check-in (the console's index of the same name and definition, made
-- here too if it is not there), unsupported ones from an index holding
-- only them.
CREATE INDEX IF NOT EXISTS machines_last_checkin ON machines(last_checkin);
CREATE INDEX machines_unsupported ON machines(id) WHERE unsupported <> '';
