//! Worker lanes: blocking threads that run the batches the scheduler forms (each of one
//! base model's adapters, run on that base). A lane locks the
//! models of its batch (in id order, so two lanes can never deadlock), runs one
//! multi-adapter forward pass (and one forward_backward pass) over all their work, then each
//! model's barriers in order, finishes the futures and reports back.
//!
//! Every request gets its own adapter slot in the pass (slots may share weights), so its
//! gradient is its own: a failed request adds nothing, and a request split across batches
//! adds its gradient only when its last piece succeeds. A lane never decides order.

use super::future::{Futures, JobFailure, JobOutput};
use super::history::{History, MetricPoint};
use super::ids::{AdapterId, FutureId, SessionId};
use super::job::{FbRequest, JobRef, Op};
use super::metrics::Metrics;
use super::registry::{AdapterEntry, AdapterState, Partial, Registry, Session};
use super::snapshot::Snapshot;
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::BaseModel;
use crate::train::loss::{LossConfig, LossDatum, LossFunction, LossOutput};
use crate::train::{forward_backward, CheckedDatum, TrainableAdapter, Work, WorkResult};
use parking_lot::MutexGuard;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tokio::sync::mpsc;

pub(crate) struct Batch {
    /// The base every item of the batch trains on.
    pub model: Arc<BaseModel>,
    pub items: Vec<BatchItem>,
    pub registry: Arc<Registry>,
}

/// One model's share of a batch: pieces of forward / forward_backward requests in seq_id
/// order, then barriers in seq_id order.
pub(crate) struct BatchItem {
    pub entry: Arc<AdapterEntry>,
    pub pieces: Vec<Piece>,
    pub after: Vec<JobRef>,
}

/// Data `range` of one request.
pub(crate) struct Piece {
    pub job: JobRef,
    pub range: Range<usize>,
    pub first: bool,
    pub last: bool,
    pub tokens: usize,
}

/// Per model, the futures that this batch finished (done or failed).
pub(crate) struct LaneReport {
    pub lane: usize,
    pub adapters: Vec<(AdapterId, Vec<FutureId>)>,
    /// How long the batch took.
    pub elapsed: std::time::Duration,
}

pub(crate) struct LaneCtx {
    pub lane: usize,
    pub futures: Arc<Futures>,
    pub metrics: Arc<Metrics>,
    pub history: Arc<History>,
    pub report: mpsc::UnboundedSender<LaneReport>,
}

pub(crate) fn spawn_lane(
    ctx: LaneCtx,
    rx: std::sync::mpsc::Receiver<Batch>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("loraplex-lane-{}", ctx.lane))
        .spawn(move || {
            while let Ok(batch) = rx.recv() {
                let t = std::time::Instant::now();
                let adapters = run_batch(&ctx, batch);
                if ctx
                    .report
                    .send(LaneReport {
                        lane: ctx.lane,
                        adapters,
                        elapsed: t.elapsed(),
                    })
                    .is_err()
                {
                    break;
                }
            }
        })
}

/// A loss that turns a panic into a user error: a hostile or buggy plugin fails its own
/// request, never the lane.
struct Guarded<'a>(&'a dyn LossFunction);

impl LossFunction for Guarded<'_> {
    fn compute(&self, data: &[LossDatum], config: &LossConfig) -> Result<LossOutput> {
        catch_unwind(AssertUnwindSafe(|| self.0.compute(data, config)))
            .unwrap_or_else(|_| Err(Error::invalid("loss_fn", "the loss function panicked")))
    }
}

