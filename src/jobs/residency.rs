//! The residency manager: which training runs have their adapter in memory (weights,
//! AdamW moments, gradient accumulator and step: a *resident entry*), within a byte budget
//! (`--adapter-memory`, [`crate::config::EngineConfig::adapter_memory`]).
//!
//! Entries are kept in LRU order of last use. An entry is *pinned* while a job uses it (the
//! scheduler holds one pin per model queue with outstanding work); only unpinned entries
//! are evicted. Gradients accumulated by forward_backward and not yet applied leave with
//! their adapter ([`Persist::spill_grads`]) and come back with it, so a tenant holding
//! gradients on many runs cannot fill the budget for everyone else.
//! Evicting an entry whose durable state is current writes nothing; a *dirty* one (a step
//! acknowledged but not yet in its automatic checkpoint, `LORAPLEX_AUTO_CHECKPOINT_STEPS`
//! above 1, or weights replaced by `load_state`) is written back first, atomically, through
//! [`Persist::write_back`]. A cold entry is loaded back from its newest durable state by
//! [`Residency::load_pinned`], which blocks: callers run it on a blocking thread, never on a
//! lane or tokio's workers.
//!
//! The budget is never exceeded: a load that does not fit evicts least recently used
//! entries; when pinned entries fill the budget it waits until one is released. An adapter
//! bigger than the whole budget is refused. Without a store to spill to (an engine with no
//! [`Persist`]) nothing is evicted and the budget is only counted.
//!
//! Sampling snapshots ([`super::snapshot`]) are entries too: pinned while a sampling
//! request uses them, counted against the same budget, written to the store the first
//! time they leave memory and read back by [`Residency::pin_snapshot`].
//!
//! This module decides what is in memory; it never decides order (the scheduler does) and
//! never runs model work.

use super::ids::{AdapterId, SessionId};
use super::registry::{AdapterEntry, Persist};
use super::snapshot::{Snapshot, SnapshotPin};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, ModelShape};
use crate::model::BaseModel;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of one resident entry of `config` on a model of shape `model`: per parameter the
/// weight, the two AdamW moments and the gradient accumulator, as f32.
pub fn entry_bytes(config: &LoraConfig, model: &impl ModelShape) -> u64 {
    let r = config.rank as u64;
    let params: u64 = config
        .sites(model)
        .into_iter()
        .map(|s| {
            let (i, o) = s.dims(model);
            r * (i as u64 + o as u64)
        })
        .sum();
    params * 4 * 4
}

/// Upper bounds (seconds) of the load-latency histogram's buckets.
pub const LOAD_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ResidencyStats {
    pub loads: AtomicU64,
    pub evictions: AtomicU64,
    /// Evictions that wrote the entry back first (it was dirty).
    pub write_backs: AtomicU64,
    /// Cumulative counts per bucket of [`LOAD_BUCKETS`] (non-cumulative here; the
    /// renderer sums), plus one for +Inf.
    load_buckets: [AtomicU64; LOAD_BUCKETS.len() + 1],
    load_seconds_micros: AtomicU64,
    /// The latest [`RECENT_LOADS`] load times (s), for percentiles.
    recent: Mutex<std::collections::VecDeque<f64>>,
}

/// Load times kept for percentiles.
const RECENT_LOADS: usize = 8192;

impl ResidencyStats {
    fn observe_load(&self, secs: f64) {
        let i = LOAD_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LOAD_BUCKETS.len());
        self.load_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.load_seconds_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.loads.fetch_add(1, Ordering::Relaxed);
        let mut r = self.recent.lock();
        if r.len() >= RECENT_LOADS {
            r.pop_front();
        }
        r.push_back(secs);
    }

    /// The latest load times (s), oldest first.
    pub fn recent_loads(&self) -> Vec<f64> {
        self.recent.lock().iter().copied().collect()
    }

    /// Per bucket (cumulative, the last is +Inf), and the sum of load seconds.
    pub fn load_histogram(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let v = self
            .load_buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        let sum = self.load_seconds_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (v, sum)
    }
}

