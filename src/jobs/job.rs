//! What a caller can ask of a training model ([`Op`]), and a queued job: an op with its
//! future, owner, place in the model's order and tracing span.

use super::future::JobKind;
use super::ids::{FutureId, TenantId};
use crate::error::{Error, Result};
use crate::lora::optim::AdamParams;
use crate::model::BaseModel;
use crate::train::loss::{LossConfig, LossFunction};
use crate::train::{check_data, CheckedDatum, Datum};
use std::sync::Arc;

/// Data and the loss to apply to it. The loss is any [`LossFunction`]: a built-in one or a
/// tenant's plugin; it runs on the batch's per-token logprobs and seeds the backward pass.
/// As asked, its data are [`Datum`]s; once [`Self::check`]ed at submission (what the queue
/// holds), [`CheckedDatum`]s.
#[derive(Clone)]
pub struct FbRequest<D = Datum> {
    pub data: Vec<D>,
    pub loss: Arc<dyn LossFunction>,
    pub loss_config: LossConfig,
}

impl<D> std::fmt::Debug for FbRequest<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbRequest")
            .field("data", &self.data.len())
            .field("loss_config", &self.loss_config)
            .finish()
    }
}

impl FbRequest {
    /// Check every datum against the model before the request is queued, so a request split
    /// across batches cannot fail half-way on bad input. The only check its data gets.
    pub fn check(self, model: &BaseModel) -> Result<FbRequest<CheckedDatum>> {
        Ok(FbRequest {
            data: check_data(model, self.data)?,
            loss: self.loss,
            loss_config: self.loss_config,
        })
    }
}

impl FbRequest<CheckedDatum> {
    pub fn num_tokens(&self) -> usize {
        self.data.iter().map(|d| d.model_input().len()).sum()
    }
}

/// Work on one training model. Forward and forward_backward are batched with other
/// models' work; the rest are barriers for their model only. As asked, `Op` (its data are
/// [`Datum`]s); as queued, [`CheckedOp`] (made by [`Op::check`]).
#[derive(Debug, Clone)]
pub enum Op<D = Datum> {
    Forward(FbRequest<D>),
    ForwardBackward(FbRequest<D>),
    OptimStep(AdamParams),
    /// Keep a copy of weights and optimizer state under a name (the tenant's namespace).
    SaveState {
        name: String,
        /// Forget the copy after this long; `None` keeps it until deleted.
        ttl: Option<std::time::Duration>,
        /// What the client attached to the checkpoint.
        user_metadata: Option<super::metadata::UserMetadata>,
    },
    /// Replace the weights with a saved copy (the tenant's own or a published one), and
    /// the optimizer state too when `optimizer` is set (otherwise the optimizer starts
    /// afresh).
    LoadState {
        name: String,
        optimizer: bool,
    },
    /// Freeze the current weights into a sampling session.
    SamplingSession,
    /// A request refused at submission that still holds its place in the model's seq_id
    /// order (so later requests do not wait for it); it fails with this when its turn comes.
    Refused(super::future::JobFailure),
}

/// An op that passed its check: what the scheduler queues and the lanes run.
pub type CheckedOp = Op<CheckedDatum>;

impl<D> Op<D> {
    pub fn kind(&self) -> JobKind {
        match self {
            Op::Forward(_) => JobKind::Forward,
            Op::ForwardBackward(_) => JobKind::ForwardBackward,
            Op::OptimStep(_) => JobKind::OptimStep,
            Op::SaveState { .. } => JobKind::SaveState,
            Op::LoadState { .. } => JobKind::LoadState,
            Op::SamplingSession => JobKind::SamplingSession,
            Op::Refused(_) => JobKind::Forward,
        }
    }

    pub fn fb(&self) -> Option<&FbRequest<D>> {
        match self {
            Op::Forward(r) | Op::ForwardBackward(r) => Some(r),
            _ => None,
        }
    }
}

impl Op {
    /// Check the op against the base model it will run on (data, optimizer parameters,
    /// names), once, before it is queued.
    pub fn check(self, model: &BaseModel) -> Result<CheckedOp> {
        Ok(match self {
            Op::Forward(r) => Op::Forward(r.check(model)?),
            Op::ForwardBackward(r) => Op::ForwardBackward(r.check(model)?),
            Op::OptimStep(p) => {
                p.validate()?;
                Op::OptimStep(p)
            }
            Op::SaveState { name, .. } | Op::LoadState { name, .. } if name.is_empty() => {
                return Err(Error::invalid("name", "empty"))
            }
            Op::SaveState {
                name,
                ttl,
                user_metadata,
            } => Op::SaveState {
                name,
                ttl,
                user_metadata,
            },
            Op::LoadState { name, optimizer } => Op::LoadState { name, optimizer },
            Op::SamplingSession => Op::SamplingSession,
            Op::Refused(f) => Op::Refused(f),
        })
    }
}

impl CheckedOp {
    pub fn num_tokens(&self) -> usize {
        self.fb().map_or(0, |r| r.num_tokens())
    }

    /// About how many bytes of request data the op holds while it waits (tokens, parsed
    /// targets and loss inputs; what the engine's queue memory budget counts).
    pub fn data_bytes(&self) -> usize {
        self.fb().map_or(0, |r| {
            r.data
                .iter()
                .map(|d| {
                    let inputs: usize = d
                        .loss_fn_inputs()
                        .values()
                        .map(|t| t.len() * 8 + t.shape.len() * 8)
                        .sum();
                    (d.model_input().len() + d.targets().len()) * 4 + inputs
                })
                .sum()
        })
    }
}

/// A queued job's share of the queue memory budget, given back when the last copy of the
/// job is dropped (after it ran, failed or was dropped with its model).
pub(crate) struct Charge {
    metrics: Arc<super::metrics::Metrics>,
    bytes: usize,
}

impl Charge {
    pub fn new(metrics: Arc<super::metrics::Metrics>, bytes: usize) -> Self {
        metrics
            .queued_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
        Charge { metrics, bytes }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.metrics
            .queued_bytes
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A job as the scheduler and lanes see it.
#[derive(Clone)]
pub(crate) struct JobRef {
    pub future: FutureId,
    pub tenant: TenantId,
    pub op: Arc<CheckedOp>,
    pub span: tracing::Span,
    pub _charge: Arc<Charge>,
}
