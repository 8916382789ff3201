ALTER TABLE patches ADD COLUMN level_stream TEXT NOT NULL DEFAULT '';
ALTER TABLE patches ADD COLUMN level_number INTEGER NOT NULL DEFAULT 0;
ALTER TABLE patches ADD COLUMN level_supersedes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE patches ADD COLUMN level_withdrawn TEXT NOT NULL DEFAULT '';
ALTER TABLE patches ADD COLUMN fixes TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX patches_level ON patches(kernel_release, kernel_build_id, level_stream, level_number) WHERE level_stream <> ''
