//! [`SqliteFutureStore`]: the engine's [`FutureStore`] backed by the metadata database.
//!
//! The trait is synchronous and is called from the scheduler's tokio task and from lane
//! threads, so the database sits behind one dedicated writer thread with its own
//! single-threaded runtime. An in-memory map in front answers reads and long-polls.
//! - `insert` waits until the row is committed: a future id handed to a client is durable.
//!   The wait is one batched commit (about an fsync), short enough for a tokio worker.
//! - `set_running`, `add_progress`, `finish` and `mark_fetched` update the map at once and
//!   are written behind, in order, batched into one transaction per wake-up.
//! - `get` reads the map; a future not in it (from before a restart, or evicted after it
//!   finished) is read from the database through the writer, and cached.
//! - Outcomes expire `result_ttl` after they were first fetched: the first `get` that
//!   returns a finished record counts (so the engine's long-poll does it); outcomes nobody
//!   fetched expire `unread_ttl` after they finished. The writer sweeps periodically
//!   ([`SqliteFutureStore::expire`] runs a sweep now).
//! - The map holds unfinished futures (bounded by the engine's queue limits) and finished
//!   ones for `cache_finished_for`, at most `max_records` in all: past that, an insert
//!   evicts finished ones (they stay in the database).
//!
//! At open, every future left pending or running by the previous process fails with
//! [`RESTARTED_MESSAGE`](super::db::RESTARTED_MESSAGE). One process per database.

use super::db::{futures as q, Db, StoredFuture};
use super::error::{Result as StoreResult, StoreError};
use crate::error::{Error, Result};
use crate::jobs::future::older_than;
use crate::jobs::{FutureId, FutureRecord, FutureStore, JobFailure, JobOutput, JobState, TenantId};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// Most commands one transaction takes.
const MAX_BATCH: usize = 512;

pub use crate::jobs::future::FutureStoreConfig;

#[derive(Debug, Clone)]
struct Cached {
    record: FutureRecord,
    finished: Option<SystemTime>,
    fetched: Option<SystemTime>,
}

enum Cmd {
    Insert(FutureRecord, SyncSender<StoreResult<()>>),
    Running(FutureId),
    Progress(FutureId, u64),
    Finish(
        FutureId,
        std::result::Result<Arc<JobOutput>, JobFailure>,
        SystemTime,
    ),
    Fetched(FutureId, SystemTime),
    Get(TenantId, FutureId, SyncSender<StoreResult<StoredFuture>>),
    Expire(SyncSender<StoreResult<usize>>),
    Flush(SyncSender<StoreResult<()>>),
}

impl Cmd {
    fn is_write(&self) -> bool {
        matches!(
            self,
            Cmd::Insert(..)
                | Cmd::Running(_)
                | Cmd::Progress(..)
                | Cmd::Finish(..)
                | Cmd::Fetched(..)
        )
    }
}

type Cache = Arc<DashMap<FutureId, Cached>>;

/// Futures in SQLite, with an in-memory map in front. See the module docs.
pub struct SqliteFutureStore {
    cfg: FutureStoreConfig,
    cache: Cache,
    tx: Mutex<Option<Sender<Cmd>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovered: u64,
    path: PathBuf,
}

fn closed() -> StoreError {
    StoreError::Closed("the future store's writer thread has stopped".into())
}

fn not_found(id: &FutureId) -> Error {
    Error::NotFound {
        kind: "future",
        id: id.to_string(),
    }
}

