//! The residency manager: which training runs have their adapter in memory (weights,
//! AdamW moments, gradient accumulator and step: a *resident entry*), within a byte budget
//! (`--adapter-memory`, [`crate::config::EngineConfig::adapter_memory`]).
//!
//! Entries are kept in LRU order of last use. An entry is *pinned* while a job uses it (the
//! scheduler holds one pin per model queue with outstanding work); only unpinned entries
//! are evicted, and never one holding gradients not yet applied (they exist only here).
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
//! This module decides what is in memory; it never decides order (the scheduler does) and
//! never runs model work.

use super::ids::AdapterId;
use super::registry::{AdapterEntry, Persist};
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
    pub resident: usize,
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

struct Slot {
    entry: Arc<AdapterEntry>,
    bytes: u64,
    pins: u32,
    /// Its key in `lru` while unpinned and resident.
    tick: u64,
    phase: Phase,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    slots: HashMap<AdapterId, Slot>,
    /// Unpinned resident entries, least recently used first.
    lru: BTreeMap<u64, AdapterId>,
    bytes: u64,
    peak: u64,
}

impl Inner {
    fn add_bytes(&mut self, b: u64) {
        self.bytes += b;
        self.peak = self.peak.max(self.bytes);
    }

    fn touch_lru(&mut self, id: &AdapterId) {
        self.tick += 1;
        let t = self.tick;
        if let Some(s) = self.slots.get_mut(id) {
            self.lru.remove(&s.tick);
            s.tick = t;
            self.lru.insert(t, id.clone());
        }
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
        ResidencySnapshot {
            resident: g
                .slots
                .values()
                .filter(|s| matches!(s.phase, Phase::Resident))
                .count(),
            bytes: g.bytes,
            budget: self.budget,
            peak_bytes: g.peak,
            pinned: g.slots.values().filter(|s| s.pins > 0).count(),
        }
    }

    /// Whether `id` is in memory now.
    pub fn is_resident(&self, id: &AdapterId) -> bool {
        self.inner
            .lock()
            .slots
            .get(id)
            .is_some_and(|s| matches!(s.phase, Phase::Resident))
    }

    /// Count an entry that is in memory already (created, or restored without a store),
    /// unpinned. Without a store this never waits nor evicts.
    pub(crate) fn admit_resident(&self, entry: &Arc<AdapterEntry>) {
        let mut g = self.inner.lock();
        if g.slots.contains_key(&entry.id) {
            return;
        }
        g.add_bytes(entry.bytes);
        g.slots.insert(
            entry.id.clone(),
            Slot {
                entry: entry.clone(),
                bytes: entry.bytes,
                pins: 0,
                tick: 0,
                phase: Phase::Resident,
            },
        );
        g.touch_lru(&entry.id);
    }

