//! The job engine: many tenants submit work at once; work on different models never waits
//! on each other, work on one model runs in `seq_id` order, and the device sees big
//! multi-adapter batches instead of many small ones.
//!
//! The path of a training request:
//! [`Engine::submit`] (resolve the model for its tenant, check the op once against its base
//! into a [`CheckedOp`]: the data the later stages take as they are) → the [`scheduler`]
//! actor (admission, dedup by `seq_id`, per-model queue) → a batch of many models' work up
//! to a token budget → a worker [`lane`] (one forward_backward pass over the batch, then
//! each model's barriers) → the job's future ([`future`]) → the caller's long-poll.
//!
//! A sampling request goes [`Engine::sample`] → the [`sampling`] lane of its base model,
//! which decodes every live sequence of every session on that base together and lets
//! sequences join and leave between steps.
//!
//! One server may serve several base models, each under the name clients use
//! ([`Engine::start_bases`]). Every training run, checkpoint and sampling session names its
//! base; a batch holds the work of one base only (the scheduler picks the base of the
//! least-served tenant's ready work, then fills the batch with that base's peers), and
//! each base has its own sampling lane.
//!
//! Parts: [`ids`] (newtypes), [`future`] (store interface and in-memory store, long-poll),
//! [`registry`] (base model once, models with a lock each, checkpoints, sessions),
//! [`job`] (the operations), [`scheduler`], [`lane`], [`sampling`], [`metrics`],
//! [`metadata`] (clients' `user_metadata`), [`history`] (every training result's metrics,
//! per run and step), [`residency`] (which adapters are in memory, within
//! `--adapter-memory`: the scheduler loads a cold adapter on a blocking thread as soon as
//! work for it is queued, and only resident adapters join batches).
//! Model work never runs on tokio's workers: lanes are dedicated threads.
//!
//! Nothing here grows with the number of requests served: futures expire and are capped
//! ([`future::FutureStoreConfig`]), long-poll wake-ups exist only while someone waits,
//! the scheduler keeps one queue per live model, the sampler only what is decoding
//! and a prefix cache of at most `prefix_cache_bytes`,
//! per-tenant counters are capped (`max_metric_tenants`), adapters in memory by
//! `adapter_memory` (with a store; the rest wait on disk), and the registry holds live
//! models, sampling sessions (removed by whoever made them, or with their Tinker session)
//! and checkpoints (deleted, or expired by their time to live).

pub mod future;
pub mod history;
pub mod ids;
pub mod job;
pub(crate) mod lane;
pub mod metadata;
pub mod metrics;
pub mod output;
pub mod registry;
pub mod residency;
pub mod sampling;
pub(crate) mod scheduler;
pub mod snapshot;

pub use future::{
    FutureRecord, FutureStore, FutureStoreConfig, JobFailure, JobKind, JobOutput, JobState,
    MemoryFutureStore,
};
pub use ids::{AdapterId, FutureId, SessionId, TenantId};
pub use job::{CheckedOp, FbRequest, Op};
pub use metadata::UserMetadata;
pub use metrics::TenantMetrics;
pub use registry::{ModelLoader, Registry, RunMeta};
pub use sampling::{
    SampleOutput, SampleRecorder, SampleRequest, SampledSeq, SequenceSampler, TokenSampler,
};

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraWeights};
use crate::model::BaseModel;
use crate::train::TrainableAdapter;
use future::Futures;
use metrics::Metrics;
use registry::{AdapterEntry, Session};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Commands waiting for the scheduler before new submissions are refused as busy.
const COMMAND_QUEUE: usize = 4096;

/// The engine's handle: cheap to clone, usable from any task. Start it inside a tokio
/// runtime; it stops when the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: EngineConfig,
    registry: Arc<Registry>,
    futures: Arc<Futures>,
    metrics: Arc<Metrics>,
    history: Arc<history::History>,
    cmds: mpsc::Sender<scheduler::Cmd>,
    /// One sampling lane per served base, in the registry's order, started on first use.
    samplers: Vec<tokio::sync::OnceCell<std::sync::mpsc::Sender<sampling::SampleJob>>>,
    sampling_outstanding: Arc<AtomicUsize>,
}

