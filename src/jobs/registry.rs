//! The adapter registry: the base model (loaded once, however many callers race for it),
//! the training models with one lock each, named checkpoints, and frozen sampling
//! snapshots. Create and delete never block on other adapters: the map is sharded
//! (dashmap) and a lane holds only the locks of the adapters in its batch.
//!
//! The registry stores state; it never decides order (the scheduler does) and never runs
//! model work.
//!
//! Bounds: a model stays until deleted or unloaded (with its Tinker session, or by the
//! session reaper after `LORAPLEX_SESSION_TIMEOUT_S`); a sampling session until whoever
//! made it removes it (a request that made it for itself, or its Tinker session, see
//! [`Session::owner`]); a checkpoint until deleted or past its time to live. How many of
//! each a tenant may hold is the per-tenant quota's business.

use super::ids::{AdapterId, SessionId, TenantId};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraGrads, LoraWeights};
use crate::model::BaseModel;
use crate::train::{TrainableAdapter, WorkResult};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Where the registry's state persists (the store, [`crate::store::Durable`]); the
/// registry itself is the in-memory cache. Every method may block on disk: call it from a
/// lane or a blocking thread, never on tokio's workers.
pub trait Persist: Send + Sync {
    /// Write a checkpoint durably; the save is acknowledged only after this returns.
    fn save_checkpoint(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()>;
    fn delete_checkpoint(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()>;
    fn set_checkpoint_expiry(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()>;
    /// After an optimizer step: record the step; write the automatic checkpoint when due.
    fn stepped(&self, tenant: &TenantId, model: &AdapterId, state: &TrainableAdapter)
        -> Result<()>;
    fn model_created(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        config: &LoraConfig,
        session: Option<&str>,
    ) -> Result<()>;
    /// The model is gone and will not come back after a restart; with `purge`, its
    /// checkpoints and their files go too (otherwise they stay loadable).
    fn model_deleted(&self, tenant: &TenantId, model: &AdapterId, purge: bool) -> Result<()>;
}

/// Builds (or hands over) the base model; called on a blocking thread, at most once per
/// success.
pub type ModelLoader = Arc<dyn Fn() -> Result<Arc<BaseModel>> + Send + Sync>;

/// A training model: one adapter of one tenant.
pub struct AdapterEntry {
    pub id: AdapterId,
    pub tenant: TenantId,
    pub config: LoraConfig,
    /// The seq_id its first request carries (Tinker: 1, or 0 when it starts by loading a
    /// checkpoint); `None` (a model restored after a restart) takes the first that arrives.
    pub first_seq: Option<u64>,
    /// The Tinker session it belongs to, if any.
    pub session: Option<String>,
    pub created: std::time::SystemTime,
    /// When it last got work (ms since the epoch; 0: never), for training run listings.
    last_request_ms: std::sync::atomic::AtomicU64,
    /// Held by the one lane that runs this adapter's work, and briefly by readers.
    pub(crate) state: Mutex<AdapterState>,
}

pub(crate) struct AdapterState {
    pub train: TrainableAdapter,
    /// A request split across batches: its results and gradients so far. Gradients join
    /// the adapter's only when the last piece succeeds, so a failure leaves no trace.
    pub partial: Option<Partial>,
}

pub(crate) struct Partial {
    pub future: super::ids::FutureId,
    pub result: WorkResult,
    pub grads: LoraGrads,
}

impl AdapterEntry {
    pub fn new(
        id: AdapterId,
        tenant: TenantId,
        config: LoraConfig,
        first_seq: Option<u64>,
        session: Option<String>,
        train: TrainableAdapter,
    ) -> Self {
        AdapterEntry {
            id,
            tenant,
            config,
            first_seq,
            session,
            created: std::time::SystemTime::now(),
            last_request_ms: Default::default(),
            state: Mutex::new(AdapterState {
                train,
                partial: None,
            }),
        }
    }

    /// A copy of the current weights (cheap: tensors are shared, updates replace them).
    pub fn weights(&self) -> LoraWeights {
        self.state.lock().train.weights.clone()
    }

    /// Note that work arrived for it now.
    pub fn touch(&self) {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64);
        self.last_request_ms.store(ms, Ordering::Relaxed);
    }

    /// When it last got work, or when it was created if it got none.
    pub fn last_request(&self) -> SystemTime {
        match self.last_request_ms.load(Ordering::Relaxed) {
            0 => self.created,
            ms => SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
        }
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> u64 {
        self.state.lock().train.optim.step
    }
}

/// A named copy of a model's weights and optimizer state.
pub struct Checkpoint {
    pub name: String,
    pub model: AdapterId,
    pub state: Arc<TrainableAdapter>,
    pub created: SystemTime,
    pub expires: Option<SystemTime>,
}

impl Checkpoint {
    /// Bytes of weights plus optimizer moments, as f32.
    pub fn size_bytes(&self) -> u64 {
        let n: usize = self
            .state
            .weights
            .pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum();
        (n as u64) * 4 * 3
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// A frozen snapshot of an adapter (or the base model alone) to sample from.
pub struct Session {
    pub id: SessionId,
    pub tenant: TenantId,
    pub adapter: Option<AdapterId>,
    pub weights: Option<Arc<LoraWeights>>,
    /// The Tinker session it is released with ([`Registry::remove_sessions_owned_by`]);
    /// `None`: its creator removes it.
    pub owner: Option<String>,
}

pub struct Registry {
    base: tokio::sync::OnceCell<Arc<BaseModel>>,
    loader: ModelLoader,
    loads: AtomicUsize,
    adapters: DashMap<AdapterId, Arc<AdapterEntry>>,
    sessions: DashMap<SessionId, Arc<Session>>,
    checkpoints: DashMap<(TenantId, String), Arc<Checkpoint>>,
    persist: Option<Arc<dyn Persist>>,
}

impl Registry {
    pub fn with_persist(loader: ModelLoader, persist: Option<Arc<dyn Persist>>) -> Self {
        Registry {
            persist,
            ..Self::new(loader)
        }
    }

    pub fn persist(&self) -> Option<&Arc<dyn Persist>> {
        self.persist.as_ref()
    }

    pub fn new(loader: ModelLoader) -> Self {
        Registry {
            base: tokio::sync::OnceCell::new(),
            loader,
            loads: AtomicUsize::new(0),
            adapters: DashMap::new(),
            sessions: DashMap::new(),
            checkpoints: DashMap::new(),
            persist: None,
        }
    }

    /// The base model, loaded on first use. Concurrent first callers wait for one load; a
    /// failed load is not cached, so a later call tries again.
    pub async fn base(&self) -> Result<Arc<BaseModel>> {
        self.base
            .get_or_try_init(|| async {
                let loader = self.loader.clone();
                self.loads.fetch_add(1, Ordering::SeqCst);
                let m = tokio::task::spawn_blocking(move || loader())
                    .await
                    .map_err(|e| Error::Unavailable(format!("model loader panicked: {e}")))??;
                Ok::<_, Error>(m)
            })
            .await
            .cloned()
    }

    /// The base model if it is loaded already.
    pub fn base_now(&self) -> Option<Arc<BaseModel>> {
        self.base.get().cloned()
    }

    /// How many times the loader ran (1 once loaded, whatever the number of callers).
    pub fn load_count(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    pub fn insert_adapter(&self, entry: AdapterEntry) -> Arc<AdapterEntry> {
        let e = Arc::new(entry);
        self.adapters.insert(e.id.clone(), e.clone());
        e
    }

    /// The adapter, if it exists and belongs to `tenant`.
    pub fn adapter(&self, tenant: &TenantId, id: &AdapterId) -> Result<Arc<AdapterEntry>> {
        match self.adapters.get(id) {
            Some(e) if &e.tenant == tenant => Ok(e.clone()),
            _ => Err(Error::NotFound {
                kind: "model",
                id: id.to_string(),
            }),
        }
    }

    pub(crate) fn remove_adapter(&self, tenant: &TenantId, id: &AdapterId) -> Result<()> {
        self.adapter(tenant, id)?;
        self.adapters.remove(id);
        Ok(())
    }

    pub fn exists(&self, id: &AdapterId) -> bool {
        self.adapters.contains_key(id)
    }

    /// Models owned by `tenant`.
    pub fn adapters_of(&self, tenant: &TenantId) -> Vec<AdapterId> {
        self.adapters
            .iter()
            .filter(|e| &e.tenant == tenant)
            .map(|e| e.id.clone())
            .collect()
    }

    pub fn num_adapters(&self) -> usize {
        self.adapters.len()
    }

    pub(crate) fn insert_session(&self, s: Session) -> SessionId {
        let id = s.id.clone();
        self.sessions.insert(id.clone(), Arc::new(s));
        id
    }

    pub fn session(&self, tenant: &TenantId, id: &SessionId) -> Result<Arc<Session>> {
        match self.sessions.get(id) {
            Some(s) if &s.tenant == tenant => Ok(s.clone()),
            _ => Err(Error::NotFound {
                kind: "sampling session",
                id: id.to_string(),
            }),
        }
    }

    pub(crate) fn save_checkpoint(
        &self,
        tenant: &TenantId,
        name: &str,
        model: &AdapterId,
        t: TrainableAdapter,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let created = SystemTime::now();
        let c = Arc::new(Checkpoint {
            name: name.to_owned(),
            model: model.clone(),
            state: Arc::new(t),
            created,
            expires: ttl.map(|d| created + d),
        });
        if let Some(p) = &self.persist {
            p.save_checkpoint(tenant, &c)?;
        }
        self.checkpoints
            .insert((tenant.clone(), name.to_owned()), c);
        Ok(())
    }

    /// A checkpoint read back from the store at start-up.
    pub fn restore_checkpoint(&self, tenant: &TenantId, c: Checkpoint) {
        self.checkpoints
            .insert((tenant.clone(), c.name.clone()), Arc::new(c));
    }

    /// A checkpoint of `tenant`'s, unless it expired.
    pub fn checkpoint(&self, tenant: &TenantId, name: &str) -> Result<Arc<TrainableAdapter>> {
        Ok(self.checkpoint_entry(tenant, name)?.state.clone())
    }

    pub fn checkpoint_entry(&self, tenant: &TenantId, name: &str) -> Result<Arc<Checkpoint>> {
        match self.checkpoints.get(&(tenant.clone(), name.to_owned())) {
            Some(c) if !c.expired(SystemTime::now()) => Ok(c.clone()),
            _ => Err(Error::NotFound {
                kind: "checkpoint",
                id: name.to_owned(),
            }),
        }
    }

    /// `tenant`'s live checkpoints whose names start with `prefix`, oldest first. Expired
    /// ones are dropped on the way.
    pub fn checkpoints_of(&self, tenant: &TenantId, prefix: &str) -> Vec<Arc<Checkpoint>> {
        let now = SystemTime::now();
        let mut v: Vec<_> = self
            .checkpoints
            .iter()
            .filter(|e| &e.key().0 == tenant && e.key().1.starts_with(prefix))
            .filter(|e| !e.value().expired(now))
            .map(|e| e.value().clone())
            .collect();
        v.sort_by_key(|c| c.created);
        v
    }

    pub fn delete_checkpoint(&self, tenant: &TenantId, name: &str) -> Result<()> {
        let c = self.checkpoint_entry(tenant, name)?;
        if let Some(p) = &self.persist {
            p.delete_checkpoint(tenant, &c)?;
        }
        self.checkpoints.remove(&(tenant.clone(), name.to_owned()));
        Ok(())
    }

    /// Checkpoints whose time to live ran out, removed from the cache (and handed back so
    /// the caller can delete their files).
    pub fn take_expired_checkpoints(&self) -> Vec<(TenantId, Arc<Checkpoint>)> {
        let now = SystemTime::now();
        let keys: Vec<_> = self
            .checkpoints
            .iter()
            .filter(|e| e.value().expired(now))
            .map(|e| e.key().clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.checkpoints.remove(&k).map(|(k, c)| (k.0, c)))
            .collect()
    }

    /// Set or clear a checkpoint's time to live, counted from now.
    pub fn set_checkpoint_ttl(
        &self,
        tenant: &TenantId,
        name: &str,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let c = self.checkpoint_entry(tenant, name)?;
        let c = Arc::new(Checkpoint {
            name: c.name.clone(),
            model: c.model.clone(),
            state: c.state.clone(),
            created: c.created,
            expires: ttl.map(|d| SystemTime::now() + d),
        });
        if let Some(p) = &self.persist {
            p.set_checkpoint_expiry(tenant, &c)?;
        }
        self.checkpoints
            .insert((tenant.clone(), name.to_owned()), c);
        Ok(())
    }

    /// Remove `tenant`'s sampling sessions owned by the Tinker session `owner`; returns
    /// their ids.
    pub fn remove_sessions_owned_by(&self, tenant: &TenantId, owner: &str) -> Vec<SessionId> {
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|s| &s.tenant == tenant && s.owner.as_deref() == Some(owner))
            .map(|s| s.id.clone())
            .collect();
        for id in &ids {
            self.sessions.remove(id);
        }
        ids
    }

    /// Sampling sessions held now.
    pub fn num_sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn remove_session(&self, tenant: &TenantId, id: &SessionId) -> Result<()> {
        self.session(tenant, id)?;
        self.sessions.remove(id);
        Ok(())
    }
}