    /// Pin `id` if it is resident (then it stays until [`Self::unpin`]). False: it is cold
    /// (or being evicted); load it with [`Self::load_pinned`].
    pub fn try_pin(&self, id: &AdapterId) -> bool {
        let mut g = self.inner.lock();
        let Some(s) = g.slots.get_mut(id) else {
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
        let mut g = self.inner.lock();
        let Some(s) = g.slots.get_mut(id) else {
            return;
        };
        s.pins = s.pins.saturating_sub(1);
        if s.pins == 0 {
            if s.entry.is_removed() {
                let b = s.bytes;
                g.slots.remove(id);
                g.bytes = g.bytes.saturating_sub(b);
            } else if matches!(s.phase, Phase::Resident) {
                g.touch_lru(id);
            }
        }
        drop(g);
        self.freed.notify_all();
    }

    /// The run is gone (deleted or unloaded): forget it now, or when its last pin goes.
    pub(crate) fn forget(&self, id: &AdapterId) {
        let mut g = self.inner.lock();
        let pinned = g.slots.get(id).is_some_and(|s| s.pins > 0);
        if !pinned {
            if let Some(s) = g.slots.remove(id) {
                g.lru.remove(&s.tick);
                g.bytes = g.bytes.saturating_sub(s.bytes);
            }
        }
        drop(g);
        self.freed.notify_all();
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
        if entry.bytes > self.budget {
            return Err(Error::invalid(
                "model_id",
                format!(
                    "this adapter needs {} bytes of adapter memory; the server's budget \
                     (--adapter-memory) is {}",
                    entry.bytes, self.budget
                ),
            ));
        }
        // Load latency as a job sees it: waiting for memory and write-backs included.
        let t = Instant::now();
        if !self.reserve(entry)? {
            // It was resident already: pinned.
            return Ok(());
        }
        let loaded = if entry.is_removed() {
            Err(Error::NotFound {
                kind: "model",
                id: entry.id.to_string(),
            })
        } else {
            persist.load_adapter(&entry.tenant, &entry.id, &entry.config, base)
        };
        match loaded {
            Ok((train, clean)) => {
                {
                    let mut st = entry.state.lock();
                    st.step = train.optim.step;
                    st.train = Some(train);
                    st.dirty = !clean;
                }
                let mut g = self.inner.lock();
                if let Some(s) = g.slots.get_mut(&entry.id) {
                    s.phase = Phase::Resident;
                }
                drop(g);
                self.freed.notify_all();
                self.stats.observe_load(t.elapsed().as_secs_f64());
                tracing::debug!(model = %entry.id, seconds = t.elapsed().as_secs_f32(), "adapter loaded");
                Ok(())
            }
            Err(e) => {
                let mut g = self.inner.lock();
                if let Some(s) = g.slots.remove(&entry.id) {
                    g.bytes = g.bytes.saturating_sub(s.bytes);
                }
                drop(g);
                self.freed.notify_all();
                Err(e)
            }
        }
    }

    /// Claim `entry.bytes` for a load of `entry`, evicting least recently used entries or
    /// waiting for pins to go. Returns false (and pins it) if it is resident already.
    fn reserve(&self, entry: &Arc<AdapterEntry>) -> Result<bool> {
        let mut g = self.inner.lock();
        loop {
            match g.slots.get(&entry.id).map(|s| s.phase) {
                Some(Phase::Resident) => {
                    drop(g);
                    if self.try_pin(&entry.id) {
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
            if g.bytes + entry.bytes <= self.budget {
                g.add_bytes(entry.bytes);
                g.slots.insert(
                    entry.id.clone(),
                    Slot {
                        entry: entry.clone(),
                        bytes: entry.bytes,
                        pins: 1,
                        tick: 0,
                        phase: Phase::Loading,
                    },
                );
                return Ok(true);
            }
            // The least recently used entry that may go: unpinned, no pending gradients,
            // nobody reading it right now.
            let victim = g.lru.iter().find_map(|(t, id)| {
                let s = g.slots.get(id)?;
                let st = s.entry.state.try_lock()?;
                let idle = st.partial.is_none()
                    && st.train.as_ref().is_none_or(|t| t.grads.pairs.is_empty());
                idle.then(|| (*t, id.clone()))
            });
            let Some((tick, vid)) = victim else {
                // A reader holding a candidate's lock does not signal: look again soon.
                self.freed.wait_for(&mut g, Duration::from_millis(20));
                continue;
            };
            g.lru.remove(&tick);
            let Some(s) = g.slots.get_mut(&vid) else {
                continue;
            };
            s.phase = Phase::Evicting;
            let victim = s.entry.clone();
            drop(g);
            let r = self.evict(&victim);
            g = self.inner.lock();
            match r {
                Ok(()) => {
                    if let Some(s) = g.slots.remove(&vid) {
                        g.bytes = g.bytes.saturating_sub(s.bytes);
                    }
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // It stays (its state is not on disk); this load fails rather than
                    // lose an acknowledged step.
                    if let Some(s) = g.slots.get_mut(&vid) {
                        s.phase = Phase::Resident;
                    }
                    g.touch_lru(&vid);
                    drop(g);
                    self.freed.notify_all();
                    tracing::error!(model = %vid, error = %e, "adapter write-back failed");
                    return Err(Error::Unavailable(format!(
                        "no adapter memory: writing back {vid} failed: {e}"
                    )));
                }
            }
            self.freed.notify_all();
        }
    }

    /// Drop a victim's state, writing it back first if it is dirty.
    fn evict(&self, victim: &AdapterEntry) -> Result<()> {
        let mut st = victim.state.lock();
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
        Ok(())
    }
}
