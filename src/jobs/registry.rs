//! The adapter registry: the served base models (each loaded once, however many callers
//! race for it, and known by the name clients use), the training models with one lock
//! each, named checkpoints, and frozen sampling snapshots. Every training run, checkpoint
//! and sampling session names its base: work on one base never meets another's. Create and delete never block on other adapters: the map is sharded
//! (dashmap) and a lane holds only the locks of the adapters in its batch.
//!
//! The registry stores state; it never decides order (the scheduler does) and never runs
//! model work. A training run's adapter may be cold (on disk only): which ones are in
//! memory is the [`Residency`] manager's decision, within the adapter-memory budget.
//!
//! Bounds: a model stays until deleted or unloaded (with its Tinker session, or by the
//! session reaper after `LORAPLEX_SESSION_TIMEOUT_S`); a sampling session until whoever
//! made it removes it (a request that made it for itself, or its Tinker session, see
//! [`Session::owner`]); a checkpoint until deleted or past its time to live. It also keeps, beside
//! each map, what every tenant holds in it, and refuses what would go over the tenant's
//! quota ([`crate::quota`]): training runs, sampling sessions, checkpoint bytes. Restored
//! state goes through the same inserts, so it counts.
//!
//! A checkpoint belongs to one tenant; a published one ([`Registry::set_checkpoint_public`])
//! is also readable by the others ([`Registry::readable_checkpoint`]), never changed or
//! deleted by them. Only loaded training runs are here: the record of an unloaded one
//! (its session ended) stays in the store ([`Persist::model_unloaded`]).

use super::ids::{AdapterId, SessionId, TenantId};
use super::metadata::UserMetadata;
use super::residency::Residency;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraGrads, LoraWeights};
use crate::model::BaseModel;
use crate::quota::{Quota, Quotas};
use crate::train::{TrainableAdapter, WorkResult};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The adapter-memory budget of a registry built without one
/// ([`crate::config::EngineConfig::adapter_memory`]'s default).
const DEFAULT_BUDGET: u64 = crate::config::DEFAULT_ADAPTER_MEMORY;

