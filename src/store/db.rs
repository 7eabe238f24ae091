//! The metadata database: SQLite through sqlx, in WAL mode with `synchronous = FULL` (a
//! committed write survives a crash), migrations from `migrations/` embedded and run at
//! open. One typed async function per question the server asks; queries are checked at run
//! time, so building needs no database.
//!
//! Every lookup of a tenant's object filters by tenant: another tenant's id reads as
//! NotFound, never "forbidden". This module stores what it is told; it never decides (the
//! engine and the API do) and never touches checkpoint files.

use super::checkpoint::CheckpointKind;
use super::error::{Result, StoreError};
use crate::error::Category;
use crate::jobs::future::Progress;
use crate::jobs::history::{MetricPoint, PointKind};
use crate::jobs::{
    AdapterId, FutureId, FutureRecord, JobFailure, JobKind, JobOutput, JobState, SessionId,
    TenantId, UserMetadata,
};
use crate::lora::LoraConfig;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Executor, Row, Sqlite};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What a future that was pending or running when the server stopped fails with.
pub const RESTARTED_MESSAGE: &str = "the server restarted before this request finished";

/// A Tinker client session (heartbeats keep it alive). Not a sampling session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientSessionId(pub String);

impl std::fmt::Display for ClientSessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecord {
    pub id: TenantId,
    pub name: String,
    pub created: SystemTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: ClientSessionId,
    pub tenant: TenantId,
    pub created: SystemTime,
    pub last_heartbeat: SystemTime,
    pub user_metadata: Option<UserMetadata>,
    pub display_name: Option<String>,
    /// When it was finished or reaped; `None` while open.
    pub ended: Option<SystemTime>,
}

/// A training run: one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    pub id: AdapterId,
    pub tenant: TenantId,
    pub session: Option<ClientSessionId>,
    pub base_model: String,
    pub lora_config: LoraConfig,
    pub step: u64,
    /// `tinker://` path of the newest checkpoint.
    pub newest_checkpoint: Option<String>,
    pub deleted: bool,
    pub created: SystemTime,
    pub user_metadata: Option<UserMetadata>,
    /// In memory (brought back after a restart); an unloaded run is only listed.
    pub loaded: bool,
    /// When it last got work, as of when it was unloaded or stepped.
    pub last_request: Option<SystemTime>,
}

/// A future as stored, with when it finished and when its outcome was first fetched.
#[derive(Debug, Clone)]
pub struct StoredFuture {
    pub record: FutureRecord,
    pub finished: Option<SystemTime>,
    pub fetched: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    /// `tinker://{model}/weights/{name}` or `…/sampler_weights/{name}`.
    pub path: String,
    pub model: AdapterId,
    pub tenant: TenantId,
    pub kind: CheckpointKind,
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub step: u64,
    pub created: SystemTime,
    pub expires: Option<SystemTime>,
    /// Readable by every tenant.
    pub public: bool,
    pub user_metadata: Option<UserMetadata>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingSessionRecord {
    pub id: SessionId,
    pub tenant: TenantId,
    /// `None`: the base model alone.
    pub model: Option<AdapterId>,
    pub base_model: String,
    pub checkpoint_path: Option<String>,
    pub created: SystemTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PluginRecord {
    pub tenant: TenantId,
    /// Hex SHA-256 of the component bytes.
    pub content_hash: String,
    /// `loss` or `sampler`.
    pub kind: String,
    pub created: SystemTime,
}

pub(crate) fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

pub(crate) fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// A unit enum's serde name (`JobKind::ForwardBackward` → `forward_backward`).
fn enum_str<T: Serialize>(v: &T) -> Result<String> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(StoreError::Decode {
            what: "enum",
            message: format!("{other} is not a name"),
        }),
        Err(e) => Err(StoreError::Decode {
            what: "enum",
            message: e.to_string(),
        }),
    }
}

fn enum_parse<T: DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| {
        StoreError::Decode {
            what,
            message: format!("{s:?}: {e}"),
        }
    })
}

fn json_parse<T: DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Decode {
        what,
        message: e.to_string(),
    })
}

fn json_string<T: Serialize>(what: &'static str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Decode {
        what,
        message: e.to_string(),
    })
}

fn not_found(kind: &'static str, id: impl std::fmt::Display) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.to_string(),
    }
}

/// A UNIQUE violation becomes AlreadyExists; everything else stays a database error.
fn on_insert(
    kind: &'static str,
    id: impl std::fmt::Display,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    let id = id.to_string();
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::AlreadyExists { kind, id }
        }
        _ => StoreError::Db(e),
    }
}

fn opt_ms(row: &SqliteRow, col: &str) -> Result<Option<SystemTime>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(from_ms))
}

fn metadata_column(m: Option<&UserMetadata>) -> Result<Option<String>> {
    m.map(|m| json_string("user_metadata", m)).transpose()
}

