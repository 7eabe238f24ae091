//! The adapter registry: the base model (loaded once, however many callers race for it),
//! the training models with one lock each, named checkpoints, and frozen sampling
//! snapshots. Create and delete never block on other adapters: the map is sharded
//! (dashmap) and a lane holds only the locks of the adapters in its batch.
//!
//! The registry stores state; it never decides order (the scheduler does) and never runs
//! model work.

use super::ids::{AdapterId, SessionId, TenantId};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraGrads, LoraWeights};
use crate::model::BaseModel;
use crate::train::{TrainableAdapter, WorkResult};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Builds (or hands over) the base model; called on a blocking thread, at most once per
/// success.
pub type ModelLoader = Arc<dyn Fn() -> Result<Arc<BaseModel>> + Send + Sync>;

/// A training model: one adapter of one tenant.
pub struct AdapterEntry {
    pub id: AdapterId,
    pub tenant: TenantId,
    pub config: LoraConfig,
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
    /// A copy of the current weights (cheap: tensors are shared, updates replace them).
    pub fn weights(&self) -> LoraWeights {
        self.state.lock().train.weights.clone()
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> u64 {
        self.state.lock().train.optim.step
    }
}

/// A frozen snapshot of an adapter (or the base model alone) to sample from.
pub struct Session {
    pub id: SessionId,
    pub tenant: TenantId,
    pub adapter: Option<AdapterId>,
    pub weights: Option<Arc<LoraWeights>>,
}

pub struct Registry {
    base: tokio::sync::OnceCell<Arc<BaseModel>>,
    loader: ModelLoader,
    loads: AtomicUsize,
    adapters: DashMap<AdapterId, Arc<AdapterEntry>>,
    sessions: DashMap<SessionId, Arc<Session>>,
    checkpoints: DashMap<(TenantId, String), Arc<TrainableAdapter>>,
}

impl Registry {
    pub fn new(loader: ModelLoader) -> Self {
        Registry {
            base: tokio::sync::OnceCell::new(),
            loader,
            loads: AtomicUsize::new(0),
            adapters: DashMap::new(),
            sessions: DashMap::new(),
            checkpoints: DashMap::new(),
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

    pub(crate) fn insert_adapter(&self, entry: AdapterEntry) -> Arc<AdapterEntry> {
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

    pub(crate) fn save_checkpoint(&self, tenant: &TenantId, name: &str, t: TrainableAdapter) {
        self.checkpoints
            .insert((tenant.clone(), name.to_owned()), Arc::new(t));
    }

    pub(crate) fn checkpoint(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<Arc<TrainableAdapter>> {
        self.checkpoints
            .get(&(tenant.clone(), name.to_owned()))
            .map(|c| c.clone())
            .ok_or_else(|| Error::NotFound {
                kind: "checkpoint",
                id: name.to_owned(),
            })
    }
}