fn run_batch(ctx: &LaneCtx, mut batch: Batch) -> Vec<(AdapterId, Vec<FutureId>)> {
    batch.items.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
    let tokens: usize = batch
        .items
        .iter()
        .flat_map(|i| i.pieces.iter().map(|p| p.tokens))
        .sum();
    let _span =
        tracing::info_span!("batch", lane = ctx.lane, models = batch.items.len(), tokens).entered();
    ctx.metrics.batches.record(batch.items.len(), tokens);
    let mut finished: Vec<Vec<FutureId>> = vec![Vec::new(); batch.items.len()];
    let r = catch_unwind(AssertUnwindSafe(|| {
        run_items(
            ctx,
            &batch.model,
            &batch.registry,
            &batch.items,
            &mut finished,
        )
    }));
    if let Err(p) = r {
        tracing::error!(panic = %crate::util::panic_message(&*p), "batch panicked");
        // Fail whatever the panic left unfinished; the model's state may be part-updated.
        let e = Error::Panic("the worker lane failed while running this job".into());
        for (i, it) in batch.items.iter().enumerate() {
            let jobs = it.pieces.iter().map(|p| &p.job).chain(it.after.iter());
            for j in jobs {
                if !finished[i].contains(&j.future) {
                    finish(ctx, j, Err(e.clone_shallow()));
                    finished[i].push(j.future.clone());
                }
            }
            it.entry.state.lock().partial = None;
        }
    }
    batch
        .items
        .iter()
        .zip(finished)
        .map(|(it, f)| (it.entry.id.clone(), f))
        .collect()
}

impl Error {
    /// The message and category of an error, for failing several futures with it.
    pub(crate) fn clone_shallow(&self) -> Error {
        Error::JobFailed {
            message: self.to_string(),
            category: self.category(),
        }
    }
}

fn finish(ctx: &LaneCtx, job: &JobRef, r: Result<JobOutput>) {
    let ok = r.is_ok();
    match &r {
        Ok(_) => tracing::info!(parent: &job.span, "job done"),
        Err(e) => tracing::info!(parent: &job.span, error = %e, "job failed"),
    }
    // Counters first: whoever the future wakes may read them.
    ctx.metrics.finished(&job.tenant, ok, true);
    ctx.futures
        .finish(&job.future, r.map_err(|e| JobFailure::from(&e)));
}

fn run_items(
    ctx: &LaneCtx,
    model: &BaseModel,
    registry: &Registry,
    items: &[BatchItem],
    finished: &mut [Vec<FutureId>],
) {
    let mut guards: Vec<MutexGuard<AdapterState>> =
        items.iter().map(|it| it.entry.state.lock()).collect();
    crate::failpoint::hit("job.batch");
    // The scheduler pins every model of a batch in memory; one that is not (a bug) fails
    // its own jobs, not the batch.
    let cold: Vec<bool> = guards.iter().map(|g| g.train.is_none()).collect();
    for (i, it) in items.iter().enumerate().filter(|(i, _)| cold[*i]) {
        let e = Error::Unavailable(format!("model {} is not in memory", it.entry.id));
        for j in it.pieces.iter().map(|p| &p.job).chain(it.after.iter()) {
            if !finished[i].contains(&j.future) {
                finish(ctx, j, Err(e.clone_shallow()));
                finished[i].push(j.future.clone());
            }
        }
    }
    for forward_only in [true, false] {
        // (item, piece, request)
        let sel: Vec<(usize, &Piece, &FbRequest<CheckedDatum>)> = items
            .iter()
            .enumerate()
            .filter(|(i, _)| !cold[*i])
            .flat_map(|(i, it)| it.pieces.iter().map(move |p| (i, p)))
            .filter_map(|(i, p)| match &*p.job.op {
                Op::Forward(r) if forward_only => Some((i, p, r)),
                Op::ForwardBackward(r) if !forward_only => Some((i, p, r)),
                _ => None,
            })
            .collect();
        if sel.is_empty() {
            continue;
        }
        let losses: Vec<Guarded> = sel.iter().map(|(_, _, r)| Guarded(&*r.loss)).collect();
        let outcome = {
            let weights: Vec<&LoraWeights> = sel
                .iter()
                .filter_map(|(i, _, _)| guards[*i].train.as_ref().map(|t| &t.weights))
                .collect();
            let work: Vec<Work> = sel
                .iter()
                .zip(&losses)
                .enumerate()
                .map(|(slot, ((_, p, r), loss))| Work {
                    adapter: Some(slot),
                    data: r.data.get(p.range.clone()).unwrap_or(&[]),
                    loss,
                    config: &r.loss_config,
                })
                .collect();
            forward_backward(model, &weights, &work, forward_only)
        };
        match outcome {
            Err(e) => {
                for (i, p, _) in &sel {
                    if guards[*i]
                        .partial
                        .as_ref()
                        .is_some_and(|x| x.future == p.job.future)
                    {
                        guards[*i].partial = None;
                    }
                    finish(ctx, &p.job, Err(e.clone_shallow()));
                    finished[*i].push(p.job.future.clone());
                }
            }
            Ok((results, grads)) => {
                for ((i, p, _), (r, g)) in sel.iter().zip(results.into_iter().zip(grads)) {
                    let st = &mut *guards[*i];
                    let done = piece_done(ctx, st, p, r, g, forward_only);
                    if let (Some(Ok(JobOutput::ForwardBackward(wr))), false) = (&done, forward_only)
                    {
                        let it = &items[*i];
                        ctx.history.record(MetricPoint::forward_backward(
                            &p.job.tenant,
                            &it.entry.id,
                            st.step,
                            wr,
                        ));
                    }
                    if let Some(r) = done {
                        finish(ctx, &p.job, r);
                        finished[*i].push(p.job.future.clone());
                    }
                }
            }
        }
    }
    for (i, it) in items.iter().enumerate().filter(|(i, _)| !cold[*i]) {
        for j in &it.after {
            let _e = j.span.enter();
            let r = barrier(registry, &it.entry, &mut guards[i], j);
            if let (Ok(JobOutput::OptimStep(report)), Op::OptimStep(p)) = (&r, &*j.op) {
                ctx.history.record(MetricPoint::optim_step(
                    &j.tenant,
                    &it.entry.id,
                    report,
                    p.learning_rate,
                ));
            }
            finish(ctx, j, r);
            finished[i].push(j.future.clone());
        }
    }
}