/// Where the registry's state persists (the store, [`crate::store::Durable`]); the
/// registry itself is the in-memory cache. Every method may block on disk: call it from a
/// lane or a blocking thread, never on tokio's workers.
pub trait Persist: Send + Sync {
    /// Write a checkpoint durably; the save is acknowledged only after this returns.
    fn save_checkpoint(
        &self,
        tenant: &TenantId,
        c: &Checkpoint,
        state: &TrainableAdapter,
    ) -> Result<()>;
    /// Read a checkpoint's state back from disk (the files mapped, not copied), checked
    /// against `base`.
    fn read_checkpoint(&self, c: &Checkpoint, base: &BaseModel) -> Result<TrainableAdapter>;
    fn delete_checkpoint(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()>;
    fn set_checkpoint_expiry(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()>;
    /// Record whether other tenants may read the checkpoint.
    fn set_checkpoint_public(&self, tenant: &TenantId, c: &Checkpoint) -> Result<()>;
    /// After an optimizer step: record the step; write the automatic checkpoint when due.
    /// Returns whether it wrote one (the durable state is then the adapter's state).
    fn stepped(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        state: &TrainableAdapter,
    ) -> Result<bool>;
    /// Make `state` the run's newest durable state (an automatic checkpoint, written
    /// atomically): an adapter leaving memory with steps not yet written.
    fn write_back(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        state: &TrainableAdapter,
    ) -> Result<()>;
    /// Write an adapter's accumulated gradients (not yet applied by an optim_step) to the
    /// store's gradient folder: the adapter is leaving memory with them.
    fn spill_grads(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        weights: &LoraWeights,
        grads: &LoraGrads,
    ) -> Result<()>;
    /// Spilled gradients of `model`, read back and removed from disk (`None`: none there).
    fn take_grads(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        base: &BaseModel,
    ) -> Result<Option<LoraGrads>>;
    /// Write a sampling snapshot's weights to the store's snapshot folder (it is leaving
    /// memory; atomically: a reader sees the whole file or none).
    fn spill_snapshot(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        weights: &LoraWeights,
    ) -> Result<()>;
    /// Read a spilled snapshot back (mapped, checked against `base`).
    fn read_snapshot(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        base: &BaseModel,
    ) -> Result<LoraWeights>;
    /// Delete a spilled snapshot (its session ended); none there is not an error.
    fn drop_snapshot(&self, tenant: &TenantId, session: &SessionId) -> Result<()>;
    /// The run's newest durable state (its newest automatic or explicit checkpoint, or
    /// its initial weights from the seed), and whether it is *clean*: what a later call
    /// would return again as long as nothing new is written (an automatic checkpoint or
    /// the initial weights; an explicit checkpoint can be deleted).
    fn load_adapter(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        config: &LoraConfig,
        base: &BaseModel,
    ) -> Result<(TrainableAdapter, bool)>;
    /// A new training run's record; `loaded: false` for one that never trains (a copy).
    fn model_created(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        config: &LoraConfig,
        meta: &RunMeta,
        loaded: bool,
    ) -> Result<()>;
    /// The run left memory (its session ended, or it was unloaded): its record and its
    /// checkpoints stay, listable and loadable, but it is not brought back after a restart.
    fn model_unloaded(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        step: u64,
        last_request: SystemTime,
    ) -> Result<()>;
    /// The run is deleted: its record, its checkpoints and their files go.
    fn model_deleted(&self, tenant: &TenantId, model: &AdapterId) -> Result<()>;
}

/// What describes a training run besides its weights: its base model, the Tinker session
/// it was made in and the client's `user_metadata`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunMeta {
    /// The served base model's name; `None`: the default (first served) base.
    pub base: Option<String>,
    pub session: Option<String>,
    pub user_metadata: Option<UserMetadata>,
}

/// Builds (or hands over) a base model; called on a blocking thread, at most once per
/// success.
pub type ModelLoader = Arc<dyn Fn() -> Result<Arc<BaseModel>> + Send + Sync>;

/// One served base model: the name clients use and how to load it.
struct BaseSlot {
    name: String,
    cell: tokio::sync::OnceCell<Arc<BaseModel>>,
    loader: ModelLoader,
    loads: AtomicUsize,
}

/// A training model: one adapter of one tenant.
pub struct AdapterEntry {
    pub id: AdapterId,
    pub tenant: TenantId,
    /// The served base model it trains on (by name); its batches hold only its peers.
    pub base: String,
    pub config: LoraConfig,
    /// The seq_id its first request carries (Tinker: 1, or 0 when it starts by loading a
    /// checkpoint); `None` (a model restored after a restart) takes the first that arrives.
    pub first_seq: Option<u64>,
    /// The Tinker session it belongs to, if any.
    pub session: Option<String>,
    /// What the client attached to it (`create_model`, `load_weights`).
    pub user_metadata: Option<UserMetadata>,
    pub created: std::time::SystemTime,
    /// When it last got work (ms since the epoch; 0: never), for training run listings.
    last_request_ms: std::sync::atomic::AtomicU64,
    /// Bytes it takes when resident ([`super::residency::entry_bytes`]).
    pub bytes: u64,
    /// Set once the run is deleted or unloaded: a load in flight is dropped.
    removed: std::sync::atomic::AtomicBool,
    /// Held by the one lane that runs this adapter's work, and briefly by readers.
    pub(crate) state: Mutex<AdapterState>,
}

pub(crate) struct AdapterState {
    /// Weights, optimizer state and gradients while resident; `None`: cold (on disk
    /// only, loaded back by [`super::residency::Residency::load_pinned`]).
    pub train: Option<TrainableAdapter>,
    /// Optimizer steps taken, known while cold too.
    pub step: u64,
    /// A change not yet in the durable state (a step between automatic checkpoints, a
    /// `load_state`): eviction writes it back first.
    pub dirty: bool,
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
    /// `meta.base` must be resolved already (a served base's name); `None` is recorded as
    /// the empty name, which no base has.
    pub fn new(
        id: AdapterId,
        tenant: TenantId,
        config: LoraConfig,
        first_seq: Option<u64>,
        meta: RunMeta,
        train: TrainableAdapter,
    ) -> Self {
        let bytes = (train.weights.num_params() as u64) * 16;
        let step = train.optim.step;
        Self::build(
            id,
            tenant,
            config,
            first_seq,
            meta,
            bytes,
            step,
            Some(train),
        )
    }

