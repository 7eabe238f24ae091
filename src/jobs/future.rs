//! Futures: every job's handle and its life, pending → running → done | failed.
//!
//! [`FutureStore`] is the storage interface ([`MemoryFutureStore`] here,
//! [`crate::store::SqliteFutureStore`] for the server). [`Futures`] adds what storage
//! cannot: waking callers that long-poll a future. A store never runs jobs and never
//! decides outcomes; it records what the engine reports.
//!
//! Bounds: both stores delete a finished future `result_ttl` after its first fetch and
//! `unread_ttl` after it finished when nobody fetched it, and hold at most `max_records`
//! in memory ([`FutureStoreConfig`]); an expired or unknown future is NotFound (404).
//! [`Futures`]' wake-ups exist only while somebody waits on a future.

use super::ids::{FutureId, TenantId};
pub use super::output::{JobFailure, JobOutput};
use crate::error::{Error, Result};
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

/// How long futures and their outcomes are kept, and how many at most: the bounds of
/// [`MemoryFutureStore`] and of the SQLite store's in-memory cache
/// ([`crate::store::SqliteFutureStore`]). From `loraplex serve`'s settings
/// (`LORAPLEX_RESULT_TTL_S`, `LORAPLEX_UNREAD_RESULT_TTL_S`, `LORAPLEX_MAX_FUTURES`).
#[derive(Debug, Clone)]
pub struct FutureStoreConfig {
    /// A finished future's outcome is deleted this long after it was first fetched.
    pub result_ttl: Duration,
    /// A finished future nobody fetched is deleted this long after it finished.
    pub unread_ttl: Duration,
    /// How often the expiry sweep runs.
    pub sweep_interval: Duration,
    /// SQLite store only: a finished future leaves the in-memory map this long after it
    /// finished (it stays in the database and is read back on demand).
    pub cache_finished_for: Duration,
    /// Most futures held in memory. Past it, finished ones are evicted (fetched first,
    /// then the longest finished); when only unfinished ones are left, new futures are
    /// refused as busy. Unfinished futures are bounded by the engine's queue limits.
    pub max_records: usize,
}

impl Default for FutureStoreConfig {
    fn default() -> Self {
        FutureStoreConfig {
            result_ttl: Duration::from_secs(3600),
            unread_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(60),
            cache_finished_for: Duration::from_secs(600),
            max_records: 100_000,
        }
    }
}

/// When a record's outcome came and when it was first read: what expiry looks at.
#[derive(Debug, Clone)]
struct Held {
    record: FutureRecord,
    finished: Option<SystemTime>,
    fetched: Option<SystemTime>,
}

/// Whether `t` is at least `d` before `now`.
pub(crate) fn older_than(t: Option<SystemTime>, d: Duration, now: SystemTime) -> bool {
    t.is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= d))
}

/// The in-memory store: a concurrent map, bounded like the SQLite store. A finished
/// future is deleted `result_ttl` after it was first fetched (the first `get` that returns
/// it finished counts) or `unread_ttl` after it finished if nobody fetched it; and at most
/// `max_records` are held (see [`FutureStoreConfig::max_records`]). Expiry runs on
/// inserts, at most once per `sweep_interval` unless the map is full, and a `get` never
/// returns an expired record.
pub struct MemoryFutureStore {
    cfg: FutureStoreConfig,
    map: DashMap<FutureId, Held>,
    next_sweep: parking_lot::Mutex<std::time::Instant>,
}

impl Default for MemoryFutureStore {
    fn default() -> Self {
        Self::new(FutureStoreConfig::default())
    }
}

fn not_found(id: &FutureId) -> Error {
    Error::NotFound {
        kind: "future",
        id: id.to_string(),
    }
}

