//! The scheduler: an actor (one tokio task) that owns every training model's queue and
//! forms batches; nothing else touches the queues. Callers talk to it over a bounded
//! channel and get answers through oneshot senders; lanes report finished batches on a
//! second channel.
//!
//! Each cycle, for every free lane, it picks a base model (that of the least-served
//! tenant's ready work: models of different bases never share a batch, as a batch is one
//! pass over one base's weights) and takes the ready forward / forward_backward work of
//! all idle models of that base up to a token budget, in rounds of an equal share per tenant (least-served
//! tenant first), splitting a request that exceeds its share by datum. A model's barrier
//! (optim_step, save, load, sampling snapshot) joins the batch after its model's passes and
//! closes that model for the cycle. A model is in at most one lane at a time, and its
//! requests leave the queue strictly in `seq_id` order; a missing `seq_id` holds back only
//! that model and fails its waiting work after `seq_timeout_ms`.
//!
//! Residency ([`super::residency`]): a model queue holds one pin on its adapter while it
//! has work outstanding, and only a pinned (resident) model is ready. Work queued for a
//! cold adapter starts its load at once on a blocking thread (at most `MAX_LOADS` at a
//! time, the rest in arrival order), so the load overlaps other tenants' batches; the
//! loaded adapter comes back pinned. When pinned adapters fill the budget a load waits,
//! and so does its work, in the queue (the queue depth shows it); nothing fails for lack
//! of memory.
//!
//! The actor never runs model work: lanes do, on their own threads.
//!
//! Bounds: one queue per live model (removed when the model is deleted or unloaded); per
//! queue, pending work is capped by `max_queued_per_model` and the seq_ids remembered for
//! retries by `SEEN_WINDOW`; the per-tenant fairness counters only for tenants with a
//! queue.

use super::future::{Futures, JobKind};
use super::ids::{AdapterId, FutureId, TenantId};
use super::job::{CheckedOp, JobRef};
use super::lane::{Batch, BatchItem, LaneReport, Piece};
use super::metrics::Metrics;
use super::registry::{AdapterEntry, Registry};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t.into()).await;
    }
}

/// The longest a free lane waits for more work to join a batch.
const MAX_GATHER: Duration = Duration::from_millis(250);

/// Adapter loads running at once; more wait their turn in arrival order. Each holds a
/// blocking thread while it waits for memory, so this bounds those threads too.
const MAX_LOADS: usize = 4;

/// How many recent seq_ids per model a retry can still find its future by. Older retries
/// are refused as "before the next expected seq_id".
const SEEN_WINDOW: usize = 4096;

pub(crate) enum Cmd {
    Submit {
        tenant: TenantId,
        entry: Arc<AdapterEntry>,
        seq_id: Option<u64>,
        op: CheckedOp,
        reply: oneshot::Sender<Result<FutureId>>,
    },
    Delete {
        adapter: AdapterId,
        reply: oneshot::Sender<()>,
    },
}

/// A queued job and how far a split request has got.
struct Queued {
    job: JobRef,
    next_datum: usize,
    started: bool,
    arrived: Instant,
}

struct ModelQueue {
    entry: Arc<AdapterEntry>,
    next_seq: u64,
    pending: BTreeMap<u64, Queued>,
    /// Every accepted seq_id and its future, for idempotent retries.
    seen: HashMap<u64, FutureId>,
    /// Jobs accepted and not yet finished (queued or in a lane).
    outstanding: usize,
    in_flight: bool,
    /// Since when the next seq_id has been missing while later ones wait.
    blocked_since: Option<Instant>,
    /// This queue holds a pin on its adapter: it is resident until released.
    pinned: bool,
    /// A load of its adapter is queued or running.
    loading: bool,
}

impl ModelQueue {
    fn ready(&self) -> bool {
        self.pinned && !self.in_flight && self.pending.contains_key(&self.next_seq)
    }
}

/// A finished adapter load: the adapter is resident and pinned for its queue, or why not.
pub(crate) struct Loaded {
    adapter: AdapterId,
    result: Result<()>,
}