/// A point-in-time view, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidencySnapshot {
    /// Training runs whose adapter is in memory.
    pub resident: usize,
    /// Sampling snapshots in memory.
    pub snapshots: usize,
    /// Bytes of both, loads in progress included.
    pub bytes: u64,
    pub budget: u64,
    /// Most bytes ever resident (or reserved by a load) at once.
    pub peak_bytes: u64,
    pub pinned: usize,
}

#[derive(Clone, Copy)]
enum Phase {
    /// Bytes reserved, state being read from disk.
    Loading,
    Resident,
    /// Being written back / dropped; a load of it waits until it is gone.
    Evicting,
}

/// What entries are keyed by: a training run's adapter or a session's snapshot.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    Adapter(AdapterId),
    Snapshot(SessionId),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Adapter(id) => write!(f, "adapter {id}"),
            Key::Snapshot(id) => write!(f, "snapshot of {id}"),
        }
    }
}

/// A resident entry's owner.
#[derive(Clone)]
enum Held {
    Adapter(Arc<AdapterEntry>),
    Snapshot(Arc<Snapshot>),
}

impl Held {
    fn key(&self) -> Key {
        match self {
            Held::Adapter(e) => Key::Adapter(e.id.clone()),
            Held::Snapshot(s) => Key::Snapshot(s.session.clone()),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Held::Adapter(e) => e.bytes,
            Held::Snapshot(s) => s.bytes,
        }
    }

    fn is_removed(&self) -> bool {
        match self {
            Held::Adapter(e) => e.is_removed(),
            Held::Snapshot(s) => s.is_removed(),
        }
    }

    /// Whether it may leave memory now: nobody reading it this instant, no request split
    /// across batches half done, and gradients not yet applied either absent or (with a
    /// store, `spills`) complete, so eviction can write them too.
    fn idle(&self, spills: bool) -> bool {
        match self {
            Held::Adapter(e) => e.state.try_lock().is_some_and(|st| {
                st.partial.is_none()
                    && st.train.as_ref().is_none_or(|t| {
                        t.grads.pairs.is_empty()
                            || (spills && t.grads.pairs.len() == t.weights.pairs.len())
                    })
            }),
            Held::Snapshot(s) => s.weights.try_lock().is_some(),
        }
    }
}

struct Slot {
    entry: Held,
    bytes: u64,
    pins: u32,
    /// Its key in `lru` while unpinned and resident.
    tick: u64,
    phase: Phase,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    slots: HashMap<Key, Slot>,
    /// Unpinned resident entries, least recently used first.
    lru: BTreeMap<u64, Key>,
    bytes: u64,
    peak: u64,
}

impl Inner {
    fn add_bytes(&mut self, b: u64) {
        self.bytes += b;
        self.peak = self.peak.max(self.bytes);
    }

    fn touch_lru(&mut self, key: &Key) {
        self.tick += 1;
        let t = self.tick;
        if let Some(s) = self.slots.get_mut(key) {
            self.lru.remove(&s.tick);
            s.tick = t;
            self.lru.insert(t, key.clone());
        }
    }

    /// The least recently used entry that may go (unpinned, idle), marked `Evicting`.
    fn take_victim(&mut self, spills: bool) -> Option<Held> {
        let (tick, key) = self.lru.iter().find_map(|(t, key)| {
            let s = self.slots.get(key)?;
            s.entry.idle(spills).then(|| (*t, key.clone()))
        })?;
        self.lru.remove(&tick);
        let s = self.slots.get_mut(&key)?;
        s.phase = Phase::Evicting;
        Some(s.entry.clone())
    }
}

pub struct Residency {
    budget: u64,
    persist: Option<Arc<dyn Persist>>,
    inner: Mutex<Inner>,
    /// Signalled whenever bytes are freed or a pin is released.
    freed: Condvar,
    pub stats: ResidencyStats,
}