impl MemoryFutureStore {
    pub fn new(cfg: FutureStoreConfig) -> Self {
        let next = std::time::Instant::now() + cfg.sweep_interval;
        MemoryFutureStore {
            cfg,
            map: DashMap::new(),
            next_sweep: parking_lot::Mutex::new(next),
        }
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn expired(&self, h: &Held, now: SystemTime) -> bool {
        h.record.state.is_terminal()
            && (older_than(h.fetched, self.cfg.result_ttl, now)
                || older_than(h.finished, self.cfg.unread_ttl, now))
    }

    /// Delete expired records now, then evict finished ones down to the cap; returns how
    /// many went.
    pub fn expire(&self) -> usize {
        let now = SystemTime::now();
        let before = self.map.len();
        self.map.retain(|_, h| !self.expired(h, now));
        let cap = self.cfg.max_records.max(1);
        if self.map.len() >= cap {
            // Down to 90% of the cap, so a full map does not sweep on every insert.
            let target = cap - cap / 10;
            let mut finished: Vec<(bool, SystemTime, FutureId)> = self
                .map
                .iter()
                .filter(|h| h.record.state.is_terminal())
                .map(|h| {
                    let at = h.finished.unwrap_or(h.record.created);
                    (h.fetched.is_none(), at, h.key().clone())
                })
                .collect();
            // Fetched before unread, oldest first.
            finished.sort();
            let excess = self.map.len().saturating_sub(target);
            for (_, _, id) in finished.into_iter().take(excess) {
                self.map.remove(&id);
            }
        }
        before.saturating_sub(self.map.len())
    }
}

impl FutureStore for MemoryFutureStore {
    fn insert(&self, record: FutureRecord) -> Result<()> {
        let due = {
            let mut next = self.next_sweep.lock();
            let now = std::time::Instant::now();
            if now >= *next || self.map.len() >= self.cfg.max_records.max(1) {
                *next = now + self.cfg.sweep_interval;
                true
            } else {
                false
            }
        };
        if due {
            self.expire();
        }
        if self.map.len() >= self.cfg.max_records.max(1) {
            return Err(Error::Busy {
                what: "the future store (every held future is unfinished)",
                retry_after_ms: 1_000,
            });
        }
        let finished = record.state.is_terminal().then(SystemTime::now);
        self.map.insert(
            record.id.clone(),
            Held {
                record,
                finished,
                fetched: None,
            },
        );
        Ok(())
    }

    fn get(&self, tenant: &TenantId, id: &FutureId) -> Result<FutureRecord> {
        let now = SystemTime::now();
        let mut h = match self.map.get_mut(id) {
            Some(h) if &h.record.tenant == tenant => h,
            _ => return Err(not_found(id)),
        };
        if self.expired(&h, now) {
            drop(h);
            self.map.remove(id);
            return Err(not_found(id));
        }
        if h.record.state.is_terminal() && h.fetched.is_none() {
            h.fetched = Some(now);
        }
        Ok(h.record.clone())
    }

    fn set_running(&self, id: &FutureId) -> Result<()> {
        let mut h = self.map.get_mut(id).ok_or_else(|| not_found(id))?;
        if h.record.state == JobState::Pending {
            h.record.state = JobState::Running;
        }
        Ok(())
    }

    fn add_progress(&self, id: &FutureId, tokens: u64) -> Result<()> {
        let mut h = self.map.get_mut(id).ok_or_else(|| not_found(id))?;
        h.record.progress.tokens_done += tokens;
        Ok(())
    }

    fn finish(&self, id: &FutureId, outcome: Result<JobOutput, JobFailure>) -> Result<()> {
        let mut h = self.map.get_mut(id).ok_or_else(|| not_found(id))?;
        if h.record.state.is_terminal() {
            return Ok(());
        }
        match outcome {
            Ok(o) => {
                h.record.state = JobState::Done;
                h.record.output = Some(Arc::new(o));
            }
            Err(f) => {
                h.record.state = JobState::Failed;
                h.record.failure = Some(f);
            }
        }
        h.finished = Some(SystemTime::now());
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
            // The guard drops our wake-up when we leave (finished, unknown id, timed out or
            // cancelled), so the map holds only futures someone is waiting on right now.
            let waiter = Waiter::new(&self.waiters, id);
            let notified = waiter.notify().notified();
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

    /// Wake-ups registered now: one per future somebody is waiting on.
    pub fn waiters_len(&self) -> usize {
        self.waiters.len()
    }
}

/// One caller's registration in [`Futures::waiters`]; the last one out removes the entry.
struct Waiter<'a> {
    map: &'a DashMap<FutureId, Arc<Notify>>,
    id: &'a FutureId,
    notify: Option<Arc<Notify>>,
}

impl<'a> Waiter<'a> {
    fn new(map: &'a DashMap<FutureId, Arc<Notify>>, id: &'a FutureId) -> Self {
        let notify = Some(map.entry(id.clone()).or_default().clone());
        Waiter { map, id, notify }
    }

