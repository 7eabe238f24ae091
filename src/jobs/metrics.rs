//! Counters per tenant (jobs queued, running, done, failed; tokens processed) for the API's
//! metrics and for long jobs' progress, and how many adapters shared each training batch
//! ([`BatchShapes`]). Updated by the scheduler and the lanes; read by
//! anyone. Plain atomics: a snapshot may be off by an in-flight update, never torn.
//!
//! Bounded: at most `max_tenants` tenants have counters of their own (in development mode
//! every API key is a tenant). Past it, the longest idle ones (nothing queued or running,
//! nobody holding their counters) fold their totals into [`Metrics::folded`] and leave.

use super::ids::TenantId;
use dashmap::DashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct TenantCounters {
    pub queued: AtomicI64,
    pub running: AtomicI64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub train_tokens: AtomicU64,
    pub sampled_tokens: AtomicU64,
    /// Ms since the epoch of the last update: who is evicted first.
    last_active_ms: AtomicU64,
}

impl TenantCounters {
    fn snapshot(&self) -> TenantMetrics {
        TenantMetrics {
            queued: self.queued.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            train_tokens: self.train_tokens.load(Ordering::Relaxed),
            sampled_tokens: self.sampled_tokens.load(Ordering::Relaxed),
        }
    }

    fn idle(&self) -> bool {
        self.queued.load(Ordering::Relaxed) == 0 && self.running.load(Ordering::Relaxed) == 0
    }
}

/// A point-in-time copy of one tenant's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantMetrics {
    pub queued: i64,
    pub running: i64,
    pub done: u64,
    pub failed: u64,
    /// Tokens through forward / forward_backward.
    pub train_tokens: u64,
    /// Tokens through the sampler's forward passes: prompt tokens prefilled (not those
    /// served by a shared prefill or the prefix cache) and generated tokens.
    pub sampled_tokens: u64,
}

pub struct Metrics {
    tenants: DashMap<TenantId, Arc<TenantCounters>>,
    /// Bytes of request data held by queued training jobs (see `job::Charge`).
    pub queued_bytes: std::sync::atomic::AtomicUsize,
    /// Totals of the tenants evicted so far.
    folded: TenantCounters,
    max_tenants: usize,
    /// How many adapters shared each training batch.
    pub batches: BatchShapes,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(crate::config::EngineConfig::default().max_metric_tenants)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl Metrics {
    pub fn new(max_tenants: usize) -> Self {
        Metrics {
            tenants: DashMap::new(),
            folded: TenantCounters::default(),
            max_tenants: max_tenants.max(1),
            queued_bytes: Default::default(),
            batches: BatchShapes::default(),
        }
    }

    pub fn tenant(&self, t: &TenantId) -> Arc<TenantCounters> {
        let c = match self.tenants.get(t) {
            Some(c) => c.clone(),
            None => {
                if self.tenants.len() >= self.max_tenants {
                    self.evict_idle();
                }
                self.tenants.entry(t.clone()).or_default().clone()
            }
        };
        c.last_active_ms.store(now_ms(), Ordering::Relaxed);
        c
    }

    /// Fold the longest idle tenants into [`Metrics::folded`] until 3/4 of the cap is left
    /// (so a full map does not sweep on every new tenant).
    fn evict_idle(&self) {
        let target = self.max_tenants - self.max_tenants / 4;
        let mut idle: Vec<(u64, TenantId)> = self
            .tenants
            .iter()
            .filter(|e| e.value().idle())
            .map(|e| {
                (
                    e.value().last_active_ms.load(Ordering::Relaxed),
                    e.key().clone(),
                )
            })
            .collect();
        idle.sort();
        let excess = self.tenants.len().saturating_sub(target);
        for (_, t) in idle.into_iter().take(excess) {
            // Under the shard's lock: nobody holds these counters and nothing is in flight.
            let gone = self
                .tenants
                .remove_if(&t, |_, c| Arc::strong_count(c) == 1 && c.idle());
            if let Some((_, c)) = gone {
                let f = &self.folded;
                let add = |a: &AtomicU64, b: &AtomicU64| {
                    a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed)
                };
                add(&f.done, &c.done);
                add(&f.failed, &c.failed);
                add(&f.train_tokens, &c.train_tokens);
                add(&f.sampled_tokens, &c.sampled_tokens);
            }
        }
    }