    /// A training run whose adapter is on disk only (`bytes` when resident, see
    /// [`super::residency::entry_bytes`]); its first job loads it.
    pub fn cold(
        id: AdapterId,
        tenant: TenantId,
        config: LoraConfig,
        first_seq: Option<u64>,
        meta: RunMeta,
        bytes: u64,
        step: u64,
    ) -> Self {
        Self::build(id, tenant, config, first_seq, meta, bytes, step, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        id: AdapterId,
        tenant: TenantId,
        config: LoraConfig,
        first_seq: Option<u64>,
        meta: RunMeta,
        bytes: u64,
        step: u64,
        train: Option<TrainableAdapter>,
    ) -> Self {
        AdapterEntry {
            id,
            tenant,
            base: meta.base.unwrap_or_default(),
            config,
            first_seq,
            session: meta.session,
            user_metadata: meta.user_metadata,
            created: std::time::SystemTime::now(),
            last_request_ms: Default::default(),
            bytes,
            removed: Default::default(),
            state: Mutex::new(AdapterState {
                train,
                step,
                dirty: false,
                partial: None,
            }),
        }
    }

    /// A copy of the current weights if resident (cheap: tensors are shared, updates
    /// replace them); `None` when cold ([`super::Engine::adapter_weights`] loads them).
    pub fn weights(&self) -> Option<LoraWeights> {
        self.state.lock().train.as_ref().map(|t| t.weights.clone())
    }

    /// Whether the run was deleted or unloaded.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
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
        self.state.lock().step
    }
}

/// A named copy of a model's weights and optimizer state: what describes it. With a
/// store the state itself is on disk only, read when used ([`Registry::checkpoint_state`]).
pub struct Checkpoint {
    pub name: String,
    pub model: AdapterId,
    /// The tenant that owns it.
    pub owner: TenantId,
    /// The base model its run trained on: it loads and samples only on that base.
    pub base: String,
    /// Its adapter's configuration (what a load checks before reading any file).
    pub config: LoraConfig,
    /// Optimizer steps of the saved state.
    pub step: u64,
    /// Bytes of weights plus optimizer moments, as f32 (what listings and quotas count).
    pub size: u64,
    /// The state, in memory only for a registry without a store.
    pub held: Option<Arc<TrainableAdapter>>,
    pub created: SystemTime,
    pub expires: Option<SystemTime>,
    /// Readable (load, sample) by every tenant; only its owner changes or deletes it.
    pub public: bool,
    pub user_metadata: Option<UserMetadata>,
}

impl Checkpoint {
    /// The same checkpoint with other attributes (the state is shared, not copied).
    fn with(&self, expires: Option<SystemTime>, public: bool) -> Checkpoint {
        Checkpoint {
            name: self.name.clone(),
            model: self.model.clone(),
            owner: self.owner.clone(),
            base: self.base.clone(),
            config: self.config.clone(),
            step: self.step,
            size: self.size,
            held: self.held.clone(),
            created: self.created,
            expires,
            public,
            user_metadata: self.user_metadata.clone(),
        }
    }