    fn notify(&self) -> &Notify {
        self.notify.as_deref().expect("set until drop")
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Ours goes first; then, under the shard's lock (nobody can take a new clone while
        // we look), the map's alone means nobody waits. Whoever drops last sees that.
        self.notify = None;
        self.map
            .remove_if(self.id, |_, n| Arc::strong_count(n) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(ttl_ms: u64, unread_ms: u64, max: usize) -> MemoryFutureStore {
        MemoryFutureStore::new(FutureStoreConfig {
            result_ttl: Duration::from_millis(ttl_ms),
            unread_ttl: Duration::from_millis(unread_ms),
            sweep_interval: Duration::from_secs(3600),
            max_records: max,
            ..Default::default()
        })
    }

    fn add(s: &MemoryFutureStore, t: &TenantId) -> FutureId {
        let id = FutureId::generate();
        s.insert(FutureRecord::new(
            id.clone(),
            t.clone(),
            JobKind::Forward,
            0,
        ))
        .unwrap();
        id
    }

    fn done(s: &MemoryFutureStore, id: &FutureId) {
        s.finish(id, Ok(JobOutput::Saved { name: "n".into() }))
            .unwrap();
    }

    #[test]
    fn finished_futures_expire_after_their_first_fetch_or_unread() {
        let s = store(50, 200, 100);
        let t = TenantId::from("t");
        let (read, unread, pending) = (add(&s, &t), add(&s, &t), add(&s, &t));
        done(&s, &read);
        done(&s, &unread);
        assert_eq!(s.get(&t, &read).unwrap().state, JobState::Done);
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(s.get(&t, &read), Err(Error::NotFound { .. })));
        assert_eq!(s.len(), 2, "the unread one waits for its own, longer bound");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.expire(), 1);
        assert!(matches!(s.get(&t, &unread), Err(Error::NotFound { .. })));
        // Unfinished futures never expire.
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(&t, &pending).unwrap().state, JobState::Pending);
    }

    #[test]
    fn a_full_store_evicts_finished_futures_and_refuses_when_all_are_pending() {
        let s = store(3_600_000, 3_600_000, 10);
        let t = TenantId::from("t");
        let first = add(&s, &t);
        done(&s, &first);
        s.get(&t, &first).unwrap();
        for _ in 0..100 {
            let id = add(&s, &t);
            done(&s, &id);
            assert!(s.len() <= 10, "{}", s.len());
        }
        // Fetched ones go first.
        assert!(s.get(&t, &first).is_err());
        let s = store(3_600_000, 3_600_000, 4);
        for _ in 0..4 {
            add(&s, &t);
        }
        let e = s
            .insert(FutureRecord::new(
                FutureId::generate(),
                t.clone(),
                JobKind::Forward,
                0,
            ))
            .unwrap_err();
        assert!(matches!(e, Error::Busy { .. }), "{e}");
    }

    #[tokio::test]
    async fn waiting_leaves_no_wake_up_behind() {
        let f = Arc::new(Futures::new(Arc::new(store(60_000, 60_000, 100))));
        let t = TenantId::from("t");
        let id = f.create(&t, JobKind::Forward, 0).unwrap();
        // Unknown ids, timeouts and finished futures all clean up after themselves.
        for _ in 0..10 {
            assert!(f
                .wait(&t, &FutureId::generate(), Duration::from_millis(1))
                .await
                .is_err());
        }
        let r = f.wait(&t, &id, Duration::from_millis(5)).await.unwrap();
        assert_eq!(r.state, JobState::Pending);
        assert_eq!(f.waiters_len(), 0);
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let (f, t, id) = (f.clone(), t.clone(), id.clone());
                tokio::spawn(async move { f.wait(&t, &id, Duration::from_secs(10)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(f.waiters_len(), 1, "one wake-up per future");
        f.finish(&id, Ok(JobOutput::Saved { name: "n".into() }));
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap().state, JobState::Done);
        }
        f.wait(&t, &id, Duration::from_millis(1)).await.unwrap();
        assert_eq!(f.waiters_len(), 0);
    }
}