impl Engine {
    /// Start the scheduler and `max_workers` lanes, with futures kept in memory, serving
    /// one base model named [`crate::config::DEFAULT_MODEL_NAME`].
    pub fn start(cfg: EngineConfig, loader: ModelLoader) -> Result<Engine> {
        Self::start_with_store(cfg, loader, Arc::new(MemoryFutureStore::default()))
    }

    /// An engine around a model that is already loaded, served under its own name
    /// ([`BaseModel::name`]).
    pub fn with_model(cfg: EngineConfig, model: Arc<BaseModel>) -> Result<Engine> {
        Self::with_models(cfg, vec![model])
    }

    /// An engine serving models already loaded, each under its own name; the first is the
    /// default base.
    pub fn with_models(cfg: EngineConfig, models: Vec<Arc<BaseModel>>) -> Result<Engine> {
        let bases = models
            .into_iter()
            .map(|m| {
                let name = m.name.clone();
                let loader: ModelLoader = Arc::new(move || Ok(m.clone()));
                (name, loader)
            })
            .collect();
        Self::start_bases(cfg, bases, Arc::new(MemoryFutureStore::default()), None)
    }

    pub fn start_with_store(
        cfg: EngineConfig,
        loader: ModelLoader,
        store: Arc<dyn FutureStore>,
    ) -> Result<Engine> {
        Self::start_durable(cfg, loader, store, None)
    }

    /// An engine whose futures live in `store` and whose models and checkpoints persist
    /// through `persist`.
    pub fn start_durable(
        cfg: EngineConfig,
        loader: ModelLoader,
        store: Arc<dyn FutureStore>,
        persist: Option<Arc<dyn registry::Persist>>,
    ) -> Result<Engine> {
        let name = crate::config::DEFAULT_MODEL_NAME.to_owned();
        Self::start_bases(cfg, vec![(name, loader)], store, persist)
    }