fn metadata_row(row: &SqliteRow) -> Result<Option<UserMetadata>> {
    row.try_get::<Option<String>, _>("user_metadata")?
        .map(|s| json_parse("user_metadata", &s))
        .transpose()
}

/// A page's `LIMIT` and `OFFSET` as SQLite integers.
fn page(limit: u64, offset: u64) -> (i64, i64) {
    (
        limit.min(i64::MAX as u64) as i64,
        offset.min(i64::MAX as u64) as i64,
    )
}

/// The metadata database. Cheap to clone (a connection pool).
#[derive(Clone)]
pub struct Db {
    pool: SqlitePool,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl Db {
    /// Open (creating if needed) the database at `path` and bring its schema up to date.
    /// Does not touch futures: see [`Db::fail_interrupted_futures`].
    pub async fn open(path: &Path) -> Result<Db> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(StoreError::io("create directory", dir))?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Db {
            pool,
            path: Arc::new(path.to_owned()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Close every connection (checkpointing the WAL); waits for queries in flight.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- tenants ----

    pub async fn insert_tenant(&self, t: &TenantRecord) -> Result<()> {
        sqlx::query("INSERT INTO tenants (id, name, created_ms) VALUES (?, ?, ?)")
            .bind(t.id.as_str())
            .bind(&t.name)
            .bind(to_ms(t.created))
            .execute(&self.pool)
            .await
            .map_err(on_insert("tenant", &t.id))?;
        Ok(())
    }

    pub async fn get_tenant(&self, id: &TenantId) -> Result<TenantRecord> {
        sqlx::query("SELECT * FROM tenants WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| tenant_row(&r))
            .unwrap_or_else(|| Err(not_found("tenant", id)))
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantRecord>> {
        sqlx::query("SELECT * FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(tenant_row)
            .collect()
    }

    // ---- client sessions ----

    pub async fn insert_session(&self, s: &SessionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sessions (id, tenant_id, created_ms, last_heartbeat_ms, user_metadata, \
             display_name, ended_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id.0)
        .bind(s.tenant.as_str())
        .bind(to_ms(s.created))
        .bind(to_ms(s.last_heartbeat))
        .bind(metadata_column(s.user_metadata.as_ref())?)
        .bind(s.display_name.as_deref())
        .bind(s.ended.map(to_ms))
        .execute(&self.pool)
        .await
        .map_err(on_insert("session", &s.id))?;
        Ok(())
    }

    pub async fn get_session(
        &self,
        tenant: &TenantId,
        id: &ClientSessionId,
    ) -> Result<SessionRecord> {
        sqlx::query("SELECT * FROM sessions WHERE id = ? AND tenant_id = ?")
            .bind(&id.0)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| session_row(&r))
            .unwrap_or_else(|| Err(not_found("session", id)))
    }

    /// A tenant's open sessions (not ended), oldest first.
    pub async fn list_sessions(&self, tenant: &TenantId) -> Result<Vec<SessionRecord>> {
        sqlx::query(
            "SELECT * FROM sessions WHERE tenant_id = ? AND ended_ms IS NULL ORDER BY created_ms, id",
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(session_row)
        .collect()
    }

    /// One page of a tenant's sessions, open or ended, newest first, and how many there are.
    pub async fn list_sessions_page(
        &self,
        tenant: &TenantId,
        limit: u64,
        offset: u64,
    ) -> Result<(Vec<SessionRecord>, u64)> {
        let (limit, offset) = page(limit, offset);
        let rows = sqlx::query(
            "SELECT * FROM sessions WHERE tenant_id = ? ORDER BY created_ms DESC, id DESC \
             LIMIT ? OFFSET ?",
        )
        .bind(tenant.as_str())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(session_row)
        .collect::<Result<Vec<_>>>()?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE tenant_id = ?")
            .bind(tenant.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok((rows, total.max(0) as u64))
    }

    /// Mark a session ended (finished or reaped): it is not reopened after a restart, and
    /// stays listable with its training runs.
    pub async fn end_session(
        &self,
        tenant: &TenantId,
        id: &ClientSessionId,
        at: SystemTime,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET ended_ms = COALESCE(ended_ms, ?) WHERE id = ? AND tenant_id = ?",
        )
        .bind(to_ms(at))
        .bind(&id.0)
        .bind(tenant.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forget a session altogether (its models keep their rows and checkpoints).
    pub async fn delete_session(&self, tenant: &TenantId, id: &ClientSessionId) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id = ? AND tenant_id = ?")
            .bind(&id.0)
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn heartbeat_session(
        &self,
        tenant: &TenantId,
        id: &ClientSessionId,
        at: SystemTime,
    ) -> Result<()> {
        let r = sqlx::query(
            "UPDATE sessions SET last_heartbeat_ms = MAX(last_heartbeat_ms, ?) WHERE id = ? AND tenant_id = ?",
        )
        .bind(to_ms(at))
        .bind(&id.0)
        .bind(tenant.as_str())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("session", id));
        }
        Ok(())
    }

    // ---- models (training runs) ----

    pub async fn insert_model(&self, m: &ModelRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO models (id, tenant_id, session_id, base_model, lora_config, step, \
             newest_checkpoint, deleted, created_ms, user_metadata, loaded, last_request_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(m.id.as_str())
        .bind(m.tenant.as_str())
        .bind(m.session.as_ref().map(|s| s.0.as_str()))
        .bind(&m.base_model)
        .bind(json_string("lora_config", &m.lora_config)?)
        .bind(m.step as i64)
        .bind(m.newest_checkpoint.as_deref())
        .bind(m.deleted)
        .bind(to_ms(m.created))
        .bind(metadata_column(m.user_metadata.as_ref())?)
        .bind(m.loaded)
        .bind(m.last_request.map(to_ms))
        .execute(&self.pool)
        .await
        .map_err(on_insert("model", &m.id))?;
        Ok(())
    }

    /// A model of `tenant`, deleted or not.
    pub async fn get_model(&self, tenant: &TenantId, id: &AdapterId) -> Result<ModelRecord> {
        sqlx::query("SELECT * FROM models WHERE id = ? AND tenant_id = ?")
            .bind(id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| model_row(&r))
            .unwrap_or_else(|| Err(not_found("model", id)))
    }

    /// A tenant's models, oldest first; deleted ones only if asked.
    pub async fn list_models(
        &self,
        tenant: &TenantId,
        include_deleted: bool,
    ) -> Result<Vec<ModelRecord>> {
        sqlx::query(
            "SELECT * FROM models WHERE tenant_id = ? AND (deleted = 0 OR ?) ORDER BY created_ms, id",
        )
        .bind(tenant.as_str())
        .bind(include_deleted)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(model_row)
        .collect()
    }

    /// One page of a tenant's training runs that are not deleted (loaded or not), newest
    /// first, and how many there are.
    pub async fn list_models_page(
        &self,
        tenant: &TenantId,
        limit: u64,
        offset: u64,
    ) -> Result<(Vec<ModelRecord>, u64)> {
        let (limit, offset) = page(limit, offset);
        let rows = sqlx::query(
            "SELECT * FROM models WHERE tenant_id = ? AND deleted = 0 \
             ORDER BY created_ms DESC, id DESC LIMIT ? OFFSET ?",
        )
        .bind(tenant.as_str())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(model_row)
        .collect::<Result<Vec<_>>>()?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM models WHERE tenant_id = ? AND deleted = 0")
                .bind(tenant.as_str())
                .fetch_one(&self.pool)
                .await?;
        Ok((rows, total.max(0) as u64))
    }

    /// The training runs made in a session that are not deleted, oldest first.
    pub async fn list_session_models(
        &self,
        tenant: &TenantId,
        session: &ClientSessionId,
    ) -> Result<Vec<ModelRecord>> {
        sqlx::query(
            "SELECT * FROM models WHERE tenant_id = ? AND session_id = ? AND deleted = 0 \
             ORDER BY created_ms, id",
        )
        .bind(tenant.as_str())
        .bind(&session.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(model_row)
        .collect()
    }

    /// The run left memory: its record stays (listable), it is not restored at start-up.
    pub async fn mark_model_unloaded(
        &self,
        tenant: &TenantId,
        id: &AdapterId,
        step: u64,
        last_request: SystemTime,
    ) -> Result<()> {
        let r = sqlx::query(
            "UPDATE models SET loaded = 0, step = ?, last_request_ms = ? \
             WHERE id = ? AND tenant_id = ?",
        )
        .bind(step as i64)
        .bind(to_ms(last_request))
        .bind(id.as_str())
        .bind(tenant.as_str())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("model", id));
        }
        Ok(())
    }

    /// Record a model's step count and, if given, its newest checkpoint.
    pub async fn update_model_progress(
        &self,
        tenant: &TenantId,
        id: &AdapterId,
        step: u64,
        newest_checkpoint: Option<&str>,
    ) -> Result<()> {
        let r = sqlx::query(
            "UPDATE models SET step = ?, newest_checkpoint = COALESCE(?, newest_checkpoint), \
             last_request_ms = ? WHERE id = ? AND tenant_id = ? AND deleted = 0",
        )
        .bind(step as i64)
        .bind(newest_checkpoint)
        .bind(to_ms(SystemTime::now()))
        .bind(id.as_str())
        .bind(tenant.as_str())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("model", id));
        }
        Ok(())
    }

    /// Mark a model deleted (its row stays, for its checkpoints' sake); its metrics
    /// history goes.
    pub async fn mark_model_deleted(&self, tenant: &TenantId, id: &AdapterId) -> Result<()> {
        let r = sqlx::query("UPDATE models SET deleted = 1 WHERE id = ? AND tenant_id = ?")
            .bind(id.as_str())
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("model", id));
        }
        sqlx::query("DELETE FROM run_metrics WHERE tenant_id = ? AND model_id = ?")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- futures ----

    pub async fn insert_future(&self, f: &FutureRecord) -> Result<()> {
        futures::insert(&self.pool, f).await
    }

    pub async fn get_future(&self, tenant: &TenantId, id: &FutureId) -> Result<StoredFuture> {
        futures::get(&self.pool, tenant, id).await
    }

    /// A tenant's futures, newest first, at most `limit`.
    pub async fn list_futures(&self, tenant: &TenantId, limit: u32) -> Result<Vec<StoredFuture>> {
        sqlx::query(
            "SELECT * FROM futures WHERE tenant_id = ? ORDER BY created_ms DESC, id DESC LIMIT ?",
        )
        .bind(tenant.as_str())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(futures::row)
        .collect()
    }

    pub async fn set_future_running(&self, id: &FutureId) -> Result<()> {
        futures::set_running(&self.pool, id).await
    }

    pub async fn set_future_progress(&self, id: &FutureId, tokens_done: u64) -> Result<()> {
        futures::set_progress(&self.pool, id, tokens_done).await
    }

    /// Record an outcome; a future already finished keeps its first one.
    pub async fn finish_future(
        &self,
        id: &FutureId,
        outcome: &Result<Arc<JobOutput>, JobFailure>,
        at: SystemTime,
    ) -> Result<()> {
        futures::finish(&self.pool, id, outcome, at).await
    }

    /// Note the first time a caller read a finished future's outcome; the result expires
    /// a while after that ([`Db::expire_futures`]). Unfinished futures are left alone.
    pub async fn mark_future_fetched(
        &self,
        tenant: &TenantId,
        id: &FutureId,
        at: SystemTime,
    ) -> Result<()> {
        futures::mark_fetched(&self.pool, Some(tenant), id, at).await
    }

    /// Delete futures whose outcome was first fetched at least `ttl` before `now`.
    pub async fn expire_futures(&self, now: SystemTime, ttl: Duration) -> Result<Vec<FutureId>> {
        futures::expire(&self.pool, now, ttl).await
    }

    /// After a crash: every future still pending or running fails (category server) with
    /// [`RESTARTED_MESSAGE`]. Call once at startup, before the engine accepts work. Returns
    /// how many failed.
    pub async fn fail_interrupted_futures(&self, at: SystemTime) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE futures SET state = 'failed', error_message = ?, error_category = 'server', \
             finished_ms = ? WHERE state IN ('pending', 'running')",
        )
        .bind(RESTARTED_MESSAGE)
        .bind(to_ms(at))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    // ---- checkpoints ----

    pub async fn insert_checkpoint(&self, c: &CheckpointRecord) -> Result<()> {
        let dir = c
            .dir
            .to_str()
            .ok_or_else(|| StoreError::invalid("checkpoint dir", "is not UTF-8"))?;
        sqlx::query(
            "INSERT INTO checkpoints (path, model_id, tenant_id, kind, dir, size_bytes, step, \
             created_ms, expires_ms, public, user_metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.path)
        .bind(c.model.as_str())
        .bind(c.tenant.as_str())
        .bind(c.kind.as_str())
        .bind(dir)
        .bind(c.size_bytes as i64)
        .bind(c.step as i64)
        .bind(to_ms(c.created))
        .bind(c.expires.map(to_ms))
        .bind(c.public)
        .bind(metadata_column(c.user_metadata.as_ref())?)
        .execute(&self.pool)
        .await
        .map_err(on_insert("checkpoint", &c.path))?;
        Ok(())
    }

    pub async fn get_checkpoint(&self, tenant: &TenantId, path: &str) -> Result<CheckpointRecord> {
        sqlx::query("SELECT * FROM checkpoints WHERE path = ? AND tenant_id = ?")
            .bind(path)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| checkpoint_row(&r))
            .unwrap_or_else(|| Err(not_found("checkpoint", path)))
    }

    /// A tenant's checkpoints (of one model, if given), oldest first.
    pub async fn list_checkpoints(
        &self,
        tenant: &TenantId,
        model: Option<&AdapterId>,
    ) -> Result<Vec<CheckpointRecord>> {
        sqlx::query(
            "SELECT * FROM checkpoints WHERE tenant_id = ? AND (? IS NULL OR model_id = ?) \
             ORDER BY created_ms, path",
        )
        .bind(tenant.as_str())
        .bind(model.map(|m| m.as_str()))
        .bind(model.map(|m| m.as_str()))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(checkpoint_row)
        .collect()
    }

    pub async fn set_checkpoint_expiry(
        &self,
        tenant: &TenantId,
        path: &str,
        expires: Option<SystemTime>,
    ) -> Result<()> {
        let r =
            sqlx::query("UPDATE checkpoints SET expires_ms = ? WHERE path = ? AND tenant_id = ?")
                .bind(expires.map(to_ms))
                .bind(path)
                .bind(tenant.as_str())
                .execute(&self.pool)
                .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("checkpoint", path));
        }
        Ok(())
    }