pub(crate) struct Scheduler {
    cfg: EngineConfig,
    registry: Arc<Registry>,
    futures: Arc<Futures>,
    metrics: Arc<Metrics>,
    queues: HashMap<AdapterId, ModelQueue>,
    /// Tokens served per tenant: who goes first when the budget is short. Only tenants
    /// with a model queue keep theirs (see `expire_missing`).
    served: HashMap<TenantId, u64>,
    outstanding: usize,
    lanes: Vec<std::sync::mpsc::Sender<Batch>>,
    free: Vec<usize>,
    /// A free lane waits until then for more work to join the batch.
    gather_until: Option<Instant>,
    /// How long the last batch took: the gather window scales with it.
    last_pass: Duration,
    /// When a lane last came free: its waiting for peers starts no earlier.
    freed_at: Instant,
    /// The models of the batch that finished last, and when work last arrived: once all of
    /// them are back and nothing arrived for `batch_wait_ms`, the wait ends early.
    last_models: Vec<AdapterId>,
    last_arrival: Instant,
    /// Cold adapters waiting for a load slot, in arrival order, and loads running.
    load_queue: std::collections::VecDeque<Arc<AdapterEntry>>,
    loads_running: usize,
    loaded_tx: mpsc::UnboundedSender<Loaded>,
    loaded_rx: Option<mpsc::UnboundedReceiver<Loaded>>,
}

/// How an adapter's turn in a round ended.
#[derive(PartialEq, Eq)]
enum Turn {
    /// More ready work, allowance spent.
    Open,
    /// Nothing more for this model in this batch.
    Closed,
}

