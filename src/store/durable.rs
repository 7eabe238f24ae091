//! The durable side of a running server: one handle over the metadata database, the
//! checkpoint files and the plugin bytes under the data directory. It implements the
//! engine's [`Persist`] (checkpoints are on disk before a save is acknowledged; an
//! automatic checkpoint follows every K optimizer steps; a deleted model's files go) and
//! rebuilds the engine's registry at start-up ([`Durable::restore`]). [`DurableHistory`]
//! keeps the engine's metrics history in the same database.
//!
//! The database runs on a small runtime of its own, so lanes and blocking threads can wait
//! on it ([`Durable::block`]) and async handlers can await it ([`Durable::call`]) without
//! either kind of caller blocking tokio's workers.

use super::checkpoint::{model_dir_name, CheckpointKind, CheckpointStore};
use super::db::{CheckpointRecord, Db, ModelRecord, PluginRecord, SessionRecord, TenantRecord};
use super::error::StoreError;
use crate::error::{Error, Result};
use crate::jobs::history::{HistorySink, MetricPoint};
use crate::jobs::registry::{AdapterEntry, Checkpoint, Persist, RunMeta};
use crate::jobs::{AdapterId, Engine, SessionId, TenantId, UserMetadata};
use crate::lora::{LoraConfig, LoraGrads, LoraWeights};
use crate::model::BaseModel;
use crate::train::TrainableAdapter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Prefix of a model's automatic checkpoints (`auto-<step>`; only the newest is kept, and
/// none appears in the user's listings). Users cannot name checkpoints with it.
pub const AUTO_CHECKPOINT: &str = "auto-";

fn auto_name(step: u64) -> String {
    format!("{AUTO_CHECKPOINT}{step:010}")
}

/// Adapters at least this big default to an automatic checkpoint every
/// [`LARGE_ADAPTER_AUTO_EVERY`] steps instead of every step.
const LARGE_ADAPTER_BYTES: u64 = 64 << 20;
const LARGE_ADAPTER_AUTO_EVERY: u64 = 10;

pub struct Durable {
    rt: tokio::runtime::Handle,
    db: Db,
    checkpoints: CheckpointStore,
    plugin_dir: PathBuf,
    /// Spilled sampling snapshots, `<tenant>/<session>` (cleared when the store opens:
    /// sessions do not outlive the process).
    snapshot_dir: PathBuf,
    /// Spilled gradients of evicted adapters, `<tenant>/<model>` (cleared when the store
    /// opens: gradients not yet applied were never durable).
    grads_dir: PathBuf,
    /// The default base's name: a run created without one is recorded on it.
    base_model: String,
    /// Automatic checkpoint every this many optimizer steps (`None`: by adapter size).
    auto_every: Option<u64>,
}

/// What [`Durable::restore`] brought back.
#[derive(Debug, Default)]
pub struct Restored {
    pub models: usize,
    pub checkpoints: usize,
    pub sessions: Vec<SessionRecord>,
    /// model → its Tinker session.
    pub model_sessions: Vec<(AdapterId, String)>,
}

fn store_err(e: StoreError) -> Error {
    e.into()
}