    /// Bytes of weights plus optimizer moments, as f32.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// [`Self::size`] of a state of `params` LoRA parameters.
    pub fn size_of(params: usize) -> u64 {
        (params as u64) * 4 * 3
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// A frozen snapshot of an adapter (or the base model alone) to sample from.
pub struct Session {
    pub id: SessionId,
    pub tenant: TenantId,
    /// The base model it samples from (by name).
    pub base: String,
    pub adapter: Option<AdapterId>,
    /// The frozen LoRA weights it samples with (`None`: the base alone), managed by the
    /// residency manager from the moment the session is inserted.
    pub weights: Option<Arc<super::snapshot::Snapshot>>,
    /// The Tinker session it is released with ([`Registry::remove_sessions_owned_by`]);
    /// `None`: its creator removes it.
    pub owner: Option<String>,
}

/// What one tenant holds in the registry, for its quotas. An entry goes once it is empty,
/// so the map is no bigger than the set of tenants holding something.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    /// Training runs, counting those being created.
    runs: u64,
    sessions: u64,
    /// Bytes of checkpoints being written now.
    saving: u64,
}

type HeldMap = DashMap<TenantId, Held>;

/// Change a tenant's counts; the entry goes when it is empty.
fn adjust(held: &HeldMap, tenant: &TenantId, f: impl FnOnce(&mut Held)) {
    let empty = {
        let mut h = held.entry(tenant.clone()).or_default();
        f(&mut h);
        h.is_empty()
    };
    if empty {
        held.remove_if(tenant, |_, h| h.is_empty());
    }
}

impl Held {
    fn is_empty(&self) -> bool {
        self.runs == 0 && self.sessions == 0 && self.saving == 0
    }
}

/// A claimed place for a new training run: the run's once inserted
/// ([`Registry::insert_reserved`]); dropped unused (the creation failed), it frees.
pub struct RunSlot {
    held: Arc<HeldMap>,
    tenant: TenantId,
    armed: bool,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        if self.armed {
            adjust(&self.held, &self.tenant, |h| {
                h.runs = h.runs.saturating_sub(1)
            });
        }
    }
}

pub struct Registry {
    /// In the order served; the first is the default.
    bases: Vec<BaseSlot>,
    adapters: DashMap<AdapterId, Arc<AdapterEntry>>,
    sessions: DashMap<SessionId, Arc<Session>>,
    checkpoints: DashMap<(TenantId, String), Arc<Checkpoint>>,
    /// Published checkpoints: name → owner. Names are unique across tenants (they start
    /// with the run's id), so another tenant finds one by its path alone.
    published: DashMap<String, TenantId>,
    persist: Option<Arc<dyn Persist>>,
    /// Which adapters are in memory, within the adapter-memory budget.
    residency: Arc<Residency>,
    quotas: Arc<Quotas>,
    held: Arc<HeldMap>,
}

impl Registry {
    pub fn with_persist(loader: ModelLoader, persist: Option<Arc<dyn Persist>>) -> Self {
        Registry {
            residency: Arc::new(Residency::new(DEFAULT_BUDGET, persist.clone())),
            persist,
            ..Self::new(loader)
        }
    }

    /// The same registry with an adapter-memory budget of `bytes`. Call before any
    /// training run is inserted.
    pub fn with_adapter_memory(self, bytes: u64) -> Self {
        Registry {
            residency: Arc::new(Residency::new(bytes, self.persist.clone())),
            ..self
        }
    }

    /// The residency manager: what is in memory, the budget, loads and evictions.
    pub fn residency(&self) -> &Arc<Residency> {
        &self.residency
    }

    /// A registry serving several base models, `(name, loader)` in order (the first is the
    /// default), persisting through `persist`. Refused: no base, an empty or repeated name.
    pub fn with_bases(
        bases: Vec<(String, ModelLoader)>,
        persist: Option<Arc<dyn Persist>>,
    ) -> Result<Self> {
        if bases.is_empty() {
            return Err(Error::invalid("model", "no base model to serve"));
        }
        let mut slots: Vec<BaseSlot> = Vec::with_capacity(bases.len());
        for (name, loader) in bases {
            if name.is_empty() {
                return Err(Error::invalid("model", "a base model's name is empty"));
            }
            if slots.iter().any(|s| s.name == name) {
                return Err(Error::invalid(
                    "model",
                    format!("base model {name:?} is named twice"),
                ));
            }
            slots.push(BaseSlot {
                name,
                cell: tokio::sync::OnceCell::new(),
                loader,
                loads: AtomicUsize::new(0),
            });
        }
        Ok(Registry {
            bases: slots,
            residency: Arc::new(Residency::new(DEFAULT_BUDGET, persist.clone())),
            persist,
            ..Self::empty()
        })
    }

    /// The same registry, enforcing `quotas`.
    pub fn with_quotas(self, quotas: Arc<Quotas>) -> Self {
        Registry { quotas, ..self }
    }

    pub fn quotas(&self) -> &Arc<Quotas> {
        &self.quotas
    }

    pub fn persist(&self) -> Option<&Arc<dyn Persist>> {
        self.persist.as_ref()
    }

    /// A registry serving one base model, named [`crate::config::DEFAULT_MODEL_NAME`].
    pub fn new(loader: ModelLoader) -> Self {
        Registry {
            bases: vec![BaseSlot {
                name: crate::config::DEFAULT_MODEL_NAME.to_owned(),
                cell: tokio::sync::OnceCell::new(),
                loader,
                loads: AtomicUsize::new(0),
            }],
            ..Self::empty()
        }
    }

