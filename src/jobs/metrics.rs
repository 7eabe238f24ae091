//! Counters per tenant (jobs queued, running, done, failed; tokens processed) for the API's
//! metrics and for long jobs' progress. Updated by the scheduler and the lanes; read by
//! anyone. Plain atomics: a snapshot may be off by an in-flight update, never torn.

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
    /// Prompt and generated tokens through the sampler.
    pub sampled_tokens: u64,
}

#[derive(Default)]
pub struct Metrics {
    tenants: DashMap<TenantId, Arc<TenantCounters>>,
    /// Bytes of request data held by queued training jobs (see `job::Charge`).
    pub queued_bytes: std::sync::atomic::AtomicUsize,
}

impl Metrics {
    pub fn tenant(&self, t: &TenantId) -> Arc<TenantCounters> {
        self.tenants.entry(t.clone()).or_default().clone()
    }

    pub fn snapshot(&self, t: &TenantId) -> TenantMetrics {
        let c = self.tenant(t);
        TenantMetrics {
            queued: c.queued.load(Ordering::Relaxed),
            running: c.running.load(Ordering::Relaxed),
            done: c.done.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            train_tokens: c.train_tokens.load(Ordering::Relaxed),
            sampled_tokens: c.sampled_tokens.load(Ordering::Relaxed),
        }
    }

    /// Every tenant seen so far, with its counters.
    pub fn all(&self) -> Vec<(TenantId, TenantMetrics)> {
        let mut v: Vec<_> = self
            .tenants
            .iter()
            .map(|e| e.key().clone())
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| {
                let m = self.snapshot(&t);
                (t, m)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
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