impl Durable {
    /// Open (or create) everything under `data_dir`: `loraplex.db`, `checkpoints/`,
    /// `plugins/`. Unfinished checkpoint writes left by a crash are swept.
    pub fn open(
        data_dir: &Path,
        base_model: &str,
        auto_every: Option<u64>,
    ) -> Result<Arc<Durable>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("loraplex-db".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("loraplex-db-io")
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let rt = rx
            .recv()
            .map_err(|_| Error::Unavailable("the database thread did not start".into()))??;
        let path = data_dir.join("loraplex.db");
        let db = rt.block_on(Db::open(&path)).map_err(store_err)?;
        let (checkpoints, _) =
            CheckpointStore::open(data_dir.join("checkpoints")).map_err(store_err)?;
        let plugin_dir = data_dir.join("plugins");
        std::fs::create_dir_all(&plugin_dir)?;
        let snapshot_dir = data_dir.join("snapshots");
        let grads_dir = data_dir.join("grads");
        for dir in [&snapshot_dir, &grads_dir] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            std::fs::create_dir_all(dir)?;
        }
        Ok(Arc::new(Durable {
            rt,
            db,
            checkpoints,
            plugin_dir,
            snapshot_dir,
            grads_dir,
            base_model: base_model.to_owned(),
            auto_every,
        }))
    }

    pub fn db_path(&self) -> PathBuf {
        self.db.path().to_owned()
    }

    /// Run database work from a thread that may block (a lane, `spawn_blocking`).
    pub fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Run database work from async code on another runtime.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Db) -> Fut,
        Fut: std::future::Future<Output = super::error::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let fut = f(self.db.clone());
        self.rt
            .spawn(fut)
            .await
            .map_err(|e| Error::Unavailable(format!("database task failed: {e}")))?
            .map_err(store_err)
    }

    async fn ensure_tenant(db: &Db, tenant: &TenantId) -> super::error::Result<()> {
        match db.get_tenant(tenant).await {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound { .. }) => {
                let r = db
                    .insert_tenant(&TenantRecord {
                        id: tenant.clone(),
                        name: String::new(),
                        created: SystemTime::now(),
                    })
                    .await;
                match r {
                    Err(StoreError::AlreadyExists { .. }) | Ok(()) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    // ---- sessions and plugins (called by the API) ----

    pub async fn session_created(
        &self,
        tenant: &TenantId,
        id: &str,
        created: SystemTime,
        user_metadata: Option<UserMetadata>,
        display_name: Option<String>,
    ) -> Result<()> {
        let (t, rec) = (
            tenant.clone(),
            SessionRecord {
                id: super::db::ClientSessionId(id.to_owned()),
                tenant: tenant.clone(),
                created,
                last_heartbeat: created,
                user_metadata,
                display_name,
                ended: None,
            },
        );
        self.call(move |db| async move {
            Self::ensure_tenant(&db, &t).await?;
            db.insert_session(&rec).await
        })
        .await
    }

    pub async fn session_heartbeat(&self, tenant: &TenantId, id: &str) -> Result<()> {
        let (t, id) = (tenant.clone(), super::db::ClientSessionId(id.to_owned()));
        self.call(move |db| async move { db.heartbeat_session(&t, &id, SystemTime::now()).await })
            .await
    }

    /// The session ended (finished, or reaped): it does not come back after a restart,
    /// but stays listable with its training runs.
    pub async fn session_ended(&self, tenant: &TenantId, id: &str) -> Result<()> {
        let (t, id) = (tenant.clone(), super::db::ClientSessionId(id.to_owned()));
        self.call(move |db| async move { db.end_session(&t, &id, SystemTime::now()).await })
            .await
    }

    /// Keep a plugin's bytes (by content hash) and its owner.
    pub async fn plugin_uploaded(
        &self,
        tenant: &TenantId,
        hash: &str,
        kind: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let file = self.plugin_file(hash)?;
        if !file.exists() {
            let tmp = file.with_extension("wasm.tmp");
            let bytes = bytes.to_vec();
            let (t2, f2) = (tmp.clone(), file.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&t2)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&t2, &f2)?;
                if let Some(d) = f2.parent() {
                    std::fs::File::open(d)?.sync_all()?;
                }
                Ok(())
            })
            .await
            .map_err(|e| Error::Unavailable(format!("plugin write panicked: {e}")))??;
        }
        let rec = PluginRecord {
            tenant: tenant.clone(),
            content_hash: hash.to_owned(),
            kind: kind.to_owned(),
            created: SystemTime::now(),
        };
        let t = tenant.clone();
        self.call(move |db| async move {
            Self::ensure_tenant(&db, &t).await?;
            db.insert_plugin(&rec).await.map(|_| ())
        })
        .await
    }

    pub async fn plugin_deleted(&self, tenant: &TenantId, hash: &str) -> Result<()> {
        let (t, h) = (tenant.clone(), hash.to_owned());
        let still_owned = self
            .call(move |db| async move { db.delete_plugin(&t, &h).await })
            .await?;
        if !still_owned {
            let _ = std::fs::remove_file(self.plugin_file(hash)?);
        }
        Ok(())
    }

    fn plugin_file(&self, hash: &str) -> Result<PathBuf> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid("plugin_id", "not a content hash"));
        }
        Ok(self.plugin_dir.join(format!("{hash}.wasm")))
    }

    /// Every tenant's plugins, with their bytes, for reloading at start-up.
    pub fn stored_plugins(&self) -> Result<Vec<(PluginRecord, Vec<u8>)>> {
        let db = self.db.clone();
        let recs = self
            .block(async move {
                let mut out = Vec::new();
                for t in db.list_tenants().await? {
                    out.extend(db.list_plugins(&t.id).await?);
                }
                Ok::<_, StoreError>(out)
            })
            .map_err(store_err)?;
        let mut out = Vec::new();
        let max = crate::plugins::MAX_COMPONENT_BYTES as u64;
        for r in recs {
            let path = self.plugin_file(&r.content_hash)?;
            // No component larger than an upload may be is read back.
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > max => {
                    tracing::error!(plugin = %r.content_hash, bytes = m.len(), max, "stored plugin is too large; skipped");
                    continue;
                }
                _ => {}
            }
            match std::fs::read(&path) {
                Ok(b) => out.push((r, b)),
                Err(e) => {
                    tracing::error!(plugin = %r.content_hash, error = %e, "plugin bytes missing")
                }
            }
        }
        Ok(out)
    }

    /// Rebuild the registry after a restart: every loaded model, listed cold (its first
    /// job loads its newest checkpoint, automatic or explicit; a model never stepped is
    /// re-initialised from its seed, which gives the same weights), on the base model its
    /// record names, every checkpoint (on
    /// its run's base), and the open sessions. Unloaded runs stay records in the database
    /// (listed, never loaded); so does a run whose base is not served now (it comes back
    /// when that base is served again). Call with every served base loaded. Blocking.
    pub fn restore(&self, engine: &Engine) -> Result<Restored> {
        let db = self.db.clone();
        let (tenants, per_tenant) = self
            .block(async move {
                let tenants = db.list_tenants().await?;
                let mut rows = Vec::new();
                for t in &tenants {
                    let models = db.list_models(&t.id, false).await?;
                    let cks = db.list_checkpoints(&t.id, None).await?;
                    let sessions = db.list_sessions(&t.id).await?;
                    rows.push((models, cks, sessions));
                }
                Ok::<_, StoreError>((tenants, rows))
            })
            .map_err(store_err)?;
        let mut out = Restored::default();
        let reg = engine.registry();
        if reg.base_now().is_none() {
            return Err(Error::Unavailable(
                "restore before the base model loaded".into(),
            ));
        }
        for (t, (models, cks, sessions)) in tenants.iter().zip(per_tenant) {
            // Every run's base, for its checkpoints (copies have runs of their own too).
            let bases: std::collections::HashMap<AdapterId, String> = models
                .iter()
                .map(|m| (m.id.clone(), m.base_model.clone()))
                .collect();
            for m in models.into_iter().filter(|m| m.loaded) {
                let Some(model) = reg.base_now_named(&m.base_model) else {
                    tracing::warn!(
                        model = %m.id,
                        base = %m.base_model,
                        "training run's base model is not served; left unloaded"
                    );
                    continue;
                };
                if let Some(s) = &m.session {
                    out.model_sessions.push((m.id.clone(), s.0.clone()));
                }
                // Listed now, loaded on its first job (the residency manager reads its
                // newest durable state then): restart time does not grow with adapters.
                let bytes = crate::jobs::residency::entry_bytes(&m.lora_config, &model.config);
                reg.insert_adapter(AdapterEntry::cold(
                    m.id.clone(),
                    t.id.clone(),
                    m.lora_config.clone(),
                    None,
                    RunMeta {
                        base: Some(m.base_model.clone()),
                        session: m.session.as_ref().map(|s| s.0.clone()),
                        user_metadata: m.user_metadata.clone(),
                    },
                    bytes,
                    m.step,
                ));
                out.models += 1;
            }
            for c in cks {
                let name = match c.path.strip_prefix("tinker://") {
                    Some(n) => n.to_owned(),
                    None => continue,
                };
                let base = bases
                    .get(&c.model)
                    .cloned()
                    .unwrap_or_else(|| self.base_model.clone());
                // Listed from its small manifest; its tensors stay on disk until used.
                match super::checkpoint::read_meta(&c.dir) {
                    Ok(meta) => {
                        reg.restore_checkpoint(
                            &t.id,
                            Checkpoint {
                                name,
                                model: c.model.clone(),
                                owner: t.id.clone(),
                                base,
                                config: meta.lora_config,
                                step: meta.step,
                                size: Checkpoint::size_of(meta.num_params),
                                held: None,
                                created: c.created,
                                expires: c.expires,
                                public: c.public,
                                user_metadata: c.user_metadata.clone(),
                            },
                        );
                        out.checkpoints += 1;
                    }
                    Err(e) => tracing::error!(path = %c.path, error = %e, "checkpoint unreadable"),
                }
            }
            out.sessions.extend(sessions);
        }
        Ok(out)
    }

    /// A run's newest durable state: the newest of its automatic checkpoint and its
    /// newest explicit training checkpoint (by when they were written, then by step; an
    /// unreadable explicit one is skipped), or its initial weights from the seed. Clean
    /// (see [`Persist::load_adapter`]) unless it came from an explicit checkpoint.
    fn latest_state(
        &self,
        tenant: &TenantId,
        id: &AdapterId,
        config: &LoraConfig,
        newest_explicit: Option<&str>,
        model: &BaseModel,
    ) -> Result<(TrainableAdapter, bool)> {
        let auto = self
            .checkpoints
            .list(tenant, id, CheckpointKind::Training)
            .map_err(store_err)?
            .into_iter()
            .filter(|(n, _)| n.starts_with(AUTO_CHECKPOINT))
            .max_by(|a, b| {
                (a.1.created_unix_ms, a.1.step, &a.0).cmp(&(b.1.created_unix_ms, b.1.step, &b.0))
            })
            .map(|(n, meta)| ((id.clone(), CheckpointKind::Training, n), meta));
        let explicit = newest_explicit
            .and_then(|p| split_name(p.strip_prefix("tinker://").unwrap_or(p)).ok())
            .and_then(|e| {
                let dir = self.checkpoints.dir_of(tenant, &e.0, e.1, &e.2).ok()?;
                let meta = super::checkpoint::read_meta(&dir).ok()?;
                Some((e, meta))
            });
        let pick = match (auto, explicit) {
            (Some(a), Some(e)) => {
                if (e.1.created_unix_ms, e.1.step) > (a.1.created_unix_ms, a.1.step) {
                    Some((e.0, false))
                } else {
                    Some((a.0, true))
                }
            }
            (Some(a), None) => Some((a.0, true)),
            (None, Some(e)) => Some((e.0, false)),
            (None, None) => None,
        };
        match pick {
            Some(((mid, kind, name), clean)) => {
                let c = self
                    .checkpoints
                    .load(tenant, &mid, kind, &name, &model.device)
                    .map_err(store_err)?;
                c.check_model(&model.config).map_err(store_err)?;
                Ok((c.into_trainable(), clean))
            }
            None => Ok((
                TrainableAdapter::new(LoraWeights::init(config, &model.config, &model.device)?),
                true,
            )),
        }
    }

    /// Write `state` as the run's automatic checkpoint (`auto-<step>`, or with the time
    /// appended when one of that step exists already: its weights may differ after a
    /// `load_state`), then remove the older ones. Atomic: until the new one is complete,
    /// the old one is the newest.
    fn write_auto(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        state: &TrainableAdapter,
    ) -> Result<()> {
        let step = state.optim.step;
        let mut name = auto_name(step);
        if self
            .checkpoints
            .dir_of(tenant, model, CheckpointKind::Training, &name)
            .map_err(store_err)?
            .exists()
        {
            let ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            name = format!("{name}-{ms}");
        }
        self.checkpoints
            .save(tenant, model, CheckpointKind::Training, &name, state)
            .map_err(store_err)?;
        // The new one is complete: older automatic checkpoints can go.
        for (old, _) in self
            .checkpoints
            .list(tenant, model, CheckpointKind::Training)
            .map_err(store_err)?
        {
            if old.starts_with(AUTO_CHECKPOINT) && old != name {
                let _ = self
                    .checkpoints
                    .delete(tenant, model, CheckpointKind::Training, &old);
            }
        }
        Ok(())
    }

    fn auto_every(&self, state: &TrainableAdapter) -> u64 {
        self.auto_every
            .unwrap_or_else(|| {
                let n: usize = state
                    .weights
                    .pairs
                    .values()
                    .map(|p| p.a.elem_count() + p.b.elem_count())
                    .sum();
                if (n as u64) * 4 < LARGE_ADAPTER_BYTES {
                    1
                } else {
                    LARGE_ADAPTER_AUTO_EVERY
                }
            })
            .max(1)
    }
}