impl Scheduler {
    pub(crate) fn new(
        cfg: EngineConfig,
        registry: Arc<Registry>,
        futures: Arc<Futures>,
        metrics: Arc<Metrics>,
        lanes: Vec<std::sync::mpsc::Sender<Batch>>,
    ) -> Self {
        let free = (0..lanes.len()).rev().collect();
        let (loaded_tx, loaded_rx) = mpsc::unbounded_channel();
        Scheduler {
            load_queue: Default::default(),
            loads_running: 0,
            loaded_tx,
            loaded_rx: Some(loaded_rx),
            cfg,
            registry,
            futures,
            metrics,
            queues: HashMap::new(),
            served: HashMap::new(),
            outstanding: 0,
            lanes,
            free,
            gather_until: None,
            last_pass: Duration::ZERO,
            freed_at: Instant::now(),
            last_models: Vec::new(),
            last_arrival: Instant::now(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut reports: mpsc::UnboundedReceiver<LaneReport>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Some(mut loaded) = self.loaded_rx.take() else {
            return;
        };
        loop {
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => self.command(c),
                    None => break,
                },
                Some(r) = reports.recv() => self.lane_done(r),
                Some(l) = loaded.recv() => self.load_done(l),
                _ = tick.tick() => self.expire_missing(),
                _ = sleep_until(self.gather_until), if self.gather_until.is_some() => {}
            }
            // Drain whatever else arrived before forming batches: bigger batches.
            while let Ok(c) = cmds.try_recv() {
                self.command(c);
            }
            while let Ok(r) = reports.try_recv() {
                self.lane_done(r);
            }
            while let Ok(l) = loaded.try_recv() {
                self.load_done(l);
            }
            self.want_loads();
            self.start_loads();
            self.dispatch();
        }
        tracing::debug!("scheduler stopped");
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Submit {
                tenant,
                entry,
                seq_id,
                op,
                reply,
            } => {
                let id = entry.id.clone();
                let r = self.submit(tenant, entry, seq_id, op);
                if r.is_ok() {
                    self.want_resident(&id);
                }
                let _ = reply.send(r);
            }
            Cmd::Delete { adapter, reply } => {
                if let Some(q) = self.queues.remove(&adapter) {
                    if q.pinned {
                        self.registry.residency().unpin(&adapter);
                    }
                    let e = Error::NotFound {
                        kind: "model",
                        id: adapter.to_string(),
                    };
                    for (_, j) in q.pending {
                        self.metrics.finished(&j.job.tenant, false, j.started);
                        self.futures.fail(&j.job.future, &e);
                        self.outstanding = self.outstanding.saturating_sub(1);
                    }
                }
                let _ = reply.send(());
            }
        }
    }

    fn busy(&self, what: &'static str) -> Error {
        Error::Busy {
            what,
            retry_after_ms: self.cfg.retry_after_ms,
        }
    }

    fn submit(
        &mut self,
        tenant: TenantId,
        entry: Arc<AdapterEntry>,
        seq_id: Option<u64>,
        op: CheckedOp,
    ) -> Result<FutureId> {
        let q = self
            .queues
            .entry(entry.id.clone())
            .or_insert_with(|| ModelQueue {
                entry: entry.clone(),
                next_seq: entry.first_seq.or(seq_id).unwrap_or(0),
                pending: BTreeMap::new(),
                seen: HashMap::new(),
                outstanding: 0,
                in_flight: false,
                blocked_since: None,
                pinned: false,
                loading: false,
            });
        let seq = match seq_id {
            Some(s) => {
                if let Some(f) = q.seen.get(&s) {
                    return Ok(f.clone());
                }
                if s < q.next_seq {
                    return Err(Error::invalid(
                        "seq_id",
                        format!(
                            "{s} is before this model's next expected seq_id {}",
                            q.next_seq
                        ),
                    ));
                }
                s
            }
            // No seq_id: after everything this model has seen.
            None => q
                .pending
                .keys()
                .next_back()
                .map_or(q.next_seq, |k| k + 1)
                .max(q.next_seq),
        };
        // The tenant's own limit first: a tenant at it is told so, not that the
        // server is busy.
        let held = self.metrics.snapshot(&tenant);
        self.registry.quotas().check_queued(
            &tenant,
            (held.queued + held.running).max(0) as u64,
            self.cfg.retry_after_ms,
        )?;
        if self.outstanding >= self.cfg.max_queued_jobs {
            return Err(self.busy("the job queue"));
        }
        if q.outstanding >= self.cfg.max_queued_per_model {
            return Err(self.busy("this model's queue"));
        }
        // Memory held by waiting requests is bounded too; a request alone always fits
        // (the API bounds each request's size), and ops that carry no data always do.
        let bytes = op.data_bytes();
        let held = self
            .metrics
            .queued_bytes
            .load(std::sync::atomic::Ordering::Acquire);
        if bytes > 0 && held > 0 && held.saturating_add(bytes) > self.cfg.max_queued_bytes {
            return Err(self.busy("the queue's memory budget"));
        }
        let kind: JobKind = op.kind();
        let tokens = op.num_tokens();
        let future = self.futures.create(&tenant, kind, tokens as u64)?;
        let span = tracing::info_span!(
            "job",
            future = %future,
            tenant = %tenant,
            model = %entry.id,
            seq,
            kind = ?kind,
            tokens
        );
        q.seen.insert(seq, future.clone());
        let now = Instant::now();
        self.last_arrival = now;
        q.pending.insert(
            seq,
            Queued {
                job: JobRef {
                    future: future.clone(),
                    tenant: tenant.clone(),
                    op: Arc::new(op),
                    span,
                    _charge: Arc::new(super::job::Charge::new(self.metrics.clone(), bytes)),
                },
                next_datum: 0,
                started: false,
                arrived: now,
            },
        );
        q.outstanding += 1;
        self.outstanding += 1;
        self.metrics.queued(&tenant);
        Ok(future)
    }

    /// Pin the queue's adapter if it is resident, else queue its load.
    fn want_resident(&mut self, id: &AdapterId) {
        let Some(q) = self.queues.get_mut(id) else {
            return;
        };
        if q.pinned || q.loading || q.outstanding == 0 {
            return;
        }
        if self.registry.residency().try_pin(id) {
            q.pinned = true;
        } else {
            q.loading = true;
            self.load_queue.push_back(q.entry.clone());
        }
    }

    /// Every queue with work and neither a pin nor a load gets one (work that arrived
    /// while its adapter was leaving memory, say).
    fn want_loads(&mut self) {
        let want: Vec<AdapterId> = self
            .queues
            .iter()
            .filter(|(_, q)| q.outstanding > 0 && !q.pinned && !q.loading)
            .map(|(id, _)| id.clone())
            .collect();
        for id in want {
            self.want_resident(&id);
        }
    }

    /// Start queued loads while fewer than `MAX_LOADS` run: each on a blocking thread.
    fn start_loads(&mut self) {
        while self.loads_running < MAX_LOADS {
            let Some(entry) = self.load_queue.pop_front() else {
                return;
            };
            let still_wanted = self
                .queues
                .get(&entry.id)
                .is_some_and(|q| q.loading && Arc::ptr_eq(&q.entry, &entry));
            if !still_wanted {
                continue;
            }
            self.loads_running += 1;
            let res = self.registry.residency().clone();
            let base = self.registry.base_now_named(&entry.base);
            let tx = self.loaded_tx.clone();
            let adapter = entry.id.clone();
            tokio::spawn(async move {
                let result = match base {
                    Some(base) => tokio::task::spawn_blocking(move || {
                        let _span = tracing::info_span!("load", model = %entry.id).entered();
                        res.load_pinned(&entry, &base)
                    })
                    .await
                    .unwrap_or_else(|e| Err(Error::Panic(format!("adapter load panicked: {e}")))),
                    None => Err(Error::Unavailable("the base model is not loaded".into())),
                };
                let _ = tx.send(Loaded { adapter, result });
            });
        }
    }

    /// A load finished: its queue holds the pin now (or releases it if its work is gone);
    /// a failed load fails the work waiting for it.
    fn load_done(&mut self, l: Loaded) {
        self.loads_running = self.loads_running.saturating_sub(1);
        let residency = self.registry.residency().clone();
        let Some(q) = self.queues.get_mut(&l.adapter) else {
            if l.result.is_ok() {
                residency.unpin(&l.adapter);
            }
            return;
        };
        q.loading = false;
        match l.result {
            Ok(()) => {
                if q.pinned || q.outstanding == 0 {
                    residency.unpin(&l.adapter);
                } else {
                    q.pinned = true;
                }
            }
            Err(e) => {
                tracing::warn!(model = %l.adapter, error = %e, "adapter load failed");
                let pending = std::mem::take(&mut q.pending);
                for (seq, j) in pending {
                    self.metrics.finished(&j.job.tenant, false, j.started);
                    self.futures.fail(&j.job.future, &e);
                    q.outstanding = q.outstanding.saturating_sub(1);
                    self.outstanding = self.outstanding.saturating_sub(1);
                    q.next_seq = q.next_seq.max(seq + 1);
                }
            }
        }
    }

    /// Release the queue's pin once it has nothing outstanding.
    fn release_idle(&mut self, id: &AdapterId) {
        if let Some(q) = self.queues.get_mut(id) {
            if q.pinned && q.outstanding == 0 && !q.in_flight {
                q.pinned = false;
                self.registry.residency().unpin(id);
            }
        }
    }

    fn lane_done(&mut self, r: LaneReport) {
        self.free.push(r.lane);
        self.last_pass = r.elapsed;
        self.freed_at = Instant::now();
        self.last_models = r.adapters.iter().map(|(a, _)| a.clone()).collect();
        for (adapter, finished) in r.adapters {
            let Some(q) = self.queues.get_mut(&adapter) else {
                // Deleted while running.
                self.outstanding = self.outstanding.saturating_sub(finished.len());
                continue;
            };
            q.in_flight = false;
            for f in &finished {
                // A split request that failed part-way: drop the rest of it.
                if q.pending
                    .get(&q.next_seq)
                    .is_some_and(|j| &j.job.future == f)
                {
                    q.pending.remove(&q.next_seq);
                    q.next_seq += 1;
                }
            }
            q.outstanding = q.outstanding.saturating_sub(finished.len());
            self.outstanding = self.outstanding.saturating_sub(finished.len());
            self.release_idle(&adapter);
        }
    }

    /// Fail the work of models whose next seq_id has been missing for too long, then carry
    /// on after the failed work.
    fn expire_missing(&mut self) {
        let now = Instant::now();
        let limit = Duration::from_millis(self.cfg.seq_timeout_ms);
        // Fairness counts only for tenants with a model queue: one per live model, so
        // tenants that come and go (every API key in development mode) leave no trace.
        if self.served.len() > self.queues.len() {
            let live: std::collections::HashSet<&TenantId> =
                self.queues.values().map(|q| &q.entry.tenant).collect();
            self.served.retain(|t, _| live.contains(t));
        }
        let mut emptied = Vec::new();
        for q in self.queues.values_mut() {
            // Remember only the recent seq_ids for retries: bounded memory per model.
            if q.seen.len() > 2 * SEEN_WINDOW {
                let floor = q.next_seq.saturating_sub(SEEN_WINDOW as u64);
                q.seen.retain(|s, _| *s >= floor);
            }
            if q.pending.is_empty() || q.pending.contains_key(&q.next_seq) {
                q.blocked_since = None;
                continue;
            }
            let since = *q.blocked_since.get_or_insert(now);
            if now.duration_since(since) < limit {
                continue;
            }
            let missing = q.next_seq;
            let e = Error::invalid(
                "seq_id",
                format!(
                    "seq_id {missing} of model {} never arrived within {} ms; later requests of this model failed",
                    q.entry.id, self.cfg.seq_timeout_ms
                ),
            );
            let pending = std::mem::take(&mut q.pending);
            let mut last = missing;
            for (seq, j) in pending {
                self.metrics.finished(&j.job.tenant, false, false);
                self.futures.fail(&j.job.future, &e);
                q.outstanding = q.outstanding.saturating_sub(1);
                self.outstanding = self.outstanding.saturating_sub(1);
                last = seq;
            }
            q.next_seq = last + 1;
            q.blocked_since = None;
            emptied.push(q.entry.id.clone());
        }
        for id in emptied {
            self.release_idle(&id);
        }
    }

    /// `batch_wait_ms`, or up to 5% of the last pass where that is longer (at most
    /// `MAX_GATHER`): on a slow device a few more milliseconds cost nothing, and a tenant
    /// that misses a batch waits a whole pass. It runs from when the work arrived or the
    /// lane came free, whichever is later: tenants answered at the end of a pass get the
    /// whole window to send their next request.
    fn gather_window(&self) -> Duration {
        Duration::from_millis(self.cfg.batch_wait_ms).max((self.last_pass / 20).min(MAX_GATHER))
    }

    fn dispatch(&mut self) {
        if self.cfg.batch_wait_ms > 0 && !self.free.is_empty() {
            // Work that arrived just now waits a moment for its peers (tenants answered by
            // the same batch come back together); work that waited through a pass goes now.
            let oldest = self
                .queues
                .values()
                .filter(|q| q.ready())
                .filter_map(|q| q.pending.get(&q.next_seq))
                .map(|j| j.arrived)
                .min();
            let Some(oldest) = oldest else {
                self.gather_until = None;
                return;
            };
            let mut until = oldest.max(self.freed_at) + self.gather_window();
            // Everyone from the last batch is back and the burst of submissions is over
            // (a client sends forward_backward and optim_step back to back): go now.
            let peers_back = !self.last_models.is_empty()
                && self
                    .last_models
                    .iter()
                    .all(|id| self.queues.get(id).is_none_or(|q| q.ready()));
            if peers_back {
                until =
                    until.min(self.last_arrival + Duration::from_millis(self.cfg.batch_wait_ms));
            }
            if Instant::now() < until {
                self.gather_until = Some(until);
                return;
            }
        }
        self.gather_until = None;
        while let Some(&lane) = self.free.last() {
            let Some(batch) = self.form_batch() else {
                return;
            };
            self.free.pop();
            if let Err(e) = self.lanes[lane].send(batch) {
                // The lane thread is gone: fail its batch so nobody waits forever.
                let err = Error::Unavailable("a worker lane stopped".into());
                for it in &e.0.items {
                    for p in &it.pieces {
                        self.futures.fail(&p.job.future, &err);
                    }
                    for j in &it.after {
                        self.futures.fail(&j.future, &err);
                    }
                }
                tracing::error!(lane, "worker lane stopped");
            }
        }
    }

    fn form_batch(&mut self) -> Option<Batch> {
        let mut order: Vec<AdapterId> = self
            .queues
            .iter()
            .filter(|(_, q)| q.ready())
            .map(|(id, _)| id.clone())
            .collect();
        if order.is_empty() {
            return None;
        }
        order.sort_by_key(|id| {
            let q = &self.queues[id];
            (
                self.served.get(&q.entry.tenant).copied().unwrap_or(0),
                q.next_seq,
                id.clone(),
            )
        });
        // One base per batch: the first in fairness order whose model is loaded (runs are
        // made only on loaded bases, so that is the first), and only its models.
        let (base, model) = order.iter().find_map(|id| {
            let base = &self.queues[id].entry.base;
            self.registry
                .base_now_named(base)
                .map(|m| (base.clone(), m))
        })?;
        order.retain(|id| self.queues[id].entry.base == base);
        let budget = self.cfg.max_batch_tokens;
        // Equal shares per tenant, split among that tenant's ready models: a tenant with
        // many models gets no more of the batch than a tenant with one.
        let mut per_tenant: HashMap<&TenantId, usize> = HashMap::new();
        for id in &order {
            *per_tenant.entry(&self.queues[id].entry.tenant).or_insert(0) += 1;
        }
        let tenants = per_tenant.len();
        let quantum: HashMap<AdapterId, usize> = order
            .iter()
            .map(|id| {
                let models = per_tenant[&self.queues[id].entry.tenant];
                (id.clone(), (budget / (tenants * models)).max(1))
            })
            .collect();
        let mut used = 0usize;
        let mut items: Vec<BatchItem> = Vec::new();
        let mut slot: HashMap<AdapterId, usize> = HashMap::new();
        let mut open = order;
        // Rounds of equal shares, then one pass that fills what is left.
        let mut phase_fill = false;
        while !open.is_empty() && used < budget {
            let before = used;
            let mut still = Vec::new();
            for id in open {
                let share = quantum.get(&id).copied().unwrap_or(1);
                let allowance = if phase_fill {
                    budget - used
                } else {
                    share.min(budget - used)
                };
                let q = match self.queues.get_mut(&id) {
                    Some(q) => q,
                    None => continue,
                };
                let i = *slot.entry(id.clone()).or_insert_with(|| {
                    items.push(BatchItem {
                        entry: q.entry.clone(),
                        pieces: Vec::new(),
                        after: Vec::new(),
                    });
                    items.len() - 1
                });
                let (turn, took) = take(q, &mut items[i], allowance, used == 0, &self.metrics);
                used += took;
                *self.served.entry(q.entry.tenant.clone()).or_insert(0) += took as u64;
                if turn == Turn::Open {
                    still.push(id);
                }
            }
            open = still;
            if used == before {
                if phase_fill {
                    break;
                }
                phase_fill = true;
            }
        }
        items.retain(|it| !it.pieces.is_empty() || !it.after.is_empty());
        if items.is_empty() {
            return None;
        }
        for it in &items {
            if let Some(q) = self.queues.get_mut(&it.entry.id) {
                q.in_flight = true;
            }
        }
        for it in &items {
            for p in &it.pieces {
                if p.first {
                    self.futures.set_running(&p.job.future);
                }
            }
            for j in &it.after {
                self.futures.set_running(&j.future);
            }
        }
        Some(Batch {
            model,
            items,
            registry: self.registry.clone(),
        })
    }
}

