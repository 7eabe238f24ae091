//! The backend interface: the math of a pass over a packed batch, behind one trait that
//! [`BaseModel`]'s front dispatches to. A backend owns the decoder layers (and, for
//! training, the final norm and LM head with their backward); the front owns everything
//! else: row checks, packing, splitting a batch into parts, LM-head chunking for inference,
//! kept probabilities' budget, and the shapes rows and tapes take.
//!
//! Two backends:
//! - [`Cpu`] ([`cpu`]): host f32 kernels over plain buffers. One layer implementation
//!   serves the training forward (keeping a tape) and prefill/decode (with KV caches).
//!   Chosen for a CPU model in f32.
//! - [`Candle`] ([`candle`]): candle's general tensor ops, any device and dtype: the f64
//!   reference of the gradient checks, the path on CUDA, and what the cpu backend is tested
//!   against. Attention runs over all rows of a batch at once and LoRA over all adapters at
//!   once, so a pass is a few large kernels rather than many per row.
//!
//! Both are stateless: the model's weights, config and RoPE tables live in [`BaseModel`],
//! which a backend reads.

pub(crate) mod candle;
pub(crate) mod cpu;

use super::batch::PackedBatch;
use super::front::{Adapters, KvCache};
use super::BaseModel;
use crate::error::{Error, Result};
use crate::lora::LoraGrads;
use candle_core::{DType, Tensor};
use std::any::Any;
use std::sync::Arc;

/// The activations a backend's training forward keeps for its backward pass. Only the
/// backend that made a tape reads it.
pub(crate) type PassTape = Box<dyn Any + Send + Sync>;

/// Per packed token, the log-probability of each of its `kmax` targets (`[N][kmax]`), and
/// with `keep` the tape.
pub(crate) type TrainOut = (Vec<Vec<f64>>, Option<PassTape>);

/// The math of one pass over a packed batch (see the module doc).
pub(crate) trait Backend: Send + Sync + 'static {
    /// A short name for logs and `Debug` (`cpu`, `candle`).
    fn name(&self) -> &'static str;

    /// Whether a batch of several rows should run as independent parts side by side (one
    /// per pool thread), rather than as one packed pass.
    fn parallel_parts(&self) -> bool;

    /// Training forward over `batch`: per packed token the log-probability of each of its
    /// `kmax` targets (`targets`: `[N · kmax]`, padded with id 0), and the tape with `keep`
    /// (with the softmax probabilities too when `keep_probs`).
    #[allow(clippy::too_many_arguments)]
    fn train_forward(
        &self,
        m: &BaseModel,
        batch: &PackedBatch,
        targets: Vec<u32>,
        kmax: usize,
        adapters: &Adapters,
        keep: bool,
        keep_probs: bool,
    ) -> Result<TrainOut>;

    /// Backward of [`Self::train_forward`] seeded with `g = d loss / d logprob`
    /// (`[N · kmax]`). Returns gradients per adapter index.
    fn train_backward(
        &self,
        m: &BaseModel,
        tape: PassTape,
        batch: &PackedBatch,
        g: Vec<f32>,
        kmax: usize,
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>>;

    /// Prefill or decode: run the batch's new tokens through every layer, appending keys
    /// and values to each row's cache (`caches` in packed order), and return the final
    /// norm's output `[N, hidden]` in the model's dtype.
    fn infer_hidden(
        &self,
        m: &BaseModel,
        batch: &PackedBatch,
        adapters: &Adapters,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor>;

    /// `x Wᵀ` for `x: [m, k]` and a frozen `w: [n, k]` (the LM head of inference).
    fn linear(&self, x: &Tensor, w: &crate::model::Weight) -> Result<Tensor>;
}

/// Host f32 kernels (see [`cpu`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu;

/// candle's general ops (see [`candle`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candle {
    /// Most bytes of one group of rows' attention scores (see [`candle::SCORES_BYTES`]).
    pub(crate) scores_budget: usize,
}

impl Default for Candle {
    fn default() -> Self {
        Candle {
            scores_budget: candle::SCORES_BYTES,
        }
    }
}

/// The backend for a model on `device` in `dtype`: the cpu backend for a CPU model in f32,
/// candle otherwise.
pub(crate) fn choose(device: &candle_core::Device, dtype: DType) -> Arc<dyn Backend> {
    if device.is_cpu() && dtype == DType::F32 {
        Arc::new(Cpu)
    } else {
        Arc::new(Candle::default())
    }
}

/// The tape a backend made, back as its own type.
pub(crate) fn own_tape<T: 'static>(tape: PassTape, backend: &str) -> Result<Box<T>> {
    tape.downcast::<T>().map_err(|_| {
        Error::Unavailable(format!(
            "a training tape reached the {backend} backend that another backend made"
        ))
    })
}