/// `{model}/{segment}/{name}` → its parts.
fn split_name(name: &str) -> Result<(AdapterId, CheckpointKind, String)> {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        [m, seg, n] if !m.is_empty() => match CheckpointKind::from_segment(seg) {
            Some(k) => Ok((AdapterId((*m).to_owned()), k, (*n).to_owned())),
            None => Err(Error::invalid(
                "path",
                format!("{name:?}: unknown segment {seg:?}"),
            )),
        },
        _ => Err(Error::invalid(
            "path",
            format!("{name:?} is not model/segment/name"),
        )),
    }
}

impl Persist for Durable {
    fn save_checkpoint(
        &self,
        tenant: &TenantId,
        c: &Checkpoint,
        state: &TrainableAdapter,
    ) -> Result<()> {
        let (model, kind, name) = split_name(&c.name)?;
        // Overwrite: the old files go first (a crash in between loses the old copy, never
        // leaves a half-written one).
        if self
            .checkpoints
            .dir_of(tenant, &model, kind, &name)
            .map_err(store_err)?
            .exists()
        {
            self.checkpoints
                .delete(tenant, &model, kind, &name)
                .map_err(store_err)?;
        }
        let (dir, meta) = self
            .checkpoints
            .save(tenant, &model, kind, &name, state)
            .map_err(store_err)?;
        let rec = CheckpointRecord {
            path: format!("tinker://{}", c.name),
            model: model.clone(),
            tenant: tenant.clone(),
            kind,
            dir,
            size_bytes: meta.size_bytes,
            step: c.step,
            created: c.created,
            expires: c.expires,
            public: c.public,
            user_metadata: c.user_metadata.clone(),
        };
        let (db, t) = (self.db.clone(), tenant.clone());
        self.block(async move {
            Self::ensure_tenant(&db, &t).await?;
            // Overwriting: the new files are in place; replace the row.
            match db.delete_checkpoint(&t, &rec.path).await {
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            db.insert_checkpoint(&rec).await?;
            if kind == CheckpointKind::Training {
                match db
                    .update_model_progress(&t, &rec.model, rec.step, Some(&rec.path))
                    .await
                {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .map_err(store_err)
    }

    fn read_checkpoint(&self, c: &Checkpoint, base: &BaseModel) -> Result<TrainableAdapter> {
        let (model, kind, name) = split_name(&c.name)?;
        let ck = self
            .checkpoints
            .load(&c.owner, &model, kind, &name, &base.device)
            .map_err(store_err)?;
        ck.check_model(&base.config).map_err(store_err)?;
        Ok(ck.into_trainable())
    }

    fn spill_grads(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        weights: &LoraWeights,
        grads: &LoraGrads,
    ) -> Result<()> {
        let dir = self.grads_path(tenant, model)?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        remove_dir_if_there(&dir)?;
        // Stored like a sampler checkpoint: the same sites and shapes as the weights.
        let as_weights = LoraWeights {
            config: weights.config.clone(),
            scale: weights.scale,
            pairs: grads
                .pairs
                .iter()
                .map(|(site, (a, b))| {
                    (
                        *site,
                        crate::lora::LoraPair {
                            a: a.clone(),
                            b: b.clone(),
                        },
                    )
                })
                .collect(),
        };
        super::checkpoint::write_checkpoint(&dir, CheckpointKind::Sampler, &as_weights, None)
            .map_err(store_err)?;
        Ok(())
    }

    fn take_grads(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        base: &BaseModel,
    ) -> Result<Option<LoraGrads>> {
        let dir = self.grads_path(tenant, model)?;
        if !dir.exists() {
            return Ok(None);
        }
        let ck = super::checkpoint::read_checkpoint(&dir, &base.device).map_err(store_err)?;
        ck.check_model(&base.config).map_err(store_err)?;
        let grads = LoraGrads {
            pairs: ck
                .weights
                .pairs
                .into_iter()
                .map(|(site, p)| (site, (p.a, p.b)))
                .collect(),
        };
        remove_dir_if_there(&dir)?;
        Ok(Some(grads))
    }

    fn spill_snapshot(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        weights: &LoraWeights,
    ) -> Result<()> {
        let dir = self.snapshot_path(tenant, session)?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        super::checkpoint::write_checkpoint(&dir, CheckpointKind::Sampler, weights, None)
            .map_err(store_err)?;
        Ok(())
    }

    fn read_snapshot(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        base: &BaseModel,
    ) -> Result<LoraWeights> {
        let dir = self.snapshot_path(tenant, session)?;
        let ck = super::checkpoint::read_checkpoint(&dir, &base.device).map_err(store_err)?;
        ck.check_model(&base.config).map_err(store_err)?;
        Ok(ck.weights)
    }

    fn drop_snapshot(&self, tenant: &TenantId, session: &SessionId) -> Result<()> {
        remove_dir_if_there(&self.snapshot_path(tenant, session)?)
    }

    fn delete_checkpoint(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()> {
        let (model, kind, name) = split_name(&c.name)?;
        let (db, t, path) = (
            self.db.clone(),
            tenant.clone(),
            format!("tinker://{}", c.name),
        );
        self.block(async move { db.delete_checkpoint(&t, &path).await })
            .map(|_| ())
            .or_else(|e| match e {
                StoreError::NotFound { .. } => Ok(()),
                e => Err(e),
            })
            .map_err(store_err)?;
        match self.checkpoints.delete(tenant, &model, kind, &name) {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    fn set_checkpoint_expiry(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()> {
        let (db, t, path, exp) = (
            self.db.clone(),
            tenant.clone(),
            format!("tinker://{}", c.name),
            c.expires,
        );
        self.block(async move { db.set_checkpoint_expiry(&t, &path, exp).await })
            .map_err(store_err)
    }

    fn set_checkpoint_public(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()> {
        let (db, t, path, public) = (
            self.db.clone(),
            tenant.clone(),
            format!("tinker://{}", c.name),
            c.public,
        );
        self.block(async move { db.set_checkpoint_public(&t, &path, public).await })
            .map_err(store_err)
    }

    fn stepped(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        state: &TrainableAdapter,
    ) -> Result<bool> {
        let step = state.optim.step;
        let auto = step % self.auto_every(state) == 0;
        if auto {
            self.write_auto(tenant, model, state)?;
        }
        let (db, t, m) = (self.db.clone(), tenant.clone(), model.clone());
        self.block(async move {
            let newest = db.get_model(&t, &m).await?.newest_checkpoint;
            db.update_model_progress(&t, &m, step, newest.as_deref())
                .await
        })
        .map_err(store_err)?;
        Ok(auto)
    }

    fn write_back(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        state: &TrainableAdapter,
    ) -> Result<()> {
        self.write_auto(tenant, model, state)?;
        let (db, t, m, step) = (
            self.db.clone(),
            tenant.clone(),
            model.clone(),
            state.optim.step,
        );
        self.block(async move {
            let newest = db.get_model(&t, &m).await?.newest_checkpoint;
            db.update_model_progress(&t, &m, step, newest.as_deref())
                .await
        })
        .map_err(store_err)
    }

    fn load_adapter(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        config: &LoraConfig,
        base: &BaseModel,
    ) -> Result<(TrainableAdapter, bool)> {
        let (db, t, m) = (self.db.clone(), tenant.clone(), model.clone());
        let newest = self
            .block(async move { db.get_model(&t, &m).await })
            .map_err(store_err)?
            .newest_checkpoint;
        self.latest_state(tenant, model, config, newest.as_deref(), base)
    }

    fn model_created(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        config: &LoraConfig,
        meta: &RunMeta,
        loaded: bool,
    ) -> Result<()> {
        let rec = ModelRecord {
            id: model.clone(),
            tenant: tenant.clone(),
            session: meta
                .session
                .as_ref()
                .map(|s| super::db::ClientSessionId(s.clone())),
            base_model: meta.base.clone().unwrap_or_else(|| self.base_model.clone()),
            lora_config: config.clone(),
            step: 0,
            newest_checkpoint: None,
            deleted: false,
            created: SystemTime::now(),
            user_metadata: meta.user_metadata.clone(),
            loaded,
            last_request: None,
        };
        let (db, t) = (self.db.clone(), tenant.clone());
        self.block(async move {
            Self::ensure_tenant(&db, &t).await?;
            db.insert_model(&rec).await
        })
        .map_err(store_err)
    }

    fn model_unloaded(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        step: u64,
        last_request: SystemTime,
    ) -> Result<()> {
        let (db, t, m) = (self.db.clone(), tenant.clone(), model.clone());
        self.block(async move { db.mark_model_unloaded(&t, &m, step, last_request).await })
            .map_err(store_err)?;
        remove_dir_if_there(&self.grads_path(tenant, model)?)?;
        self.delete_auto_checkpoints(tenant, model)
    }

    fn model_deleted(&self, tenant: &TenantId, model: &AdapterId) -> Result<()> {
        let (db, t, m) = (self.db.clone(), tenant.clone(), model.clone());
        let cks = self
            .block(async move {
                db.mark_model_deleted(&t, &m).await?;
                let cks = db.list_checkpoints(&t, Some(&m)).await?;
                for c in &cks {
                    db.delete_checkpoint(&t, &c.path).await?;
                }
                Ok::<_, StoreError>(cks)
            })
            .map_err(store_err)?;
        drop(cks);
        remove_dir_if_there(&self.grads_path(tenant, model)?)?;
        self.delete_auto_checkpoints(tenant, model)?;
        let dir = self
            .checkpoints
            .root()
            .join(tenant.as_str())
            .join(model_dir_name(model).map_err(store_err)?);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }
}

/// The engine's metrics history ([`crate::jobs::history`]) in the metadata database, at
/// most `max_points_per_run` points per run (the oldest go).
pub struct DurableHistory {
    pub durable: Arc<Durable>,
    pub max_points_per_run: u64,
}

impl HistorySink for DurableHistory {
    fn record(&self, p: &MetricPoint) -> Result<()> {
        let (db, p, cap) = (self.durable.db.clone(), p.clone(), self.max_points_per_run);
        self.durable
            .block(async move { db.insert_metric_point(&p, cap).await })
            .map(|_| ())
            .map_err(store_err)
    }
}

/// Remove a directory tree; one that is not there is fine.
fn remove_dir_if_there(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Durable {
    /// Where a model's spilled gradients live (whether or not they exist).
    fn grads_path(&self, tenant: &TenantId, model: &AdapterId) -> Result<PathBuf> {
        super::checkpoint::check_name("tenant", tenant.as_str()).map_err(store_err)?;
        let m = model_dir_name(model).map_err(store_err)?;
        Ok(self.grads_dir.join(tenant.as_str()).join(m))
    }

    /// Where a session's spilled snapshot lives (whether or not it exists).
    fn snapshot_path(&self, tenant: &TenantId, session: &SessionId) -> Result<PathBuf> {
        super::checkpoint::check_name("tenant", tenant.as_str()).map_err(store_err)?;
        super::checkpoint::check_name("session", session.as_str()).map_err(store_err)?;
        Ok(self
            .snapshot_dir
            .join(tenant.as_str())
            .join(session.as_str()))
    }

    /// A model's automatic checkpoints: they only bring a loaded model back after a
    /// restart, so they go when it is unloaded or deleted.
    fn delete_auto_checkpoints(&self, tenant: &TenantId, model: &AdapterId) -> Result<()> {
        for (old, _) in self
            .checkpoints
            .list(tenant, model, CheckpointKind::Training)
            .map_err(store_err)?
        {
            if old.starts_with(AUTO_CHECKPOINT) {
                let _ = self
                    .checkpoints
                    .delete(tenant, model, CheckpointKind::Training, &old);
            }
        }
        Ok(())
    }
}