    /// An engine serving several base models, `(name, loader)` each (the first is the
    /// default, for callers that name none), with futures in `store` and models and
    /// checkpoints persisted through `persist`. Each base loads on first use.
    pub fn start_bases(
        cfg: EngineConfig,
        bases: Vec<(String, ModelLoader)>,
        store: Arc<dyn FutureStore>,
        persist: Option<Arc<dyn registry::Persist>>,
    ) -> Result<Engine> {
        let quotas = Arc::new(crate::quota::Quotas::new(&cfg.quotas));
        let registry = Arc::new(
            Registry::with_bases(bases, persist)?
                .with_quotas(quotas)
                .with_adapter_memory(cfg.adapter_memory),
        );
        let samplers = registry
            .base_names()
            .iter()
            .map(|_| tokio::sync::OnceCell::new())
            .collect();
        let futures = Arc::new(Futures::new(store));
        let metrics = Arc::new(Metrics::new(cfg.max_metric_tenants));
        let history = Arc::new(history::History::default());
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let mut lanes = Vec::new();
        for lane in 0..cfg.max_workers.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            lane::spawn_lane(
                lane::LaneCtx {
                    lane,
                    futures: futures.clone(),
                    metrics: metrics.clone(),
                    history: history.clone(),
                    report: report_tx.clone(),
                },
                rx,
            )?;
            lanes.push(tx);
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let sched = scheduler::Scheduler::new(
            cfg.clone(),
            registry.clone(),
            futures.clone(),
            metrics.clone(),
            lanes,
        );
        tokio::spawn(sched.run(cmd_rx, report_rx));
        Ok(Engine {
            inner: Arc::new(Inner {
                cfg,
                registry,
                futures,
                metrics,
                history,
                cmds: cmd_tx,
                samplers,
                sampling_outstanding: Arc::new(AtomicUsize::new(0)),
            }),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The per-tenant quotas and rate limits this engine enforces.
    pub fn quotas(&self) -> &Arc<crate::quota::Quotas> {
        self.inner.registry.quotas()
    }

    /// Jobs of `tenant` queued or running now (what its `queued_jobs` quota counts).
    pub fn jobs_held(&self, tenant: &TenantId) -> u64 {
        let m = self.inner.metrics.snapshot(tenant);
        (m.queued + m.running).max(0) as u64
    }

    /// Refuse a new job of `tenant` at its `queued_jobs` quota (429: jobs finish).
    pub fn admit_job(&self, tenant: &TenantId) -> Result<()> {
        self.quotas().check_queued(
            tenant,
            self.jobs_held(tenant),
            self.inner.cfg.retry_after_ms,
        )
    }

    /// The default base model, loaded on first use (once, however many callers race).
    pub async fn base_model(&self) -> Result<Arc<BaseModel>> {
        self.inner.registry.base().await
    }

    /// The served base model named `name`, loaded on first use; an unknown name is a user
    /// error that lists the served ones.
    pub async fn base_model_named(&self, name: &str) -> Result<Arc<BaseModel>> {
        self.inner.registry.base_named(name).await
    }

    /// A new training model owned by `tenant` on the default base, with a generated id;
    /// its requests' seq_ids start at 0.
    pub async fn create_model(&self, tenant: &TenantId, config: LoraConfig) -> Result<AdapterId> {
        self.create_model_on(tenant, None, config).await
    }

    /// [`Self::create_model`] on the served base named `base` (`None`: the default).
    pub async fn create_model_on(
        &self,
        tenant: &TenantId,
        base: Option<&str>,
        config: LoraConfig,
    ) -> Result<AdapterId> {
        let meta = RunMeta {
            base: base.map(str::to_owned),
            ..RunMeta::default()
        };
        self.create_model_as(tenant, AdapterId::generate(), config, Some(0), meta)
            .await
    }

    /// A new training model under a caller-chosen id (the API's `{session}:train:{n}`),
    /// whose first request will carry `first_seq`, on the base `meta.base` names (`None`:
    /// the default), which its record keeps.
    pub async fn create_model_as(
        &self,
        tenant: &TenantId,
        id: AdapterId,
        config: LoraConfig,
        first_seq: Option<u64>,
        mut meta: RunMeta,
    ) -> Result<AdapterId> {
        let base = self.inner.registry.resolve_base(meta.base.as_deref())?;
        if self.inner.registry.exists(&id) {
            return Err(Error::invalid("model_id", format!("{id} exists already")));
        }
        let slot = self.inner.registry.reserve_run(tenant)?;
        let model = self.base_model_named(&base).await?;
        meta.base = Some(base);
        config.validate()?;
        let entry = if self.inner.registry.residency().spills() {
            // Its initial weights come from its seed: made on its first job, like a
            // reload, so a new run takes no adapter memory until it is used.
            let bytes = residency::entry_bytes(&config, &model.config);
            AdapterEntry::cold(
                id.clone(),
                tenant.clone(),
                config,
                first_seq,
                meta.clone(),
                bytes,
                0,
            )
        } else {
            let cfg = config.clone();
            let weights = tokio::task::spawn_blocking(move || {
                LoraWeights::init(&cfg, &model.config, &model.device)
            })
            .await
            .map_err(|e| Error::Unavailable(format!("adapter init panicked: {e}")))??;
            AdapterEntry::new(
                id.clone(),
                tenant.clone(),
                config,
                first_seq,
                meta.clone(),
                TrainableAdapter::new(weights),
            )
        };
        if let Some(p) = self.inner.registry.persist().cloned() {
            let (t, i, c) = (tenant.clone(), entry.id.clone(), entry.config.clone());
            tokio::task::spawn_blocking(move || p.model_created(&t, &i, &c, &meta, true))
                .await
                .map_err(|e| Error::Unavailable(format!("store panicked: {e}")))??;
        }
        let entry = self.inner.registry.insert_reserved(slot, entry);
        tracing::info!(tenant = %tenant, model = %id, base = %entry.base, "model created");
        Ok(id)
    }

    /// Delete a model: its queued work fails with NotFound; a batch already running on it
    /// finishes. Other models are not touched.
    pub async fn delete_model(&self, tenant: &TenantId, id: &AdapterId) -> Result<()> {
        self.remove_model(tenant, id, true).await
    }

    /// Free a model's memory but keep its record and checkpoints (a Tinker session ended;
    /// the run stays listable and its saved states can still start new models).
    pub async fn unload_model(&self, tenant: &TenantId, id: &AdapterId) -> Result<()> {
        self.remove_model(tenant, id, false).await
    }

    async fn remove_model(&self, tenant: &TenantId, id: &AdapterId, purge: bool) -> Result<()> {
        let entry = self.inner.registry.adapter(tenant, id)?;
        self.inner.registry.remove_adapter(tenant, id)?;
        if let Some(p) = self.inner.registry.persist().cloned() {
            let (t, i) = (tenant.clone(), id.clone());
            let (step, last) = (entry.step(), entry.last_request());
            tokio::task::spawn_blocking(move || {
                if purge {
                    p.model_deleted(&t, &i)
                } else {
                    p.model_unloaded(&t, &i, step, last)
                }
            })
            .await
            .map_err(|e| Error::Unavailable(format!("store panicked: {e}")))??;
        }
        if purge {
            self.inner.registry.remove_checkpoints_of(tenant, id);
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .cmds
            .send(scheduler::Cmd::Delete {
                adapter: id.clone(),
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Queue work on a model. With a `seq_id`, work runs in seq_id order and a repeated
    /// seq_id returns the first future; without, it runs after everything queued so far.
    /// Refused with [`Error::Busy`] when queues are full.
    pub async fn submit(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        seq_id: Option<u64>,
        op: Op,
    ) -> Result<FutureId> {
        let entry = self.inner.registry.adapter(tenant, model)?;
        entry.touch();
        let base = self.base_model_named(&entry.base).await?;
        // With a seq_id the request keeps its place and fails in turn; without, at once.
        let op = match (op.check(&base), seq_id) {
            (Ok(op), _) => op,
            (Err(e), None) => return Err(e),
            (Err(e), Some(_)) => Op::Refused(JobFailure::from(&e)),
        };
        let (reply, rx) = oneshot::channel();
        let cmd = scheduler::Cmd::Submit {
            tenant: tenant.clone(),
            entry,
            seq_id,
            op,
            reply,
        };
        self.inner.cmds.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Busy {
                what: "the scheduler's inbox",
                retry_after_ms: self.inner.cfg.retry_after_ms,
            },
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })?;
        rx.await.map_err(|_| stopped())?
    }

    /// Run `work` as a job of its own (not a model's queue): a future is created at once,
    /// and completed with what `work` returns. For short control work such as creating a
    /// model, so that every long call of the API answers with a future.
    pub fn spawn_job<F>(&self, tenant: &TenantId, kind: JobKind, work: F) -> Result<FutureId>
    where
        F: std::future::Future<Output = Result<JobOutput>> + Send + 'static,
    {
        use futures_util::FutureExt;
        use tracing::Instrument;
        self.admit_job(tenant)?;
        let id = self.inner.futures.create(tenant, kind, 0)?;
        let futures = self.inner.futures.clone();
        let metrics = self.inner.metrics.clone();
        let span = tracing::info_span!("job", future = %id, tenant = %tenant, kind = ?kind);
        let fid = id.clone();
        let t = tenant.clone();
        metrics.queued(&t);
        tokio::spawn(
            async move {
                futures.set_running(&fid);
                metrics.started(&t);
                // A panic fails this job's future; the runtime and other jobs go on.
                let outcome = std::panic::AssertUnwindSafe(async {
                    crate::failpoint::hit("job.task");
                    work.await
                })
                .catch_unwind()
                .await
                .unwrap_or_else(|p| {
                    tracing::error!(panic = %crate::util::panic_message(&*p), "job panicked");
                    Err(Error::Panic("the job failed".into()))
                });
                // Counters first: whoever the future wakes may read them.
                metrics.finished(&t, outcome.is_ok(), true);
                if let Err(e) = &outcome {
                    tracing::info!(error = %e, "job failed");
                }
                futures.finish(&fid, outcome.map_err(|e| JobFailure::from(&e)));
            }
            .instrument(span),
        );
        Ok(id)
    }

    /// Copy a checkpoint `tenant` may read into a new training run `dest` of its own, as
    /// `name`: the run is recorded but never loaded (it cannot be trained on); the copy
    /// shares the source's tensors in memory, is written to the store like any save and
    /// counts against `tenant`'s checkpoint quota.
    pub async fn copy_checkpoint(
        &self,
        tenant: &TenantId,
        source: Arc<registry::Checkpoint>,
        dest: &AdapterId,
        name: &str,
        session: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        if self.inner.registry.exists(dest) {
            return Err(Error::invalid(
                "model_seq_id",
                format!("{dest} exists already"),
            ));
        }
        let registry = self.inner.registry.clone();
        let (t, d, n) = (tenant.clone(), dest.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            if let Some(p) = registry.persist() {
                let meta = RunMeta {
                    base: Some(source.base.clone()),
                    session,
                    user_metadata: None,
                };
                p.model_created(&t, &d, &source.config, &meta, false)?;
            }
            let saved = registry.checkpoint_state(&source).and_then(|state| {
                registry.save_checkpoint(
                    &t,
                    &n,
                    &d,
                    &source.base,
                    state,
                    ttl,
                    source.user_metadata.clone(),
                )
            });
            if saved.is_err() {
                // No copy (over quota, say): no run for it either.
                if let Some(p) = registry.persist() {
                    if let Err(e) = p.model_deleted(&t, &d) {
                        tracing::warn!(model = %d, error = %e, "cannot drop a failed copy's run");
                    }
                }
            }
            saved
        })
        .await
        .map_err(|e| Error::Unavailable(format!("copy panicked: {e}")))?
    }

    /// A sampling session on a checkpoint's weights (frozen at save time), on the base its
    /// run trained on: the tenant's own checkpoint or a published one. Its files are read
    /// (off tokio's workers).
    pub async fn checkpoint_sampling_session(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<SessionId> {
        let c = self.inner.registry.readable_checkpoint(tenant, name)?;
        self.inner.registry.resolve_base(Some(&c.base))?;
        let state = self.checkpoint_state(c.clone()).await?;
        let sid = SessionId::generate();
        let snap = snapshot::Snapshot::new(sid.clone(), tenant.clone(), state.weights.clone());
        let session = Session {
            id: sid,
            tenant: tenant.clone(),
            base: c.base.clone(),
            adapter: Some(c.model.clone()),
            weights: Some(snap),
            owner: None,
        };
        // Inserting may write the snapshot to disk (memory full).
        let registry = self.inner.registry.clone();
        tokio::task::spawn_blocking(move || registry.insert_session(session))
            .await
            .map_err(|e| Error::Unavailable(format!("session insert panicked: {e}")))?
    }

    /// A checkpoint's state, read from disk on a blocking thread (see
    /// [`Registry::checkpoint_state`]).
    pub async fn checkpoint_state(
        &self,
        c: Arc<registry::Checkpoint>,
    ) -> Result<Arc<TrainableAdapter>> {
        let registry = self.inner.registry.clone();
        tokio::task::spawn_blocking(move || registry.checkpoint_state(&c))
            .await
            .map_err(|e| Error::Unavailable(format!("checkpoint read panicked: {e}")))?
    }

    /// A training run's current weights, loaded from disk for the moment if it is cold
    /// (it stays resident as the most recently used).
    pub async fn adapter_weights(&self, tenant: &TenantId, id: &AdapterId) -> Result<LoraWeights> {
        let entry = self.inner.registry.adapter(tenant, id)?;
        if let Some(w) = entry.weights() {
            return Ok(w);
        }
        let base = self.base_model_named(&entry.base).await?;
        let res = self.inner.registry.residency().clone();
        tokio::task::spawn_blocking(move || {
            res.load_pinned(&entry, &base)?;
            let w = entry.weights();
            res.unpin(&entry.id);
            w.ok_or_else(|| Error::Unavailable("the adapter left memory while read".into()))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("adapter load panicked: {e}")))?
    }

    /// The residency manager's view: adapters and bytes in memory, the budget.
    pub fn residency(&self) -> residency::ResidencySnapshot {
        self.inner.registry.residency().snapshot()
    }

    /// The future's record now.
    pub fn future(&self, tenant: &TenantId, id: &FutureId) -> Result<FutureRecord> {
        self.inner.futures.get(tenant, id)
    }

    /// Long-poll: the record once it is done or failed, or as it is after `timeout`.
    pub async fn wait(
        &self,
        tenant: &TenantId,
        id: &FutureId,
        timeout: Duration,
    ) -> Result<FutureRecord> {
        self.inner.futures.wait(tenant, id, timeout).await
    }

    /// Wait for a future and return its output, or its failure as [`Error::JobFailed`].
    pub async fn result(
        &self,
        tenant: &TenantId,
        id: &FutureId,
        timeout: Duration,
    ) -> Result<Arc<JobOutput>> {
        let r = self.wait(tenant, id, timeout).await?;
        match (r.state, r.output, r.failure) {
            (JobState::Done, Some(o), _) => Ok(o),
            (JobState::Failed, _, Some(f)) => Err(Error::JobFailed {
                message: f.message,
                category: f.category,
            }),
            _ => Err(Error::Unavailable(format!(
                "future {id} not finished after {timeout:?}"
            ))),
        }
    }

    /// A sampling session on the default base model alone.
    pub async fn base_sampling_session(&self, tenant: &TenantId) -> Result<SessionId> {
        self.base_sampling_session_on(tenant, None).await
    }

    /// A sampling session on the served base named `base` alone (`None`: the default).
    pub async fn base_sampling_session_on(
        &self,
        tenant: &TenantId,
        base: Option<&str>,
    ) -> Result<SessionId> {
        let base = self.inner.registry.resolve_base(base)?;
        self.base_model_named(&base).await?;
        self.inner.registry.insert_session(Session {
            id: SessionId::generate(),
            tenant: tenant.clone(),
            base,
            adapter: None,
            weights: None,
            owner: None,
        })
    }

    /// Freeze a model's weights (after all its earlier work) into a sampling session.
    pub async fn sampling_session(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        seq_id: Option<u64>,
        timeout: Duration,
    ) -> Result<SessionId> {
        let f = self
            .submit(tenant, model, seq_id, Op::SamplingSession)
            .await?;
        match &*self.result(tenant, &f, timeout).await? {
            JobOutput::SamplingSession(s) => Ok(s.clone()),
            _ => Err(Error::Unavailable("unexpected job output".into())),
        }
    }

    /// Queue a sampling request on a session. Refused with [`Error::Busy`] when the sampler
    /// has `max_queued_samples` requests already.
    pub async fn sample(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        req: SampleRequest,
    ) -> Result<FutureId> {
        let s = self.inner.registry.session(tenant, session)?;
        let model = self.base_model_named(&s.base).await?;
        req.validate(&model)?;
        let positions = req.positions();
        if positions > self.inner.cfg.max_sample_tokens {
            return Err(Error::invalid(
                "num_samples",
                format!(
                    "num_samples × (prompt + max_tokens) = {positions} exceeds the limit of {} \
                     per request (LORAPLEX_MAX_SAMPLE_TOKENS)",
                    self.inner.cfg.max_sample_tokens
                ),
            ));
        }
        self.admit_job(tenant)?;
        let tx = self.sampler(&s.base, &model).await?;
        // Its snapshot in memory and pinned until the request ends (read back from disk
        // if it was evicted).
        let pin = match s.weights.clone() {
            None => None,
            Some(snap) => {
                let (res, base) = (self.inner.registry.residency().clone(), model.clone());
                Some(
                    tokio::task::spawn_blocking(move || res.pin_snapshot(&snap, &base))
                        .await
                        .map_err(|e| {
                            Error::Unavailable(format!("snapshot load panicked: {e}"))
                        })??,
                )
            }
        };
        let n = self
            .inner
            .sampling_outstanding
            .fetch_add(1, Ordering::SeqCst);
        if n >= self.inner.cfg.max_queued_samples {
            self.inner
                .sampling_outstanding
                .fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Busy {
                what: "the sampling queue",
                retry_after_ms: self.inner.cfg.retry_after_ms,
            });
        }
        let tokens = (req.prompt.len() + req.params.max_tokens * req.num_samples) as u64;
        debug_assert!(tokens as usize <= positions);
        let future = self.inner.futures.create(tenant, JobKind::Sample, tokens)?;
        self.inner.metrics.queued(tenant);
        let span = tracing::info_span!(
            "job",
            future = %future,
            tenant = %tenant,
            session = %session,
            kind = "sample",
            tokens
        );
        let job = sampling::SampleJob {
            future: future.clone(),
            tenant: tenant.clone(),
            session: s,
            pin,
            req: Arc::new(req),
            span,
        };
        if tx.send(job).is_err() {
            self.inner
                .sampling_outstanding
                .fetch_sub(1, Ordering::SeqCst);
            let e = stopped();
            self.inner.futures.fail(&future, &e);
            return Err(e);
        }
        Ok(future)
    }

    /// The sampling lane of the base named `base` (which is `model`), started on first use.
    async fn sampler(
        &self,
        base: &str,
        model: &Arc<BaseModel>,
    ) -> Result<&std::sync::mpsc::Sender<sampling::SampleJob>> {
        let i = self
            .inner
            .registry
            .base_names()
            .iter()
            .position(|n| n == base)
            .ok_or_else(|| Error::Unavailable(format!("no sampling lane for {base}")))?;
        let cell = self
            .inner
            .samplers
            .get(i)
            .ok_or_else(|| Error::Unavailable("no sampling lane".into()))?;
        cell.get_or_try_init(|| async {
            let (tx, rx) = std::sync::mpsc::channel();
            sampling::spawn_sampler(
                sampling::SamplerCtx {
                    base: base.to_owned(),
                    model: model.clone(),
                    futures: self.inner.futures.clone(),
                    metrics: self.inner.metrics.clone(),
                    outstanding: self.inner.sampling_outstanding.clone(),
                    max_decode_batch: self.inner.cfg.max_decode_batch,
                    max_kv_tokens: self.inner.cfg.max_kv_tokens,
                    prefix_cache_bytes: self.inner.cfg.prefix_cache_bytes,
                    share_prompt_kv: self.inner.cfg.share_prompt_kv,
                },
                rx,
            )?;
            Ok::<_, Error>(tx)
        })
        .await
    }

    /// Wait until no job is queued or running, or `timeout` passes; says whether it
    /// drained. For a graceful shutdown.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = self
                .all_tenant_metrics()
                .iter()
                .any(|(_, m)| m.queued > 0 || m.running > 0);
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every tenant's counters.
    pub fn all_tenant_metrics(&self) -> Vec<(TenantId, TenantMetrics)> {
        self.inner.metrics.all()
    }

    /// Bytes of request data held by queued training jobs (bounded by
    /// `LORAPLEX_MAX_QUEUED_BYTES`).
    pub fn queued_bytes(&self) -> usize {
        self.inner.metrics.queued_bytes.load(Ordering::Acquire)
    }

    /// Totals of the tenants whose counters were folded away to keep the tenant count
    /// under `max_metric_tenants` ([`metrics`]).
    pub fn folded_tenant_metrics(&self) -> TenantMetrics {
        self.inner.metrics.folded()
    }

    /// Long-poll wake-ups registered now (one per future somebody waits on).
    pub fn waiting_futures(&self) -> usize {
        self.inner.futures.waiters_len()
    }

    /// Jobs failed by a tenant's plugin since start.
    pub fn plugin_failures(&self) -> u64 {
        self.inner.futures.plugin_failures.load(Ordering::Relaxed)
    }

    /// Every training result's metrics as they happen ([`history`]); the server attaches
    /// its store.
    pub fn history(&self) -> &history::History {
        &self.inner.history
    }

    /// How many adapters shared each training batch so far ([`metrics::BatchShapes`]).
    pub fn batch_shapes(&self) -> metrics::BatchShapesSnapshot {
        self.inner.metrics.batches.snapshot()
    }

    /// Per-tenant counters: jobs queued, running, done, failed; tokens processed.
    pub fn tenant_metrics(&self, tenant: &TenantId) -> TenantMetrics {
        self.inner.metrics.snapshot(tenant)
    }
}

fn stopped() -> Error {
    Error::Unavailable("the engine has stopped".into())
}