impl Residency {
    /// A budget of `budget` bytes, spilling through `persist` (none: nothing is evicted).
    pub fn new(budget: u64, persist: Option<Arc<dyn Persist>>) -> Self {
        Residency {
            budget,
            persist,
            inner: Mutex::new(Inner::default()),
            freed: Condvar::new(),
            stats: ResidencyStats::default(),
        }
    }

    /// Whether entries can leave memory (a store to spill to).
    pub fn spills(&self) -> bool {
        self.persist.is_some()
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn snapshot(&self) -> ResidencySnapshot {
        let g = self.inner.lock();
        let resident = |snap: bool| {
            g.slots
                .values()
                .filter(|s| matches!(s.phase, Phase::Resident))
                .filter(|s| matches!(s.entry, Held::Snapshot(_)) == snap)
                .count()
        };
        ResidencySnapshot {
            resident: resident(false),
            snapshots: resident(true),
            bytes: g.bytes,
            budget: self.budget,
            peak_bytes: g.peak,
            pinned: g.slots.values().filter(|s| s.pins > 0).count(),
        }
    }

    /// Whether `id` is in memory now.
    pub fn is_resident(&self, id: &AdapterId) -> bool {
        self.is_resident_key(&Key::Adapter(id.clone()))
    }

    /// Whether the snapshot of sampling session `id` is in memory now.
    pub fn is_snapshot_resident(&self, id: &SessionId) -> bool {
        self.is_resident_key(&Key::Snapshot(id.clone()))
    }

    fn is_resident_key(&self, key: &Key) -> bool {
        self.inner
            .lock()
            .slots
            .get(key)
            .is_some_and(|s| matches!(s.phase, Phase::Resident))
    }

    /// Count an entry that is in memory already (created, or restored without a store),
    /// unpinned. Without a store this never waits nor evicts.
    pub(crate) fn admit_resident(&self, entry: &Arc<AdapterEntry>) {
        self.admit(Held::Adapter(entry.clone()));
    }

    fn admit(&self, held: Held) {
        let mut g = self.inner.lock();
        Self::admit_locked(&mut g, held);
    }

    fn admit_locked(g: &mut Inner, held: Held) {
        let key = held.key();
        if g.slots.contains_key(&key) {
            return;
        }
        let bytes = held.bytes();
        g.add_bytes(bytes);
        g.slots.insert(
            key.clone(),
            Slot {
                entry: held,
                bytes,
                pins: 0,
                tick: 0,
                phase: Phase::Resident,
            },
        );
        g.touch_lru(&key);
    }

    /// Pin `id` if it is resident (then it stays until [`Self::unpin`]). False: it is cold
    /// (or being evicted); load it with [`Self::load_pinned`].
    pub fn try_pin(&self, id: &AdapterId) -> bool {
        self.try_pin_key(&Key::Adapter(id.clone()))
    }

    fn try_pin_key(&self, key: &Key) -> bool {
        let mut g = self.inner.lock();
        let Some(s) = g.slots.get_mut(key) else {
            return false;
        };
        if !matches!(s.phase, Phase::Resident) {
            return false;
        }
        s.pins += 1;
        let t = s.tick;
        g.lru.remove(&t);
        true
    }

    /// Release one pin; the entry becomes the most recently used. An entry whose run was
    /// removed meanwhile leaves memory once its last pin goes.
    pub fn unpin(&self, id: &AdapterId) {
        self.unpin_key(&Key::Adapter(id.clone()));
    }

    /// Release a sampling request's pin on a snapshot ([`SnapshotPin`] does on drop).
    pub(crate) fn unpin_snapshot(&self, id: &SessionId) {
        self.unpin_key(&Key::Snapshot(id.clone()));
    }

    fn unpin_key(&self, key: &Key) {
        let mut g = self.inner.lock();
        let Some(s) = g.slots.get_mut(key) else {
            return;
        };
        s.pins = s.pins.saturating_sub(1);
        if s.pins == 0 {
            if s.entry.is_removed() {
                let b = s.bytes;
                g.slots.remove(key);
                g.bytes = g.bytes.saturating_sub(b);
            } else if matches!(s.phase, Phase::Resident) {
                g.touch_lru(key);
            }
        }
        drop(g);
        self.freed.notify_all();
    }

    /// The run is gone (deleted or unloaded): forget it now, or when its last pin goes.
    pub(crate) fn forget(&self, id: &AdapterId) {
        self.forget_key(&Key::Adapter(id.clone()));
    }

    /// The session is gone: its snapshot leaves memory (now, or when the last request
    /// using it ends) and its spilled copy is deleted.
    pub(crate) fn forget_snapshot(&self, snap: &Snapshot) {
        snap.mark_removed();
        self.forget_key(&Key::Snapshot(snap.session.clone()));
        if snap.spilled.load(Ordering::SeqCst) {
            if let Some(p) = &self.persist {
                if let Err(e) = p.drop_snapshot(&snap.tenant, &snap.session) {
                    tracing::warn!(session = %snap.session, error = %e, "deleting a spilled snapshot failed");
                }
            }
        }
    }

    fn forget_key(&self, key: &Key) {
        let mut g = self.inner.lock();
        let pinned = g.slots.get(key).is_some_and(|s| s.pins > 0);
        if !pinned {
            if let Some(s) = g.slots.remove(key) {
                g.lru.remove(&s.tick);
                g.bytes = g.bytes.saturating_sub(s.bytes);
            }
        }
        drop(g);
        self.freed.notify_all();
    }

    /// Count a new snapshot (its weights are in memory already), unpinned and most
    /// recently used, if it fits in the budget now. It never waits or evicts (its caller
    /// may be a lane): one that does not fit goes straight to disk, and the first request
    /// on it reads it back. Without a store it is only counted.
    pub fn admit_snapshot(&self, snap: &Arc<Snapshot>) -> Result<()> {
        let Some(persist) = &self.persist else {
            self.admit(Held::Snapshot(snap.clone()));
            return Ok(());
        };
        {
            let mut g = self.inner.lock();
            if g.bytes + snap.bytes <= self.budget {
                Self::admit_locked(&mut g, Held::Snapshot(snap.clone()));
                return Ok(());
            }
        }
        let mut w = snap.weights.lock();
        if let Some(weights) = w.as_ref() {
            persist.spill_snapshot(&snap.tenant, &snap.session, weights)?;
            snap.spilled.store(true, Ordering::SeqCst);
            self.stats.write_backs.fetch_add(1, Ordering::Relaxed);
        }
        *w = None;
        Ok(())
    }

    /// Make a session's snapshot resident and pinned for one request, reading its spilled
    /// copy if it is cold. Blocks like [`Self::load_pinned`]: run it on a blocking thread.
    pub fn pin_snapshot(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        base: &BaseModel,
    ) -> Result<SnapshotPin> {
        let pin = |weights| SnapshotPin {
            residency: self.clone(),
            session: snap.session.clone(),
            weights,
        };
        let key = Key::Snapshot(snap.session.clone());
        let Some(persist) = self.persist.clone() else {
            if !self.try_pin_key(&key) {
                self.admit(Held::Snapshot(snap.clone()));
                self.try_pin_key(&key);
            }
            let w = snap.resident_weights();
            return w.map(pin).ok_or_else(|| {
                self.unpin_key(&key);
                Error::Unavailable("a sampling snapshot without its weights".into())
            });
        };
        self.fits("sampling_session_id", "its weights need", snap.bytes)?;
        let t = Instant::now();
        let held = Held::Snapshot(snap.clone());
        if !self.reserve(&held)? {
            return match snap.resident_weights() {
                Some(w) => Ok(pin(w)),
                None => {
                    self.unpin_key(&key);
                    Err(Error::Unavailable(
                        "a resident snapshot without weights".into(),
                    ))
                }
            };
        }
        // Loading: nobody else touches the cell until the phase says resident.
        let loaded = match snap.resident_weights() {
            Some(w) => Ok(w),
            None if snap.is_removed() => Err(Error::NotFound {
                kind: "sampling session",
                id: snap.session.to_string(),
            }),
            None => persist
                .read_snapshot(&snap.tenant, &snap.session, base)
                .map(Arc::new),
        };
        if let Ok(w) = &loaded {
            *snap.weights.lock() = Some(w.clone());
        }
        self.settle_load(&key, loaded.is_ok(), t);
        loaded.map(pin)
    }

    /// A load reserved by [`Self::reserve`] ended: resident (and pinned), or its bytes
    /// freed after a failure. Wakes whoever waits for memory or for this entry.
    fn settle_load(&self, key: &Key, ok: bool, started: Instant) {
        let mut g = self.inner.lock();
        if ok {
            if let Some(s) = g.slots.get_mut(key) {
                s.phase = Phase::Resident;
            }
        } else if let Some(s) = g.slots.remove(key) {
            g.bytes = g.bytes.saturating_sub(s.bytes);
        }
        drop(g);
        self.freed.notify_all();
        if ok {
            self.stats.observe_load(started.elapsed().as_secs_f64());
            tracing::debug!(entry = %key, seconds = started.elapsed().as_secs_f32(), "loaded");
        }
    }

    /// Make `entry` resident and pinned once, reading its newest durable state from the
    /// store if it is cold. Blocks: while the budget is full of pinned entries it waits.
    /// Refused: an adapter bigger than the whole budget, a removed run, a failed read.
    pub fn load_pinned(&self, entry: &Arc<AdapterEntry>, base: &BaseModel) -> Result<()> {
        let Some(persist) = self.persist.clone() else {
            // Nothing ever leaves memory without a store.
            if self.try_pin(&entry.id) {
                return Ok(());
            }
            self.admit_resident(entry);
            self.try_pin(&entry.id);
            return Ok(());
        };
        self.fits("model_id", "this adapter needs", entry.bytes)?;
        // Load latency as a job sees it: waiting for memory and write-backs included.
        let t = Instant::now();
        let key = Key::Adapter(entry.id.clone());
        if !self.reserve(&Held::Adapter(entry.clone()))? {
            // It was resident already: pinned.
            return Ok(());
        }
        let loaded = if entry.is_removed() {
            Err(Error::NotFound {
                kind: "model",
                id: entry.id.to_string(),
            })
        } else {
            persist
                .load_adapter(&entry.tenant, &entry.id, &entry.config, base)
                .and_then(|(mut train, clean)| {
                    // Gradients it left memory with come back with it.
                    if let Some(g) = persist.take_grads(&entry.tenant, &entry.id, base)? {
                        train.grads = g;
                    }
                    Ok((train, clean))
                })
        };
        let ok = loaded.is_ok();
        let r = loaded.map(|(train, clean)| {
            let mut st = entry.state.lock();
            st.step = train.optim.step;
            st.train = Some(train);
            st.dirty = !clean;
        });
        self.settle_load(&key, ok, t);
        r
    }

    /// Refuse an entry bigger than the whole budget (it could never be loaded).
    fn fits(&self, field: &'static str, what: &str, bytes: u64) -> Result<()> {
        if bytes <= self.budget {
            return Ok(());
        }
        Err(Error::invalid(
            field,
            format!(
                "{what} {bytes} bytes of adapter memory; the server's budget \
                 (--adapter-memory) is {}",
                self.budget
            ),
        ))
    }

    /// Claim the bytes of a load of `held`, evicting least recently used entries or
    /// waiting for pins to go. Returns false (and pins it) if it is resident already.
    fn reserve(&self, held: &Held) -> Result<bool> {
        let key = held.key();
        let bytes = held.bytes();
        let mut g = self.inner.lock();
        loop {
            match g.slots.get(&key).map(|s| s.phase) {
                Some(Phase::Resident) => {
                    drop(g);
                    if self.try_pin_key(&key) {
                        return Ok(false);
                    }
                    g = self.inner.lock();
                    continue;
                }
                Some(Phase::Loading) | Some(Phase::Evicting) => {
                    // Another load of it, or its write-back: wait for it to settle.
                    self.freed.wait(&mut g);
                    continue;
                }
                None => {}
            }
            if g.bytes + bytes <= self.budget {
                g.add_bytes(bytes);
                g.slots.insert(
                    key.clone(),
                    Slot {
                        entry: held.clone(),
                        bytes,
                        pins: 1,
                        tick: 0,
                        phase: Phase::Loading,
                    },
                );
                return Ok(true);
            }
            let Some(victim) = g.take_victim(self.persist.is_some()) else {
                // A reader holding a candidate's lock does not signal: look again soon.
                self.freed.wait_for(&mut g, Duration::from_millis(20));
                continue;
            };
            drop(g);
            self.finish_eviction(&victim)?;
            g = self.inner.lock();
        }
    }

    /// Evict a victim `take_victim` marked: its bytes are freed, or (a failed write-back)
    /// it stays resident and the error says why.
    fn finish_eviction(&self, victim: &Held) -> Result<()> {
        let key = victim.key();
        let r = self.evict(victim);
        let mut g = self.inner.lock();
        match r {
            Ok(()) => {
                if let Some(s) = g.slots.remove(&key) {
                    g.bytes = g.bytes.saturating_sub(s.bytes);
                }
                drop(g);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                self.freed.notify_all();
                Ok(())
            }
            Err(e) => {
                // It stays (its state is not on disk); the load fails rather than lose
                // an acknowledged step.
                if let Some(s) = g.slots.get_mut(&key) {
                    s.phase = Phase::Resident;
                }
                g.touch_lru(&key);
                drop(g);
                self.freed.notify_all();
                tracing::error!(entry = %key, error = %e, "write-back failed");
                Err(Error::Unavailable(format!(
                    "no adapter memory: writing back {key} failed: {e}"
                )))
            }
        }
    }

    /// Drop a victim's state, writing it back first if it is not on disk yet.
    fn evict(&self, victim: &Held) -> Result<()> {
        match victim {
            Held::Adapter(victim) => {
                let mut st = victim.state.lock();
                if let (Some(p), Some(t)) = (&self.persist, &st.train) {
                    if !t.grads.pairs.is_empty() && !victim.is_removed() {
                        p.spill_grads(&victim.tenant, &victim.id, &t.weights, &t.grads)?;
                        self.stats.write_backs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if st.dirty {
                    if let (Some(p), Some(t)) = (&self.persist, &st.train) {
                        if !victim.is_removed() {
                            p.write_back(&victim.tenant, &victim.id, t)?;
                            self.stats.write_backs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                st.train = None;
                st.dirty = false;
                tracing::debug!(model = %victim.id, "adapter evicted");
            }
            Held::Snapshot(snap) => {
                let mut w = snap.weights.lock();
                if !snap.spilled.load(Ordering::SeqCst) && !snap.is_removed() {
                    if let (Some(p), Some(weights)) = (&self.persist, w.as_ref()) {
                        p.spill_snapshot(&snap.tenant, &snap.session, weights)?;
                        snap.spilled.store(true, Ordering::SeqCst);
                        self.stats.write_backs.fetch_add(1, Ordering::Relaxed);
                        if snap.is_removed() {
                            // Its session went while it was written.
                            let _ = p.drop_snapshot(&snap.tenant, &snap.session);
                        }
                    }
                }
                *w = None;
                tracing::debug!(session = %snap.session, "snapshot evicted");
            }
        }
        Ok(())
    }
}