    pub async fn set_checkpoint_public(
        &self,
        tenant: &TenantId,
        path: &str,
        public: bool,
    ) -> Result<()> {
        let r = sqlx::query("UPDATE checkpoints SET public = ? WHERE path = ? AND tenant_id = ?")
            .bind(public)
            .bind(path)
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("checkpoint", path));
        }
        Ok(())
    }

    /// Remove a checkpoint's row (the caller removes its directory); returns the row.
    pub async fn delete_checkpoint(
        &self,
        tenant: &TenantId,
        path: &str,
    ) -> Result<CheckpointRecord> {
        sqlx::query("DELETE FROM checkpoints WHERE path = ? AND tenant_id = ? RETURNING *")
            .bind(path)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| checkpoint_row(&r))
            .unwrap_or_else(|| Err(not_found("checkpoint", path)))
    }

    /// Checkpoints whose expiry is at or before `now` (all tenants), for a cleanup sweep.
    pub async fn expired_checkpoints(&self, now: SystemTime) -> Result<Vec<CheckpointRecord>> {
        sqlx::query("SELECT * FROM checkpoints WHERE expires_ms IS NOT NULL AND expires_ms <= ? ORDER BY expires_ms")
            .bind(to_ms(now))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(checkpoint_row)
            .collect()
    }

    // ---- sampling sessions ----

    pub async fn insert_sampling_session(&self, s: &SamplingSessionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sampling_sessions (id, tenant_id, model_id, base_model, checkpoint_path, \
             created_ms) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id.as_str())
        .bind(s.tenant.as_str())
        .bind(s.model.as_ref().map(|m| m.as_str()))
        .bind(&s.base_model)
        .bind(s.checkpoint_path.as_deref())
        .bind(to_ms(s.created))
        .execute(&self.pool)
        .await
        .map_err(on_insert("sampling session", &s.id))?;
        Ok(())
    }

    pub async fn get_sampling_session(
        &self,
        tenant: &TenantId,
        id: &SessionId,
    ) -> Result<SamplingSessionRecord> {
        sqlx::query("SELECT * FROM sampling_sessions WHERE id = ? AND tenant_id = ?")
            .bind(id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| sampling_row(&r))
            .unwrap_or_else(|| Err(not_found("sampling session", id)))
    }

    pub async fn list_sampling_sessions(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<SamplingSessionRecord>> {
        sqlx::query("SELECT * FROM sampling_sessions WHERE tenant_id = ? ORDER BY created_ms, id")
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(sampling_row)
            .collect()
    }

    pub async fn delete_sampling_session(&self, tenant: &TenantId, id: &SessionId) -> Result<()> {
        let r = sqlx::query("DELETE FROM sampling_sessions WHERE id = ? AND tenant_id = ?")
            .bind(id.as_str())
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(not_found("sampling session", id));
        }
        Ok(())
    }

    // ---- plugins ----

    /// Record a tenant's plugin; uploading the same bytes again keeps the first record.
    /// Returns whether it was new.
    pub async fn insert_plugin(&self, p: &PluginRecord) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO plugins (tenant_id, content_hash, kind, created_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (tenant_id, content_hash) DO NOTHING",
        )
        .bind(p.tenant.as_str())
        .bind(&p.content_hash)
        .bind(&p.kind)
        .bind(to_ms(p.created))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn get_plugin(&self, tenant: &TenantId, content_hash: &str) -> Result<PluginRecord> {
        sqlx::query("SELECT * FROM plugins WHERE tenant_id = ? AND content_hash = ?")
            .bind(tenant.as_str())
            .bind(content_hash)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| plugin_row(&r))
            .unwrap_or_else(|| Err(not_found("plugin", content_hash)))
    }

    /// Whether any tenant still owns the content hash (its bytes can go when none does).
    pub async fn delete_plugin(&self, tenant: &TenantId, content_hash: &str) -> Result<bool> {
        sqlx::query("DELETE FROM plugins WHERE tenant_id = ? AND content_hash = ?")
            .bind(tenant.as_str())
            .bind(content_hash)
            .execute(&self.pool)
            .await?;
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM plugins WHERE content_hash = ?")
            .bind(content_hash)
            .fetch_one(&self.pool)
            .await?;
        Ok(left > 0)
    }

    pub async fn list_plugins(&self, tenant: &TenantId) -> Result<Vec<PluginRecord>> {
        sqlx::query("SELECT * FROM plugins WHERE tenant_id = ? ORDER BY created_ms, content_hash")
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(plugin_row)
            .collect()
    }

    // ---- metrics history ----

    /// Keep one training result's metrics; past `max_per_run` points of its run, the
    /// oldest go. Returns the point's id (increasing: a cursor for pages and live views).
    pub async fn insert_metric_point(&self, p: &MetricPoint, max_per_run: u64) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id = sqlx::query(
            "INSERT INTO run_metrics (tenant_id, model_id, step, kind, metrics, time_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(p.tenant.as_str())
        .bind(p.run.as_str())
        .bind(p.step.min(i64::MAX as u64) as i64)
        .bind(p.kind.as_str())
        .bind(json_string("metrics", &p.metrics)?)
        .bind(to_ms(p.time))
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        sqlx::query(
            "DELETE FROM run_metrics WHERE id IN (SELECT id FROM run_metrics \
             WHERE tenant_id = ? AND model_id = ? ORDER BY id DESC LIMIT -1 OFFSET ?)",
        )
        .bind(p.tenant.as_str())
        .bind(p.run.as_str())
        .bind(max_per_run.clamp(1, i64::MAX as u64) as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// A run's points with `from_step ≤ step ≤ to_step` and id after `after`, in
    /// recording order (step order, unless a checkpoint load set the step back), at most
    /// `limit`.
    pub async fn list_metric_points(
        &self,
        tenant: &TenantId,
        run: &AdapterId,
        q: &MetricQuery,
    ) -> Result<Vec<StoredPoint>> {
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        sqlx::query(
            "SELECT * FROM run_metrics WHERE tenant_id = ? AND model_id = ? AND step >= ? \
             AND step <= ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(tenant.as_str())
        .bind(run.as_str())
        .bind(clamp(q.from_step))
        .bind(clamp(q.to_step))
        .bind(q.after)
        .bind(clamp(q.limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(point_row)
        .collect()
    }

    /// Points a run holds.
    pub async fn count_metric_points(&self, tenant: &TenantId, run: &AdapterId) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM run_metrics WHERE tenant_id = ? AND model_id = ?",
        )
        .bind(tenant.as_str())
        .bind(run.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }
}

/// Which points of a run to read ([`Db::list_metric_points`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricQuery {
    pub from_step: u64,
    pub to_step: u64,
    /// Only points recorded after the one with this id (0: from the first).
    pub after: i64,
    pub limit: u64,
}

/// A stored [`MetricPoint`] and its id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoint {
    pub id: i64,
    pub point: MetricPoint,
}

fn point_row(r: &SqliteRow) -> Result<StoredPoint> {
    let kind: String = r.try_get("kind")?;
    Ok(StoredPoint {
        id: r.try_get("id")?,
        point: MetricPoint {
            tenant: TenantId(r.try_get("tenant_id")?),
            run: AdapterId(r.try_get("model_id")?),
            step: r.try_get::<i64, _>("step")?.max(0) as u64,
            kind: PointKind::parse(&kind).ok_or_else(|| StoreError::Decode {
                what: "metric kind",
                message: kind.clone(),
            })?,
            metrics: json_parse("metrics", &r.try_get::<String, _>("metrics")?)?,
            time: from_ms(r.try_get("time_ms")?),
        },
    })
}

fn tenant_row(r: &SqliteRow) -> Result<TenantRecord> {
    Ok(TenantRecord {
        id: TenantId(r.try_get("id")?),
        name: r.try_get("name")?,
        created: from_ms(r.try_get("created_ms")?),
    })
}

fn session_row(r: &SqliteRow) -> Result<SessionRecord> {
    Ok(SessionRecord {
        id: ClientSessionId(r.try_get("id")?),
        tenant: TenantId(r.try_get("tenant_id")?),
        created: from_ms(r.try_get("created_ms")?),
        last_heartbeat: from_ms(r.try_get("last_heartbeat_ms")?),
        user_metadata: metadata_row(r)?,
        display_name: r.try_get("display_name")?,
        ended: opt_ms(r, "ended_ms")?,
    })
}

fn model_row(r: &SqliteRow) -> Result<ModelRecord> {
    let cfg: String = r.try_get("lora_config")?;
    Ok(ModelRecord {
        id: AdapterId(r.try_get("id")?),
        tenant: TenantId(r.try_get("tenant_id")?),
        session: r
            .try_get::<Option<String>, _>("session_id")?
            .map(ClientSessionId),
        base_model: r.try_get("base_model")?,
        lora_config: json_parse("lora_config", &cfg)?,
        step: r.try_get::<i64, _>("step")?.max(0) as u64,
        newest_checkpoint: r.try_get("newest_checkpoint")?,
        deleted: r.try_get("deleted")?,
        created: from_ms(r.try_get("created_ms")?),
        user_metadata: metadata_row(r)?,
        loaded: r.try_get("loaded")?,
        last_request: opt_ms(r, "last_request_ms")?,
    })
}

fn checkpoint_row(r: &SqliteRow) -> Result<CheckpointRecord> {
    let kind: String = r.try_get("kind")?;
    Ok(CheckpointRecord {
        path: r.try_get("path")?,
        model: AdapterId(r.try_get("model_id")?),
        tenant: TenantId(r.try_get("tenant_id")?),
        kind: CheckpointKind::parse(&kind)?,
        dir: PathBuf::from(r.try_get::<String, _>("dir")?),
        size_bytes: r.try_get::<i64, _>("size_bytes")?.max(0) as u64,
        step: r.try_get::<i64, _>("step")?.max(0) as u64,
        created: from_ms(r.try_get("created_ms")?),
        expires: opt_ms(r, "expires_ms")?,
        public: r.try_get("public")?,
        user_metadata: metadata_row(r)?,
    })
}

fn sampling_row(r: &SqliteRow) -> Result<SamplingSessionRecord> {
    Ok(SamplingSessionRecord {
        id: SessionId(r.try_get("id")?),
        tenant: TenantId(r.try_get("tenant_id")?),
        model: r.try_get::<Option<String>, _>("model_id")?.map(AdapterId),
        base_model: r.try_get("base_model")?,
        checkpoint_path: r.try_get("checkpoint_path")?,
        created: from_ms(r.try_get("created_ms")?),
    })
}

fn plugin_row(r: &SqliteRow) -> Result<PluginRecord> {
    Ok(PluginRecord {
        tenant: TenantId(r.try_get("tenant_id")?),
        content_hash: r.try_get("content_hash")?,
        kind: r.try_get("kind")?,
        created: from_ms(r.try_get("created_ms")?),
    })
}

/// Future queries, generic over a pool or a transaction (the future store's writer batches
/// many into one transaction).
pub(crate) mod futures {
    use super::*;

    pub async fn insert<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        f: &FutureRecord,
    ) -> Result<()> {
        let (result, failure) = outcome_columns(f.output.as_deref(), f.failure.as_ref())?;
        sqlx::query(
            "INSERT INTO futures (id, tenant_id, kind, state, tokens_done, tokens_total, result, \
             error_message, error_category, created_ms, finished_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(f.id.as_str())
        .bind(f.tenant.as_str())
        .bind(enum_str(&f.kind)?)
        .bind(enum_str(&f.state)?)
        .bind(f.progress.tokens_done as i64)
        .bind(f.progress.tokens_total as i64)
        .bind(result)
        .bind(failure.as_ref().map(|f| f.0.clone()))
        .bind(failure.as_ref().map(|f| f.1.clone()))
        .bind(to_ms(f.created))
        .bind(f.state.is_terminal().then(|| to_ms(SystemTime::now())))
        .execute(ex)
        .await
        .map_err(on_insert("future", &f.id))?;
        Ok(())
    }

    /// The `result` column, and the `error_message` and `error_category` columns.
    type OutcomeColumns = (Option<String>, Option<(String, String)>);

    fn outcome_columns(
        output: Option<&JobOutput>,
        failure: Option<&JobFailure>,
    ) -> Result<OutcomeColumns> {
        let result = output
            .map(|o| json_string("future result", o))
            .transpose()?;
        let failure = failure
            .map(|f| Ok::<_, StoreError>((f.message.clone(), enum_str(&f.category)?)))
            .transpose()?;
        Ok((result, failure))
    }

    pub async fn get<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        tenant: &TenantId,
        id: &FutureId,
    ) -> Result<StoredFuture> {
        sqlx::query("SELECT * FROM futures WHERE id = ? AND tenant_id = ?")
            .bind(id.as_str())
            .bind(tenant.as_str())
            .fetch_optional(ex)
            .await?
            .map(|r| row(&r))
            .unwrap_or_else(|| Err(not_found("future", id)))
    }

    pub fn row(r: &SqliteRow) -> Result<StoredFuture> {
        let id = FutureId(r.try_get("id")?);
        let state: JobState = enum_parse("future state", &r.try_get::<String, _>("state")?)?;
        let kind: JobKind = enum_parse("future kind", &r.try_get::<String, _>("kind")?)?;
        let result: Option<String> = r.try_get("result")?;
        let message: Option<String> = r.try_get("error_message")?;
        let category: Option<String> = r.try_get("error_category")?;
        let mut output = None;
        let mut failure = match (message, category) {
            (Some(message), Some(c)) => Some(JobFailure {
                message,
                category: enum_parse::<Category>("error category", &c)?,
            }),
            (Some(message), None) => Some(JobFailure {
                message,
                category: Category::Server,
            }),
            _ => None,
        };
        let mut state = state;
        if state == JobState::Done {
            match result
                .as_deref()
                .map(|s| json_parse::<JobOutput>("future result", s))
            {
                Some(Ok(o)) => output = Some(Arc::new(o)),
                // A result we wrote but cannot read back (a newer format, or a non-finite
                // number JSON cannot hold) fails the future rather than the whole lookup.
                Some(Err(e)) => {
                    state = JobState::Failed;
                    failure = Some(JobFailure {
                        message: format!("the stored result cannot be read: {e}"),
                        category: Category::Server,
                    });
                }
                None => {
                    state = JobState::Failed;
                    failure = Some(JobFailure {
                        message: "the stored result is missing".into(),
                        category: Category::Server,
                    });
                }
            }
        }
        Ok(StoredFuture {
            record: FutureRecord {
                id,
                tenant: TenantId(r.try_get("tenant_id")?),
                kind,
                state,
                progress: Progress {
                    tokens_done: r.try_get::<i64, _>("tokens_done")?.max(0) as u64,
                    tokens_total: r.try_get::<i64, _>("tokens_total")?.max(0) as u64,
                },
                output,
                failure,
                created: from_ms(r.try_get("created_ms")?),
            },
            finished: opt_ms(r, "finished_ms")?,
            fetched: opt_ms(r, "fetched_ms")?,
        })
    }

    pub async fn set_running<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        id: &FutureId,
    ) -> Result<()> {
        sqlx::query("UPDATE futures SET state = 'running' WHERE id = ? AND state = 'pending'")
            .bind(id.as_str())
            .execute(ex)
            .await?;
        Ok(())
    }

    pub async fn set_progress<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        id: &FutureId,
        tokens_done: u64,
    ) -> Result<()> {
        sqlx::query("UPDATE futures SET tokens_done = MAX(tokens_done, ?) WHERE id = ?")
            .bind(tokens_done as i64)
            .bind(id.as_str())
            .execute(ex)
            .await?;
        Ok(())
    }

    pub async fn finish<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        id: &FutureId,
        outcome: &Result<Arc<JobOutput>, JobFailure>,
        at: SystemTime,
    ) -> Result<()> {
        let (state, result, failure) = match outcome {
            Ok(o) => (JobState::Done, outcome_columns(Some(o), None)?.0, None),
            Err(f) => (JobState::Failed, None, outcome_columns(None, Some(f))?.1),
        };
        sqlx::query(
            "UPDATE futures SET state = ?, result = ?, error_message = ?, error_category = ?, \
             finished_ms = ? WHERE id = ? AND state IN ('pending', 'running')",
        )
        .bind(enum_str(&state)?)
        .bind(result)
        .bind(failure.as_ref().map(|f| f.0.clone()))
        .bind(failure.as_ref().map(|f| f.1.clone()))
        .bind(to_ms(at))
        .bind(id.as_str())
        .execute(ex)
        .await?;
        Ok(())
    }

    pub async fn mark_fetched<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        tenant: Option<&TenantId>,
        id: &FutureId,
        at: SystemTime,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE futures SET fetched_ms = COALESCE(fetched_ms, ?) WHERE id = ? \
             AND (? IS NULL OR tenant_id = ?) AND state IN ('done', 'failed')",
        )
        .bind(to_ms(at))
        .bind(id.as_str())
        .bind(tenant.map(|t| t.as_str()))
        .bind(tenant.map(|t| t.as_str()))
        .execute(ex)
        .await?;
        Ok(())
    }

    /// Delete finished futures nobody fetched that finished at least `ttl` before `now`.
    pub async fn expire_unread<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<FutureId>> {
        let cutoff = to_ms(now).saturating_sub(ttl.as_millis().min(i64::MAX as u128) as i64);
        let rows = sqlx::query(
            "DELETE FROM futures WHERE fetched_ms IS NULL AND finished_ms IS NOT NULL \
             AND finished_ms <= ? RETURNING id",
        )
        .bind(cutoff)
        .fetch_all(ex)
        .await?;
        rows.iter()
            .map(|r| Ok(FutureId(r.try_get("id")?)))
            .collect()
    }

    pub async fn expire<'c, E: Executor<'c, Database = Sqlite>>(
        ex: E,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<FutureId>> {
        let cutoff = to_ms(now).saturating_sub(ttl.as_millis().min(i64::MAX as u128) as i64);
        let rows = sqlx::query(
            "DELETE FROM futures WHERE fetched_ms IS NOT NULL AND fetched_ms <= ? RETURNING id",
        )
        .bind(cutoff)
        .fetch_all(ex)
        .await?;
        rows.iter()
            .map(|r| Ok(FutureId(r.try_get("id")?)))
            .collect()
    }
}
