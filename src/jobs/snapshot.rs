//! Sampling snapshots: the frozen LoRA weights a sampling session samples with (a training
//! run's weights at the moment the session was made, or a checkpoint's). A snapshot is a
//! resident entry of the residency manager like an adapter ([`super::residency`]): it
//! counts against `--adapter-memory`, is pinned while a sampling request uses it, and an
//! idle one leaves memory in LRU order. Leaving memory the first time writes it to the
//! store's snapshot folder ([`super::registry::Persist::spill_snapshot`]), so it no longer
//! depends on the run or the checkpoint it came from; the next request reads it back.
//! Snapshots live as long as their session: sessions do not survive a restart, and the
//! store clears the folder when it opens.

use super::ids::{SessionId, TenantId};
use crate::lora::LoraWeights;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One session's weights, in memory or spilled.
pub struct Snapshot {
    pub session: SessionId,
    pub tenant: TenantId,
    /// Bytes it takes in memory (f32 weights).
    pub bytes: u64,
    /// The weights while resident; `None`: on disk only.
    pub(crate) weights: Mutex<Option<Arc<LoraWeights>>>,
    /// Written to the store already (a later eviction writes nothing).
    pub(crate) spilled: AtomicBool,
    removed: AtomicBool,
}

impl Snapshot {
    /// A snapshot of `weights` for `session`, in memory (not yet counted: admit it with
    /// [`super::residency::Residency::admit_snapshot`]).
    pub fn new(session: SessionId, tenant: TenantId, weights: LoraWeights) -> Arc<Snapshot> {
        let bytes = weights.num_params() as u64 * 4;
        Arc::new(Snapshot {
            session,
            tenant,
            bytes,
            weights: Mutex::new(Some(Arc::new(weights))),
            spilled: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        })
    }

    /// The weights if they are in memory now.
    pub fn resident_weights(&self) -> Option<Arc<LoraWeights>> {
        self.weights.lock().clone()
    }

    /// Its session is gone: a load in flight is dropped, an eviction writes nothing.
    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }
}

/// A pin on a snapshot for the length of one sampling request: released when dropped.
pub struct SnapshotPin {
    pub(crate) residency: Arc<super::residency::Residency>,
    pub(crate) session: SessionId,
    pub weights: Arc<LoraWeights>,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        self.residency.unpin_snapshot(&self.session);
    }
}

impl std::fmt::Debug for SnapshotPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotPin({})", self.session)
    }
}