    /// The tenant's counters (zeros for a tenant without any), without keeping it.
    pub fn snapshot(&self, t: &TenantId) -> TenantMetrics {
        self.tenants
            .get(t)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    /// Tenants with counters of their own, with them.
    pub fn all(&self) -> Vec<(TenantId, TenantMetrics)> {
        let mut v: Vec<_> = self
            .tenants
            .iter()
            .map(|e| (e.key().clone(), e.value().snapshot()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Totals of the tenants whose counters were folded away (gauges are 0: only idle
    /// tenants are folded).
    pub fn folded(&self) -> TenantMetrics {
        self.folded.snapshot()
    }

    /// Tenants with counters of their own now.
    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn queued(&self, t: &TenantId) {
        self.tenant(t).queued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn started(&self, t: &TenantId) {
        let c = self.tenant(t);
        c.queued.fetch_sub(1, Ordering::Relaxed);
        c.running.fetch_add(1, Ordering::Relaxed);
    }

    /// A job left the engine; `was_running` says which gauge it leaves.
    pub fn finished(&self, t: &TenantId, ok: bool, was_running: bool) {
        let c = self.tenant(t);
        if was_running {
            c.running.fetch_sub(1, Ordering::Relaxed);
        } else {
            c.queued.fetch_sub(1, Ordering::Relaxed);
        }
        if ok {
            c.done.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn train_tokens(&self, t: &TenantId, n: u64) {
        self.tenant(t).train_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sampled_tokens(&self, t: &TenantId, n: u64) {
        self.tenant(t)
            .sampled_tokens
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// Training batches by how many adapters shared the pass: buckets of 1, 2, 3–4, 5–8,
/// 9–16, 17–32 and more (fixed: the counters never grow).
#[derive(Debug, Default)]
pub struct BatchShapes {
    counts: [AtomicU64; BATCH_BUCKETS],
    tokens: [AtomicU64; BATCH_BUCKETS],
}

const BATCH_BUCKETS: usize = 7;

/// The upper bound of each bucket but the last (which is open).
pub const BATCH_BUCKET_BOUNDS: [usize; BATCH_BUCKETS - 1] = [1, 2, 4, 8, 16, 32];

/// A copy of [`BatchShapes`]: per bucket, `(label, batches, tokens)`.
pub type BatchShapesSnapshot = Vec<(String, u64, u64)>;

impl BatchShapes {
    pub fn record(&self, adapters: usize, tokens: usize) {
        let b = BATCH_BUCKET_BOUNDS
            .iter()
            .position(|&hi| adapters <= hi)
            .unwrap_or(BATCH_BUCKETS - 1);
        self.counts[b].fetch_add(1, Ordering::Relaxed);
        self.tokens[b].fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BatchShapesSnapshot {
        let mut lo = 1;
        (0..BATCH_BUCKETS)
            .map(|b| {
                let label = match BATCH_BUCKET_BOUNDS.get(b) {
                    Some(&hi) if hi == lo => format!("{hi}"),
                    Some(&hi) => format!("{lo}–{hi}"),
                    None => format!("{lo}+"),
                };
                lo = BATCH_BUCKET_BOUNDS.get(b).map_or(lo, |hi| hi + 1);
                (
                    label,
                    self.counts[b].load(Ordering::Relaxed),
                    self.tokens[b].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_tenants_past_the_cap_fold_into_the_totals() {
        let m = Metrics::new(8);
        let busy = TenantId::from("busy");
        m.queued(&busy);
        for i in 0..100 {
            let t = TenantId::from(format!("t{i}").as_str());
            m.queued(&t);
            m.started(&t);
            m.train_tokens(&t, 10);
            m.finished(&t, true, true);
            assert!(m.len() <= 8, "{} tenants kept", m.len());
        }
        // The busy tenant is never folded: its gauge must come back down.
        assert_eq!(m.snapshot(&busy).queued, 1);
        let kept: u64 = m.all().iter().map(|(_, x)| x.done).sum();
        assert_eq!(
            kept + m.folded().done,
            100,
            "no job is lost from the totals"
        );
        assert_eq!(
            m.all().iter().map(|(_, x)| x.train_tokens).sum::<u64>() + m.folded().train_tokens,
            1000
        );
        // Reading a tenant does not make it one.
        let before = m.len();
        m.snapshot(&TenantId::from("nobody"));
        assert_eq!(m.len(), before);
    }

    #[test]
    fn batches_land_in_their_bucket() {
        let b = BatchShapes::default();
        b.record(1, 10);
        b.record(3, 5);
        b.record(4, 5);
        b.record(100, 1);
        let s = b.snapshot();
        assert_eq!(s[0], ("1".to_owned(), 1, 10));
        assert_eq!(s[2], ("3–4".to_owned(), 2, 10));
        assert_eq!(s[6], ("33+".to_owned(), 1, 1));
    }
}