    fn empty() -> Self {
        Registry {
            bases: Vec::new(),
            adapters: DashMap::new(),
            sessions: DashMap::new(),
            checkpoints: DashMap::new(),
            published: DashMap::new(),
            persist: None,
            residency: Arc::new(Residency::new(DEFAULT_BUDGET, None)),
            quotas: Arc::new(Quotas::default()),
            held: Arc::new(DashMap::new()),
        }
    }

    /// The served base models' names, the default first.
    pub fn base_names(&self) -> Vec<String> {
        self.bases.iter().map(|b| b.name.clone()).collect()
    }

    /// The default base model's name (the first served).
    pub fn default_base(&self) -> &str {
        self.bases.first().map_or("", |b| b.name.as_str())
    }

    /// The served base named `name`, or a user error (field `base_model`) naming it and
    /// listing the served ones.
    fn slot(&self, name: &str) -> Result<&BaseSlot> {
        self.bases.iter().find(|b| b.name == name).ok_or_else(|| {
            let served: Vec<String> = self.bases.iter().map(|b| format!("{:?}", b.name)).collect();
            Error::invalid(
                "base_model",
                format!(
                    "{name:?} is not served here; this server serves {}",
                    served.join(", ")
                ),
            )
        })
    }

    /// `name` if it is a served base model (else the error of [`Self::slot`]); `None`
    /// names the default base.
    pub fn resolve_base(&self, name: Option<&str>) -> Result<String> {
        match name {
            Some(n) => self.slot(n).map(|b| b.name.clone()),
            None => Ok(self.default_base().to_owned()),
        }
    }

    /// The default base model, loaded on first use.
    pub async fn base(&self) -> Result<Arc<BaseModel>> {
        let name = self.default_base().to_owned();
        self.base_named(&name).await
    }

    /// The base model named `name`, loaded on first use. Concurrent first callers wait for
    /// one load; a failed load is not cached, so a later call tries again.
    pub async fn base_named(&self, name: &str) -> Result<Arc<BaseModel>> {
        let slot = self.slot(name)?;
        slot.cell
            .get_or_try_init(|| async {
                let loader = slot.loader.clone();
                slot.loads.fetch_add(1, Ordering::SeqCst);
                let m = tokio::task::spawn_blocking(move || loader())
                    .await
                    .map_err(|e| Error::Unavailable(format!("model loader panicked: {e}")))??;
                Ok::<_, Error>(m)
            })
            .await
            .cloned()
    }

    /// The default base model if it is loaded already.
    pub fn base_now(&self) -> Option<Arc<BaseModel>> {
        self.bases.first().and_then(|b| b.cell.get().cloned())
    }

    /// The base model named `name` if it is served and loaded already.
    pub fn base_now_named(&self, name: &str) -> Option<Arc<BaseModel>> {
        self.bases
            .iter()
            .find(|b| b.name == name)
            .and_then(|b| b.cell.get().cloned())
    }

    /// Every served base: its name and the model once loaded, the default first.
    pub fn bases_now(&self) -> Vec<(String, Option<Arc<BaseModel>>)> {
        self.bases
            .iter()
            .map(|b| (b.name.clone(), b.cell.get().cloned()))
            .collect()
    }

    /// How many times the loaders ran, all bases together (1 per base once loaded,
    /// whatever the number of callers).
    pub fn load_count(&self) -> usize {
        self.bases
            .iter()
            .map(|b| b.loads.load(Ordering::SeqCst))
            .sum()
    }

    /// Loaded training runs on each served base, the default first.
    pub fn runs_per_base(&self) -> Vec<(String, usize)> {
        let mut n: Vec<(String, usize)> = self.bases.iter().map(|b| (b.name.clone(), 0)).collect();
        for e in self.adapters.iter() {
            if let Some(x) = n.iter_mut().find(|(b, _)| *b == e.base) {
                x.1 += 1;
            }
        }
        n
    }

    /// Insert a training run whatever the tenant's quota (one restored after a restart).
    pub fn insert_adapter(&self, entry: AdapterEntry) -> Arc<AdapterEntry> {
        adjust(&self.held, &entry.tenant, |h| h.runs += 1);
        self.put_adapter(entry)
    }