/// Take one model's ready work into its batch item, up to `allowance` tokens. Returns how
/// the turn ended and the tokens taken.
fn take(
    q: &mut ModelQueue,
    item: &mut BatchItem,
    allowance: usize,
    batch_empty: bool,
    metrics: &Metrics,
) -> (Turn, usize) {
    let mut took = 0usize;
    loop {
        let seq = q.next_seq;
        let Some(j) = q.pending.get_mut(&seq) else {
            return (Turn::Closed, took);
        };
        let op = j.job.op.clone();
        match op.fb() {
            Some(fb) => {
                let start = j.next_datum;
                let mut end = start;
                let mut tokens = 0usize;
                while end < fb.data.len() {
                    let t = fb.data[end].model_input().len();
                    let first_of_batch = batch_empty && took == 0 && end == start;
                    if took + tokens + t > allowance && !first_of_batch {
                        break;
                    }
                    tokens += t;
                    end += 1;
                }
                if end == start {
                    return (Turn::Open, took);
                }
                if !j.started {
                    j.started = true;
                    metrics.started(&j.job.tenant);
                }
                let last = end == fb.data.len();
                item.pieces.push(Piece {
                    job: j.job.clone(),
                    range: Range { start, end },
                    first: start == 0,
                    last,
                    tokens,
                });
                took += tokens;
                if last {
                    q.pending.remove(&seq);
                    q.next_seq += 1;
                } else {
                    j.next_datum = end;
                    return (Turn::Closed, took);
                }
            }
            None => {
                // A barrier: it runs after this model's passes; later work waits a cycle.
                let Some(j) = q.pending.remove(&seq) else {
                    return (Turn::Closed, took);
                };
                if !j.started {
                    metrics.started(&j.job.tenant);
                }
                item.after.push(j.job);
                q.next_seq += 1;
                return (Turn::Closed, took);
            }
        }
    }
}