impl SqliteFutureStore {
    /// Open the database at `path` (creating and migrating it), fail the futures a previous
    /// process left unfinished, and start the writer thread.
    pub fn open(path: &Path, cfg: FutureStoreConfig) -> StoreResult<SqliteFutureStore> {
        let cache: Cache = Arc::new(DashMap::new());
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let writer = {
            let cache = cache.clone();
            let p = path.to_owned();
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .name("loraplex-futures-db".into())
                .spawn(move || writer_main(p, cfg, cache, rx, ready_tx))
                .map_err(StoreError::io("spawn thread", path))?
        };
        let recovered = ready_rx.recv().map_err(|_| closed())??;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "futures interrupted by a restart were marked failed"
            );
        }
        Ok(SqliteFutureStore {
            cfg,
            cache,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            recovered,
            path: path.to_owned(),
        })
    }

    /// How many futures were failed at open because the previous process stopped.
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, cmd: Cmd) -> StoreResult<()> {
        match &*self.tx.lock() {
            Some(tx) => tx.send(cmd).map_err(|_| closed()),
            None => Err(closed()),
        }
    }

    fn ask<T>(&self, make: impl FnOnce(SyncSender<StoreResult<T>>) -> Cmd) -> StoreResult<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(make(tx))?;
        rx.recv().map_err(|_| closed())?
    }

    /// Note that the caller read this finished future's outcome; it expires `result_ttl`
    /// after the first such read. Reading an unfinished future is not a fetch. [`get`]
    /// (and so the engine's `wait`) already does this for every finished record it returns.
    ///
    /// [`get`]: FutureStore::get
    pub fn mark_fetched(&self, tenant: &TenantId, id: &FutureId) -> Result<()> {
        self.get(tenant, id).map(|_| ())
    }

    /// The first read of a finished future starts its expiry clock.
    fn note_fetched(&self, id: &FutureId) -> Result<()> {
        let now = SystemTime::now();
        let first = match self.cache.get_mut(id) {
            Some(mut c) if c.record.state.is_terminal() && c.fetched.is_none() => {
                c.fetched = Some(now);
                true
            }
            _ => false,
        };
        if first {
            self.send(Cmd::Fetched(id.clone(), now))?;
        }
        Ok(())
    }

    /// Futures held in the in-memory map now.
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Run the expiry sweep now; returns how many futures were deleted.
    pub fn expire(&self) -> Result<usize> {
        Ok(self.ask(Cmd::Expire)?)
    }

    /// Wait until every write sent so far is committed.
    pub fn flush(&self) -> Result<()> {
        Ok(self.ask(Cmd::Flush)?)
    }

    /// Flush and stop the writer thread. Later calls fail with "store closed".
    pub fn close(&self) {
        let tx = self.tx.lock().take();
        drop(tx);
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for SqliteFutureStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl FutureStore for SqliteFutureStore {
    fn insert(&self, record: FutureRecord) -> Result<()> {
        self.ask(|tx| Cmd::Insert(record.clone(), tx))?;
        evict_finished(&self.cfg, &self.cache);
        let finished = record.state.is_terminal().then(SystemTime::now);
        self.cache.insert(
            record.id.clone(),
            Cached {
                record,
                finished,
                fetched: None,
            },
        );
        Ok(())
    }

    fn get(&self, tenant: &TenantId, id: &FutureId) -> Result<FutureRecord> {
        let cached = self
            .cache
            .get(id)
            .map(|c| (c.record.clone(), c.finished, c.fetched));
        let (rec, finished, fetched) = match cached {
            Some(c) if &c.0.tenant == tenant => c,
            Some(_) => return Err(not_found(id)),
            None => {
                let stored = self.ask(|tx| Cmd::Get(tenant.clone(), id.clone(), tx))?;
                if stored.record.state.is_terminal() {
                    evict_finished(&self.cfg, &self.cache);
                    self.cache.entry(id.clone()).or_insert(Cached {
                        record: stored.record.clone(),
                        finished: stored.finished,
                        fetched: stored.fetched,
                    });
                }
                (stored.record, stored.finished, stored.fetched)
            }
        };
        if rec.state.is_terminal() {
            // Past its time but not swept yet: already gone for callers.
            let now = SystemTime::now();
            if older_than(fetched, self.cfg.result_ttl, now)
                || (fetched.is_none() && older_than(finished, self.cfg.unread_ttl, now))
            {
                self.cache.remove(id);
                return Err(not_found(id));
            }
            self.note_fetched(id)?;
        }
        Ok(rec)
    }

    fn set_running(&self, id: &FutureId) -> Result<()> {
        {
            let mut c = self.cache.get_mut(id).ok_or_else(|| not_found(id))?;
            if c.record.state != JobState::Pending {
                return Ok(());
            }
            c.record.state = JobState::Running;
        }
        Ok(self.send(Cmd::Running(id.clone()))?)
    }

    fn add_progress(&self, id: &FutureId, tokens: u64) -> Result<()> {
        let done = {
            let mut c = self.cache.get_mut(id).ok_or_else(|| not_found(id))?;
            c.record.progress.tokens_done += tokens;
            c.record.progress.tokens_done
        };
        Ok(self.send(Cmd::Progress(id.clone(), done))?)
    }

    fn finish(
        &self,
        id: &FutureId,
        outcome: std::result::Result<JobOutput, JobFailure>,
    ) -> Result<()> {
        let now = SystemTime::now();
        let outcome = outcome.map(Arc::new);
        {
            let mut c = self.cache.get_mut(id).ok_or_else(|| not_found(id))?;
            if c.record.state.is_terminal() {
                return Ok(());
            }
            match &outcome {
                Ok(o) => {
                    c.record.state = JobState::Done;
                    c.record.output = Some(o.clone());
                }
                Err(f) => {
                    c.record.state = JobState::Failed;
                    c.record.failure = Some(f.clone());
                }
            }
            c.finished = Some(now);
        }
        Ok(self.send(Cmd::Finish(id.clone(), outcome, now))?)
    }
}

fn writer_main(
    path: PathBuf,
    cfg: FutureStoreConfig,
    cache: Cache,
    rx: Receiver<Cmd>,
    ready: SyncSender<StoreResult<u64>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(StoreError::io("start runtime", &path)(e)));
            return;
        }
    };
    let opened = rt.block_on(async {
        let db = Db::open(&path).await?;
        let n = db.fail_interrupted_futures(SystemTime::now()).await?;
        Ok::<_, StoreError>((db, n))
    });
    let db = match opened {
        Ok((db, n)) => {
            let _ = ready.send(Ok(n));
            db
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut next_sweep = std::time::Instant::now() + cfg.sweep_interval;
    loop {
        let wait = next_sweep.saturating_duration_since(std::time::Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(c) => Some(c),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch: Vec<Cmd> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        rt.block_on(run_batch(&db, &cfg, &cache, batch));
        if std::time::Instant::now() >= next_sweep {
            if let Err(e) = rt.block_on(sweep(&db, &cfg, &cache)) {
                tracing::error!(error = %e, "future expiry sweep failed");
            }
            next_sweep = std::time::Instant::now() + cfg.sweep_interval;
        }
    }
    rt.block_on(db.close());
}

async fn run_batch(db: &Db, cfg: &FutureStoreConfig, cache: &Cache, batch: Vec<Cmd>) {
    let mut writes = Vec::new();
    for cmd in batch {
        if cmd.is_write() {
            writes.push(cmd);
            continue;
        }
        commit_writes(db, std::mem::take(&mut writes)).await;
        match cmd {
            Cmd::Get(tenant, id, reply) => {
                let _ = reply.send(q::get(db.pool(), &tenant, &id).await);
            }
            Cmd::Expire(reply) => {
                let _ = reply.send(sweep(db, cfg, cache).await);
            }
            Cmd::Flush(reply) => {
                let _ = reply.send(Ok(()));
            }
            _ => {}
        }
    }
    commit_writes(db, writes).await;
}

async fn apply(conn: &mut sqlx::SqliteConnection, cmd: &Cmd) -> StoreResult<()> {
    match cmd {
        Cmd::Insert(r, _) => q::insert(conn, r).await,
        Cmd::Running(id) => q::set_running(conn, id).await,
        Cmd::Progress(id, done) => q::set_progress(conn, id, *done).await,
        Cmd::Finish(id, outcome, at) => q::finish(conn, id, outcome, *at).await,
        Cmd::Fetched(id, at) => q::mark_fetched(conn, None, id, *at).await,
        _ => Ok(()),
    }
}

fn ack(cmd: Cmd, r: StoreResult<()>) {
    match (cmd, r) {
        (Cmd::Insert(_, reply), r) => {
            let _ = reply.send(r);
        }
        (_, Err(e)) => tracing::error!(error = %e, "cannot record a future's update"),
        _ => {}
    }
}

/// Apply writes in one transaction; if it fails, one by one so only the bad ones fail.
async fn commit_writes(db: &Db, writes: Vec<Cmd>) {
    if writes.is_empty() {
        return;
    }
    let together = async {
        let mut tx = db.pool().begin().await?;
        for w in &writes {
            apply(&mut tx, w).await?;
        }
        tx.commit().await?;
        Ok::<_, StoreError>(())
    }
    .await;
    if together.is_ok() {
        for w in writes {
            ack(w, Ok(()));
        }
        return;
    }
    for w in writes {
        let r = async {
            let mut conn = db.pool().acquire().await?;
            apply(&mut conn, &w).await
        }
        .await;
        ack(w, r);
    }
}

async fn sweep(db: &Db, cfg: &FutureStoreConfig, cache: &Cache) -> StoreResult<usize> {
    let now = SystemTime::now();
    let mut gone = q::expire(db.pool(), now, cfg.result_ttl).await?;
    gone.extend(q::expire_unread(db.pool(), now, cfg.unread_ttl).await?);
    for id in &gone {
        cache.remove(id);
    }
    let old = |t: Option<SystemTime>, d: Duration| older_than(t, d, now);
    // Fetched long enough ago (its Fetched write may still be queued: gone from the map
    // now, from the database on the next sweep), or finished long ago and not polled.
    cache.retain(|_, c| {
        !(old(c.fetched, cfg.result_ttl)
            || (c.record.state.is_terminal() && old(c.finished, cfg.cache_finished_for)))
    });
    Ok(gone.len())
}

/// Past `max_records`, drop finished futures from the map (fetched first, then the
/// longest finished) down to 90% of it; the database keeps them.
fn evict_finished(cfg: &FutureStoreConfig, cache: &Cache) {
    let cap = cfg.max_records.max(1);
    if cache.len() < cap {
        return;
    }
    let target = cap - cap / 10;
    let mut finished: Vec<(bool, SystemTime, FutureId)> = cache
        .iter()
        .filter(|c| c.record.state.is_terminal())
        .map(|c| {
            let at = c.finished.unwrap_or(c.record.created);
            (c.fetched.is_none(), at, c.key().clone())
        })
        .collect();
    finished.sort();
    let excess = cache.len().saturating_sub(target);
    for (_, _, id) in finished.into_iter().take(excess) {
        cache.remove(&id);
    }
}
