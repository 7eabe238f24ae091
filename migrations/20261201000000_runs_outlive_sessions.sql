-- Training runs outlive their sessions: unloading a run (its session ended) keeps its row
-- (loaded = 0), listable with its checkpoints until it is deleted (deleted = 1). Clients'
-- user_metadata (jobs::UserMetadata, JSON) on runs, sessions and checkpoints. Ended
-- sessions keep their row (ended_ms) so they stay listable. Checkpoints can be published
-- (readable by every tenant) and have a third kind, 'external' (PEFT download).

ALTER TABLE models ADD COLUMN user_metadata TEXT;
ALTER TABLE models ADD COLUMN loaded INTEGER NOT NULL DEFAULT 1;
ALTER TABLE models ADD COLUMN last_request_ms INTEGER;
CREATE INDEX models_session ON models (tenant_id, session_id);

ALTER TABLE sessions ADD COLUMN user_metadata TEXT;
ALTER TABLE sessions ADD COLUMN display_name TEXT;
ALTER TABLE sessions ADD COLUMN ended_ms INTEGER;

-- SQLite cannot change a CHECK constraint in place: rebuild the table.
CREATE TABLE checkpoints_v2 (
    path           TEXT PRIMARY KEY NOT NULL,     -- tinker://model/weights/name
    model_id       TEXT NOT NULL,
    tenant_id      TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('training', 'sampler', 'external')),
    dir            TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    step           INTEGER NOT NULL DEFAULT 0,
    created_ms     INTEGER NOT NULL,
    expires_ms     INTEGER,
    public         INTEGER NOT NULL DEFAULT 0,
    user_metadata  TEXT
);
INSERT INTO checkpoints_v2 (path, model_id, tenant_id, kind, dir, size_bytes, step, created_ms, expires_ms)
    SELECT path, model_id, tenant_id, kind, dir, size_bytes, step, created_ms, expires_ms FROM checkpoints;
DROP TABLE checkpoints;
ALTER TABLE checkpoints_v2 RENAME TO checkpoints;
CREATE INDEX checkpoints_model ON checkpoints (tenant_id, model_id);
CREATE INDEX checkpoints_expiry ON checkpoints (expires_ms) WHERE expires_ms IS NOT NULL;