    fn put_adapter(&self, entry: AdapterEntry) -> Arc<AdapterEntry> {
        let e = Arc::new(entry);
        if let Some(old) = self.adapters.insert(e.id.clone(), e.clone()) {
            adjust(&self.held, &old.tenant, |h| {
                h.runs = h.runs.saturating_sub(1)
            });
            old.removed.store(true, Ordering::Release);
            self.residency.forget(&old.id);
        }
        if e.state.lock().train.is_some() {
            self.residency.admit_resident(&e);
        }
        e
    }

    /// Claim a place for a new training run of `tenant`, refused at its `training_runs`
    /// quota. Runs being created count, so racing creates cannot overshoot.
    pub fn reserve_run(&self, tenant: &TenantId) -> Result<RunSlot> {
        let limit = self.quotas.limit(tenant, Quota::TrainingRuns);
        let mut refused = None;
        adjust(&self.held, tenant, |h| {
            if h.runs >= limit {
                refused = Some(h.runs);
            } else {
                h.runs += 1;
            }
        });
        if let Some(used) = refused {
            return Err(Error::QuotaExceeded {
                quota: Quota::TrainingRuns.name(),
                limit,
                used,
                requested: 1,
            });
        }
        Ok(RunSlot {
            held: self.held.clone(),
            tenant: tenant.clone(),
            armed: true,
        })
    }

    /// Insert a training run into the place claimed for it.
    pub fn insert_reserved(&self, mut slot: RunSlot, entry: AdapterEntry) -> Arc<AdapterEntry> {
        if slot.tenant != entry.tenant {
            // Not the tenant the place was claimed for: count the run as its own.
            return self.insert_adapter(entry);
        }
        slot.armed = false;
        self.put_adapter(entry)
    }

    /// Refused if `tenant` cannot create one more training run now.
    pub fn check_run_quota(&self, tenant: &TenantId) -> Result<()> {
        self.quotas
            .check(tenant, Quota::TrainingRuns, self.usage(tenant).0, 1)
    }

    /// Training runs (counting those being created) and sampling sessions `tenant` holds.
    pub fn usage(&self, tenant: &TenantId) -> (u64, u64) {
        self.held
            .get(tenant)
            .map_or((0, 0), |h| (h.runs, h.sessions))
    }

    /// Bytes of `tenant`'s live checkpoints (as their listings report them).
    pub fn checkpoint_bytes(&self, tenant: &TenantId) -> u64 {
        self.checkpoint_bytes_except(tenant, None)
    }

