//! Futures: every job's handle and its life, pending → running → done | failed.
//!
//! [`FutureStore`] is the storage interface (in memory here; the durability issue puts it in
//! SQLite). [`Futures`] adds what storage cannot: waking callers that long-poll a future.
//! A store never runs jobs and never decides outcomes; it records what the engine reports.

use super::ids::{FutureId, TenantId};
use super::sampling::SampleOutput;
use crate::error::{Category, Error, Result};
use crate::lora::optim::StepReport;
use crate::train::WorkResult;
use dashmap::DashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

/// What kind of work a future stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Forward,
    ForwardBackward,
    OptimStep,
    SaveState,
    LoadState,
    SamplingSession,
    Sample,
    /// A new training model (from scratch or from a checkpoint).
    CreateModel,
}

/// The result of a finished job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum JobOutput {
    ForwardBackward(WorkResult),
    OptimStep(StepReport),
    Saved {
        name: String,
    },
    Loaded {
        name: String,
        model: super::ids::AdapterId,
    },
    ModelCreated(super::ids::AdapterId),
    ModelUnloaded(super::ids::AdapterId),
    SamplingSession(super::ids::SessionId),
    Sample(SampleOutput),
}

/// Why a job failed: a message for the caller and whose fault it was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobFailure {
    pub message: String,
    pub category: Category,
}

impl From<&Error> for JobFailure {
    fn from(e: &Error) -> Self {
        JobFailure {
            message: e.to_string(),
            category: e.category(),
        }
    }
}

/// Progress of a long job, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub tokens_done: u64,
    pub tokens_total: u64,
}

#[derive(Debug, Clone)]
pub struct FutureRecord {
    pub id: FutureId,
    pub tenant: TenantId,
    pub kind: JobKind,
    pub state: JobState,
    pub progress: Progress,
    pub output: Option<Arc<JobOutput>>,
    pub failure: Option<JobFailure>,
    pub created: SystemTime,
}

impl FutureRecord {
    pub fn new(id: FutureId, tenant: TenantId, kind: JobKind, tokens_total: u64) -> Self {
        FutureRecord {
            id,
            tenant,
            kind,
            state: JobState::Pending,
            progress: Progress {
                tokens_done: 0,
                tokens_total,
            },
            output: None,
            failure: None,
            created: SystemTime::now(),
        }
    }
}

/// Where futures live. Implementations must be cheap to call from the engine's threads.
pub trait FutureStore: Send + Sync {
    fn insert(&self, record: FutureRecord) -> Result<()>;
    /// The record, if it exists and belongs to `tenant`; NotFound otherwise.
    fn get(&self, tenant: &TenantId, id: &FutureId) -> Result<FutureRecord>;
    fn set_running(&self, id: &FutureId) -> Result<()>;
    fn add_progress(&self, id: &FutureId, tokens: u64) -> Result<()>;
    /// Record the outcome. A future already finished keeps its first outcome.
    fn finish(&self, id: &FutureId, outcome: Result<JobOutput, JobFailure>) -> Result<()>;
}

/// The in-memory store: a concurrent map. Records are kept until the process exits.
#[derive(Default)]
pub struct MemoryFutureStore {
    map: DashMap<FutureId, FutureRecord>,
}

fn not_found(id: &FutureId) -> Error {
    Error::NotFound {
        kind: "future",
        id: id.to_string(),
    }
}

impl FutureStore for MemoryFutureStore {
    fn insert(&self, record: FutureRecord) -> Result<()> {
        self.map.insert(record.id.clone(), record);
        Ok(())
    }

    fn get(&self, tenant: &TenantId, id: &FutureId) -> Result<FutureRecord> {
        match self.map.get(id) {
            Some(r) if &r.tenant == tenant => Ok(r.clone()),
            _ => Err(not_found(id)),
        }
    }

    fn set_running(&self, id: &FutureId) -> Result<()> {
        let mut r = self.map.get_mut(id).ok_or_else(|| not_found(id))?;
        if r.state == JobState::Pending {
            r.state = JobState::Running;
        }
        Ok(())
    }

    fn add_progress(&self, id: &FutureId, tokens: u64) -> Result<()> {
        let mut r = self.map.get_mut(id).ok_or_else(|| not_found(id))?;
        r.progress.tokens_done += tokens;
        Ok(())
    }

    fn finish(&self, id: &FutureId, outcome: Result<JobOutput, JobFailure>) -> Result<()> {
        let mut r = self.map.get_mut(id).ok_or_else(|| not_found(id))?;
        if r.state.is_terminal() {
            return Ok(());
        }
        match outcome {
            Ok(o) => {
                r.state = JobState::Done;
                r.output = Some(Arc::new(o));
            }
            Err(f) => {
                r.state = JobState::Failed;
                r.failure = Some(f);
            }
        }
        Ok(())
    }
}

/// A store plus wake-ups for long-polling callers.
pub struct Futures {
    store: Arc<dyn FutureStore>,
    waiters: DashMap<FutureId, Arc<Notify>>,
    /// Jobs that failed because of a tenant's plugin.
    pub plugin_failures: std::sync::atomic::AtomicU64,
}

impl Futures {
    pub fn new(store: Arc<dyn FutureStore>) -> Self {
        Futures {
            store,
            waiters: DashMap::new(),
            plugin_failures: Default::default(),
        }
    }

    pub fn store(&self) -> &dyn FutureStore {
        &*self.store
    }

    pub fn create(&self, tenant: &TenantId, kind: JobKind, tokens_total: u64) -> Result<FutureId> {
        let id = FutureId::generate();
        self.store.insert(FutureRecord::new(
            id.clone(),
            tenant.clone(),
            kind,
            tokens_total,
        ))?;
        Ok(id)
    }

    pub fn get(&self, tenant: &TenantId, id: &FutureId) -> Result<FutureRecord> {
        self.store.get(tenant, id)
    }

    /// Record an outcome and wake everyone waiting on it. Storage errors are logged: the
    /// engine has nowhere else to send them.
    pub fn finish(&self, id: &FutureId, outcome: Result<JobOutput, JobFailure>) {
        if matches!(&outcome, Err(f) if f.message.starts_with("plugin")) {
            self.plugin_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(e) = self.store.finish(id, outcome) {
            tracing::error!(future = %id, error = %e, "cannot record a job's outcome");
        }
        if let Some((_, n)) = self.waiters.remove(id) {
            n.notify_waiters();
        }
    }

    pub fn fail(&self, id: &FutureId, e: &Error) {
        self.finish(id, Err(JobFailure::from(e)));
    }

    pub fn set_running(&self, id: &FutureId) {
        if let Err(e) = self.store.set_running(id) {
            tracing::warn!(future = %id, error = %e, "cannot mark a job running");
        }
    }

    pub fn add_progress(&self, id: &FutureId, tokens: u64) {
        let _ = self.store.add_progress(id, tokens);
    }

    /// Wait until the future is done or failed, or `timeout` passes (then its current,
    /// unfinished record is returned: the caller polls again).
    pub async fn wait(
        &self,
        tenant: &TenantId,
        id: &FutureId,
        timeout: Duration,
    ) -> Result<FutureRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notify = self.waiters.entry(id.clone()).or_default().clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            // Register before reading the state, so a finish in between still wakes us.
            notified.as_mut().enable();
            let rec = self.store.get(tenant, id)?;
            if rec.state.is_terminal() {
                return Ok(rec);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.store.get(tenant, id);
            }
        }
    }
}
