-- loraplex metadata. Times are Unix milliseconds; JSON columns hold serde_json of the
-- Rust types named beside them. Every row that a tenant can see carries tenant_id, and
-- every lookup filters by it.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL
);

-- Tinker client sessions (heartbeats keep them alive).
CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY NOT NULL,
    tenant_id          TEXT NOT NULL,
    created_ms         INTEGER NOT NULL,
    last_heartbeat_ms  INTEGER NOT NULL
);
CREATE INDEX sessions_tenant ON sessions (tenant_id);

-- Training runs: one LoRA adapter each.
CREATE TABLE models (
    id                 TEXT PRIMARY KEY NOT NULL,
    tenant_id          TEXT NOT NULL,
    session_id         TEXT,
    base_model         TEXT NOT NULL,
    lora_config        TEXT NOT NULL,             -- lora::LoraConfig
    step               INTEGER NOT NULL DEFAULT 0,
    newest_checkpoint  TEXT,                      -- a tinker:// path
    deleted            INTEGER NOT NULL DEFAULT 0,
    created_ms         INTEGER NOT NULL
);
CREATE INDEX models_tenant ON models (tenant_id);

CREATE TABLE futures (
    id              TEXT PRIMARY KEY NOT NULL,
    tenant_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,                -- jobs::JobKind
    state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    tokens_done     INTEGER NOT NULL DEFAULT 0,
    tokens_total    INTEGER NOT NULL DEFAULT 0,
    result          TEXT,                         -- jobs::JobOutput, when done
    error_message   TEXT,                         -- when failed
    error_category  TEXT CHECK (error_category IN ('user', 'server')),
    created_ms      INTEGER NOT NULL,
    finished_ms     INTEGER,
    fetched_ms      INTEGER                       -- first time a caller read the outcome
);
CREATE INDEX futures_state ON futures (state);
CREATE INDEX futures_fetched ON futures (fetched_ms) WHERE fetched_ms IS NOT NULL;

CREATE TABLE checkpoints (
    path        TEXT PRIMARY KEY NOT NULL,        -- tinker://model/weights/name
    model_id    TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('training', 'sampler')),
    dir         TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL,
    step        INTEGER NOT NULL DEFAULT 0,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER
);
CREATE INDEX checkpoints_model ON checkpoints (tenant_id, model_id);
CREATE INDEX checkpoints_expiry ON checkpoints (expires_ms) WHERE expires_ms IS NOT NULL;

CREATE TABLE sampling_sessions (
    id               TEXT PRIMARY KEY NOT NULL,
    tenant_id        TEXT NOT NULL,
    model_id         TEXT,                        -- NULL: the base model
    base_model       TEXT NOT NULL,
    checkpoint_path  TEXT,
    created_ms       INTEGER NOT NULL
);
CREATE INDEX sampling_sessions_tenant ON sampling_sessions (tenant_id);

CREATE TABLE plugins (
    tenant_id     TEXT NOT NULL,
    content_hash  TEXT NOT NULL,                  -- hex SHA-256 of the component
    kind          TEXT NOT NULL,                  -- loss | sampler
    created_ms    INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, content_hash)
);