/// Fold a piece's result into its request. Returns the request's outcome once it is over.
fn piece_done(
    ctx: &LaneCtx,
    st: &mut AdapterState,
    p: &Piece,
    r: Result<WorkResult>,
    g: crate::lora::LoraGrads,
    forward_only: bool,
) -> Option<Result<JobOutput>> {
    let fut = &p.job.future;
    let wr = match r {
        Ok(wr) => wr,
        Err(e) => {
            if st.partial.as_ref().is_some_and(|x| &x.future == fut) {
                st.partial = None;
            }
            return Some(Err(e));
        }
    };
    ctx.futures.add_progress(fut, p.tokens as u64);
    ctx.metrics.train_tokens(&p.job.tenant, p.tokens as u64);
    let Some(train) = st.train.as_mut() else {
        return Some(Err(Error::Unavailable("the model is not in memory".into())));
    };
    if p.first && p.last {
        if !forward_only {
            if let Err(e) = train.accumulate(g) {
                return Some(Err(e));
            }
        }
        return Some(Ok(JobOutput::ForwardBackward(wr)));
    }
    if p.first {
        st.partial = Some(Partial {
            future: fut.clone(),
            result: wr,
            grads: g,
        });
    } else {
        let Some(acc) = st.partial.as_mut().filter(|x| &x.future == fut) else {
            return Some(Err(Error::Unavailable(
                "a split request lost its earlier pieces".into(),
            )));
        };
        merge_result(&mut acc.result, wr);
        if let Err(e) = acc.grads.merge(g) {
            st.partial = None;
            return Some(Err(e));
        }
    }
    if !p.last {
        return None;
    }
    let acc = st.partial.take()?;
    if !forward_only {
        let Some(train) = st.train.as_mut() else {
            return Some(Err(Error::Unavailable("the model is not in memory".into())));
        };
        if let Err(e) = train.accumulate(acc.grads) {
            return Some(Err(e));
        }
    }
    Some(Ok(JobOutput::ForwardBackward(acc.result)))
}