    fn checkpoint_bytes_except(&self, tenant: &TenantId, except: Option<&str>) -> u64 {
        let now = SystemTime::now();
        self.checkpoints
            .iter()
            .filter(|e| &e.key().0 == tenant && Some(e.key().1.as_str()) != except)
            .filter(|e| !e.value().expired(now))
            .map(|e| e.value().size_bytes())
            .sum()
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

    /// Remove a training run, and the ephemeral sampling sessions made from it (those a
    /// Tinker session owns: `save_weights_for_sampler` without a path). They stand for the
    /// run's in-memory weights and go with them; named sampler checkpoints stay loadable.
    pub(crate) fn remove_adapter(&self, tenant: &TenantId, id: &AdapterId) -> Result<()> {
        self.adapter(tenant, id)?;
        if let Some((_, old)) = self.adapters.remove(id) {
            adjust(&self.held, &old.tenant, |h| {
                h.runs = h.runs.saturating_sub(1)
            });
            old.removed.store(true, Ordering::Release);
            self.residency.forget(id);
        }
        let ephemeral: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|s| &s.tenant == tenant && s.owner.is_some() && s.adapter.as_ref() == Some(id))
            .map(|s| s.id.clone())
            .collect();
        for sid in &ephemeral {
            let _ = self.remove_session(tenant, sid);
        }
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

    /// Insert a sampling session, refused at the tenant's `sampling_sessions` quota. Its
    /// snapshot joins the residency manager (written to disk at once if memory is full:
    /// call this where blocking is allowed).
    pub(crate) fn insert_session(&self, s: Session) -> Result<SessionId> {
        let limit = self.quotas.limit(&s.tenant, Quota::SamplingSessions);
        let mut refused = None;
        adjust(&self.held, &s.tenant, |h| {
            if h.sessions >= limit {
                refused = Some(h.sessions);
            } else {
                h.sessions += 1;
            }
        });
        if let Some(used) = refused {
            return Err(Error::QuotaExceeded {
                quota: Quota::SamplingSessions.name(),
                limit,
                used,
                requested: 1,
            });
        }
        let id = s.id.clone();
        if let Some(snap) = &s.weights {
            if let Err(e) = self.residency.admit_snapshot(snap) {
                adjust(&self.held, &s.tenant, |h| {
                    h.sessions = h.sessions.saturating_sub(1)
                });
                return Err(e);
            }
        }
        if let Some(old) = self.sessions.insert(id.clone(), Arc::new(s)) {
            self.session_gone(&old);
        }
        Ok(id)
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

    /// Keep `state` under `name` (replacing a checkpoint of that name, which becomes
    /// private), written through to the store before it is visible. Refused at the tenant's
    /// `checkpoint_bytes` quota, writing nothing.
    pub(crate) fn save_checkpoint(
        &self,
        tenant: &TenantId,
        name: &str,
        model: &AdapterId,
        base: &str,
        state: Arc<TrainableAdapter>,
        ttl: Option<Duration>,
        user_metadata: Option<UserMetadata>,
    ) -> Result<()> {
        let created = SystemTime::now();
        let c = Arc::new(Checkpoint {
            name: name.to_owned(),
            model: model.clone(),
            owner: tenant.clone(),
            base: base.to_owned(),
            config: state.weights.config.clone(),
            step: state.optim.step,
            size: Checkpoint::size_of(state.weights.num_params()),
            // With a store the files are the copy; the state goes with this call.
            held: self.persist.is_none().then(|| state.clone()),
            created,
            expires: ttl.map(|d| created + d),
            public: false,
            user_metadata,
        });
        // Claim the bytes before writing, counting saves in flight, so two saves cannot
        // both take the last space; a refused save writes nothing. (A checkpoint it
        // replaces does not count.)
        let size = c.size_bytes();
        let limit = self.quotas.limit(tenant, Quota::CheckpointBytes);
        let mut refused = None;
        adjust(&self.held, tenant, |h| {
            let used = self.checkpoint_bytes_except(tenant, Some(name)) + h.saving;
            if used.saturating_add(size) > limit {
                refused = Some(used);
            } else {
                h.saving += size;
            }
        });
        if let Some(used) = refused {
            return Err(Error::QuotaExceeded {
                quota: Quota::CheckpointBytes.name(),
                limit,
                used,
                requested: size,
            });
        }
        let written = match &self.persist {
            Some(p) => p.save_checkpoint(tenant, &c, &state),
            None => Ok(()),
        };
        if written.is_ok() {
            self.published.remove_if(name, |_, owner| owner == tenant);
            self.checkpoints
                .insert((tenant.clone(), name.to_owned()), c);
        }
        adjust(&self.held, tenant, |h| {
            h.saving = h.saving.saturating_sub(size)
        });
        written
    }

    /// A checkpoint read back from the store at start-up.
    pub fn restore_checkpoint(&self, tenant: &TenantId, c: Checkpoint) {
        if c.public {
            self.published.insert(c.name.clone(), tenant.clone());
        }
        self.checkpoints
            .insert((tenant.clone(), c.name.clone()), Arc::new(c));
    }

    /// A checkpoint's state: in memory without a store, else read from its files (mapped;
    /// no copy is kept). Blocking: call from a lane or a blocking thread.
    pub fn checkpoint_state(&self, c: &Checkpoint) -> Result<Arc<TrainableAdapter>> {
        if let Some(s) = &c.held {
            return Ok(s.clone());
        }
        let p = self
            .persist
            .as_ref()
            .ok_or_else(|| Error::Unavailable("a checkpoint without its state".into()))?;
        let base = self.base_now_named(&c.base).ok_or_else(|| {
            Error::invalid(
                "path",
                format!(
                    "checkpoint {:?} is on base model {:?}, not loaded",
                    c.name, c.base
                ),
            )
        })?;
        Ok(Arc::new(p.read_checkpoint(c, &base)?))
    }

    /// A checkpoint of `tenant`'s, unless it expired: what its owner may change or delete.
    pub fn checkpoint_entry(&self, tenant: &TenantId, name: &str) -> Result<Arc<Checkpoint>> {
        match self.checkpoints.get(&(tenant.clone(), name.to_owned())) {
            Some(c) if !c.expired(SystemTime::now()) => Ok(c.clone()),
            _ => Err(Error::NotFound {
                kind: "checkpoint",
                id: name.to_owned(),
            }),
        }
    }

    /// A checkpoint `tenant` may read (load into its own run, sample from, describe): its
    /// own, or another tenant's published one. Anything else is NotFound.
    pub fn readable_checkpoint(&self, tenant: &TenantId, name: &str) -> Result<Arc<Checkpoint>> {
        if let Ok(c) = self.checkpoint_entry(tenant, name) {
            return Ok(c);
        }
        let owner = self.published.get(name).map(|o| o.clone());
        match owner.map(|o| self.checkpoint_entry(&o, name)) {
            Some(Ok(c)) if c.public => Ok(c),
            _ => Err(Error::NotFound {
                kind: "checkpoint",
                id: name.to_owned(),
            }),
        }
    }

    /// The owner of a run with a published checkpoint, if any.
    pub fn publisher_of_run(&self, run: &AdapterId) -> Option<TenantId> {
        let prefix = format!("{run}/");
        self.published
            .iter()
            .find(|e| e.key().starts_with(&prefix))
            .map(|e| e.value().clone())
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
        v.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        v
    }

    pub fn delete_checkpoint(&self, tenant: &TenantId, name: &str) -> Result<()> {
        let c = self.checkpoint_entry(tenant, name)?;
        if let Some(p) = &self.persist {
            p.delete_checkpoint(tenant, &c)?;
        }
        self.published.remove_if(name, |_, owner| owner == tenant);
        self.checkpoints.remove(&(tenant.clone(), name.to_owned()));
        Ok(())
    }

    /// Forget every checkpoint of a deleted run (the store removes their files).
    pub(crate) fn remove_checkpoints_of(&self, tenant: &TenantId, model: &AdapterId) {
        let prefix = format!("{model}/");
        self.checkpoints
            .retain(|(t, name), _| !(t == tenant && name.starts_with(&prefix)));
        self.published
            .retain(|name, owner| !(owner == tenant && name.starts_with(&prefix)));
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
            .inspect(|(t, c)| {
                self.published.remove_if(&c.name, |_, owner| owner == t);
            })
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
        let c = Arc::new(c.with(ttl.map(|d| SystemTime::now() + d), c.public));
        if let Some(p) = &self.persist {
            p.set_checkpoint_expiry(tenant, &c)?;
        }
        self.checkpoints
            .insert((tenant.clone(), name.to_owned()), c);
        Ok(())
    }

    /// Publish (readable by every tenant) or unpublish one of `tenant`'s checkpoints.
    /// Doing it twice is not an error.
    pub fn set_checkpoint_public(&self, tenant: &TenantId, name: &str, public: bool) -> Result<()> {
        let c = self.checkpoint_entry(tenant, name)?;
        if c.public != public {
            let c = Arc::new(c.with(c.expires, public));
            if let Some(p) = &self.persist {
                p.set_checkpoint_public(tenant, &c)?;
            }
            self.checkpoints
                .insert((tenant.clone(), name.to_owned()), c);
        }
        if public {
            self.published.insert(name.to_owned(), tenant.clone());
        } else {
            self.published.remove_if(name, |_, owner| owner == tenant);
        }
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
            if let Some((_, old)) = self.sessions.remove(id) {
                self.session_gone(&old);
            }
        }
        ids
    }

    /// A removed session's counts and snapshot.
    fn session_gone(&self, old: &Session) {
        adjust(&self.held, &old.tenant, |h| {
            h.sessions = h.sessions.saturating_sub(1)
        });
        if let Some(snap) = &old.weights {
            self.residency.forget_snapshot(snap);
        }
    }

    /// Sampling sessions held now.
    pub fn num_sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn remove_session(&self, tenant: &TenantId, id: &SessionId) -> Result<()> {
        self.session(tenant, id)?;
        if let Some((_, old)) = self.sessions.remove(id) {
            self.session_gone(&old);
        }
        Ok(())
    }
}