/// Combine the results of two pieces of one request. Losses are sums over data (as all
/// built-in losses are), so pieces add up; `:mean` metrics are weighted by data, `:max` and
/// `:min` combine as named, anything else adds.
fn merge_result(acc: &mut WorkResult, b: WorkResult) {
    let (na, nb) = (acc.logprobs.len() as f64, b.logprobs.len() as f64);
    acc.loss += b.loss;
    acc.weight_sum += b.weight_sum;
    for (k, v) in b.metrics {
        let e = acc.metrics.entry(k.clone()).or_insert(v);
        if k.ends_with(":mean") {
            *e = (*e * na + v * nb) / (na + nb).max(1.0);
        } else if k.ends_with(":max") {
            *e = e.max(v);
        } else if k.ends_with(":min") {
            *e = e.min(v);
        } else {
            *e += v;
        }
    }
    acc.logprobs.extend(b.logprobs);
    acc.k.extend(b.k);
    match (&mut acc.elementwise, b.elementwise) {
        (Some(a), Some(b)) => a.extend(b),
        (a, _) => *a = None,
    }
}

fn barrier(
    registry: &Registry,
    entry: &AdapterEntry,
    st: &mut AdapterState,
    j: &JobRef,
) -> Result<JobOutput> {
    let Some(train) = st.train.as_mut() else {
        return Err(Error::Unavailable("the model is not in memory".into()));
    };
    match &*j.op {
        Op::OptimStep(p) => {
            let report = train.optim_step(p)?;
            st.step = train.optim.step;
            if let Some(persist) = registry.persist() {
                // The step happened either way; a failed automatic checkpoint is logged,
                // and the adapter stays dirty: evicting it writes it back first.
                match persist.stepped(&j.tenant, &entry.id, train) {
                    Ok(wrote) => st.dirty = !wrote,
                    Err(e) => {
                        st.dirty = true;
                        tracing::error!(model = %entry.id, error = %e, "automatic checkpoint failed");
                    }
                }
            }
            Ok(JobOutput::OptimStep(report))
        }
        Op::SaveState {
            name,
            ttl,
            user_metadata,
        } => {
            registry.save_checkpoint(
                &j.tenant,
                name,
                &entry.id,
                &entry.base,
                Arc::new(train.clone()),
                *ttl,
                user_metadata.clone(),
            )?;
            Ok(JobOutput::Saved { name: name.clone() })
        }
        Op::LoadState { name, optimizer } => {
            let ck = registry.readable_checkpoint(&j.tenant, name)?;
            if ck.base != entry.base {
                return Err(Error::invalid(
                    "path",
                    format!(
                        "checkpoint {name:?} was trained on base model {:?}; this training run is on {:?}",
                        ck.base, entry.base
                    ),
                ));
            }
            if ck.config != train.weights.config {
                return Err(Error::invalid(
                    "name",
                    format!("checkpoint {name:?} has a different LoRA configuration"),
                ));
            }
            let c = registry.checkpoint_state(&ck)?;
            *train = if *optimizer {
                (*c).clone()
            } else {
                TrainableAdapter::new(c.weights.clone())
            };
            st.step = train.optim.step;
            // Not in the run's durable state until its next automatic checkpoint.
            st.dirty = true;
            st.partial = None;
            Ok(JobOutput::Loaded {
                name: name.clone(),
                model: entry.id.clone(),
            })
        }
        Op::SamplingSession => {
            let sid = SessionId::generate();
            let snap = Snapshot::new(sid.clone(), j.tenant.clone(), train.weights.clone());
            let id = registry.insert_session(Session {
                id: sid,
                tenant: j.tenant.clone(),
                base: entry.base.clone(),
                adapter: Some(entry.id.clone()),
                weights: Some(snap),
                owner: entry.session.clone(),
            })?;
            Ok(JobOutput::SamplingSession(id))
        }
        Op::Refused(f) => Err(Error::JobFailed {
            message: f.message.clone(),
            category: f.category,
        }),
        Op::Forward(_) | Op::ForwardBackward(_) => Err(Error::Unavailable(
            "a pass was scheduled as a barrier".into(),
        )),
    }
}
