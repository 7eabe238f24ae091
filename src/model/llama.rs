//! The decoder forward pass written for training, and its hand-derived backward pass.
//!
//! Gradients flow only to LoRA parameters: the frozen base weights are used in plain
//! matmuls whose backward computes the input gradient alone, so no full-size gradient of a
//! base weight is ever allocated. We do not use candle's autograd (several of its fused ops
//! silently drop gradients); every backward here is explicit and checked against finite
//! differences in the tests. One pass serves rows of many adapters: base matmuls run over
//! the packed batch, LoRA updates per adapter segment, attention per row.
//!
//! This is the candle backend, with the family's optional pieces (q/k/v biases, per-head q/k
//! RMSNorm) in `body` and `attn_row`. On a CPU model in f32 the cpu backend runs instead
//! ([`super::host_train`], 1.3-1.5x faster at 128-token rows, 2.3x at 1024); this one
//! serves f64 (the finite-difference checks) and GPUs, and is the reference the cpu backend
//! is tested against. The shared front (row checks, packing, LM-head chunking, kept
//! probabilities, the inference step's logits) is also here.

use super::batch::{PackedBatch, Segment};
use super::host_train::HostTape;
use super::train_rows::{TrainBatch, TrainRow};
use super::weights::LayerWeights;
use super::BaseModel;
use crate::error::{Error, Result};
use crate::lora::{LoraGrads, LoraPair, LoraWeights, Site, Target};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope;
use rayon::prelude::*;

/// Past keys and values of one sequence, after RoPE. A model keeps them in one of two
/// forms: per layer `[kv_heads, len, head_dim]` tensors on its device, or (on the host
/// kernels) per layer `[len, kv_heads · head_dim]` buffers that grow in place.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pub(crate) hk: Vec<Vec<f32>>,
    pub(crate) hv: Vec<Vec<f32>>,
    /// Tokens cached.
    pub len: usize,
}

impl KvCache {
    /// Bytes its keys and values hold (host buffers: their capacity).
    pub fn bytes(&self) -> usize {
        let host: usize = self
            .hk
            .iter()
            .chain(&self.hv)
            .map(Vec::capacity)
            .sum::<usize>()
            * 4;
        let dev: usize = self
            .k
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        host + dev
    }

    /// Give back the room its host buffers grew beyond their length.
    pub fn shrink_to_fit(&mut self) {
        self.hk
            .iter_mut()
            .chain(&mut self.hv)
            .for_each(Vec::shrink_to_fit);
    }

    /// A copy of its first `len` positions: the KV of a prefix of the same tokens, which
    /// the same model and adapter would compute identically.
    pub fn prefix(&self, len: usize) -> Result<KvCache> {
        if len > self.len {
            return Err(Error::invalid(
                "len",
                format!(
                    "a prefix of {len} positions of a cache holding {}",
                    self.len
                ),
            ));
        }
        let cut = |v: &Vec<f32>| -> Vec<f32> {
            let per = v.len() / self.len.max(1);
            v[..len * per].to_vec()
        };
        let narrow = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, 0, len)?.contiguous()?) };
        Ok(KvCache {
            k: self.k.iter().map(narrow).collect::<Result<_>>()?,
            v: self.v.iter().map(narrow).collect::<Result<_>>()?,
            hk: self.hk.iter().map(cut).collect(),
            hv: self.hv.iter().map(cut).collect(),
            len,
        })
    }
}

/// Hands an inference step's logits over, chunk by chunk: `(row, first, logits)` where
/// `row` is the input row, `first` the index among its new tokens of the chunk's first
/// position and `logits` the chunk's rows, `[n, vocab]` row-major (f32).
pub type LogitsVisitor<'a> = &'a mut (dyn FnMut(usize, usize, &[f32]) -> Result<()> + Send);

/// A row to prefill or decode: new tokens appended to its cache.
#[derive(Debug, Clone, Copy)]
pub struct InferRow<'a> {
    pub tokens: &'a [u32],
    pub adapter: Option<usize>,
}

/// Activations kept from a training forward pass for its backward pass.
pub struct Tape {
    inner: TapeKind,
}

enum TapeKind {
    Packed(PackedTape),
    /// The rows were split into parts that ran side by side (see
    /// [`BaseModel::split_rows`]): per part, the input indices of its rows and its tape.
    Split {
        /// Per input row, how many seeds backward takes (`len · k`).
        seeds: Vec<usize>,
        parts: Vec<(Vec<usize>, PackedTape)>,
    },
}

/// One packed pass's activations.
struct PackedTape {
    batch: PackedBatch,
    kmax: usize,
    /// Per input row, its `k`.
    ks: Vec<usize>,
    pass: PassTape,
}

enum PassTape {
    Candle(CandleTape),
    Host(HostTape),
}

/// The candle pass's activations.
struct CandleTape {
    layers: Vec<LayerTape>,
    x_last: Tensor,
    xf: Tensor,
    targets: Tensor,
    lm: Vec<LmChunk>,
}

struct RowTape {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    /// With per-head q/k norms: q `[t·h, hd]` and k `[t·kvh, hd]` before them.
    qk_pre: Option<(Tensor, Tensor)>,
}

struct LayerTape {
    x_in: Tensor,
    h: Tensor,
    rows: Vec<RowTape>,
    o: Tensor,
    x_mid: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    a: Tensor,
    /// LoRA `x Aᵀ` per target, per segment.
    xa: Vec<(Target, Vec<Option<Tensor>>)>,
}

struct LmChunk {
    start: usize,
    len: usize,
    adapter: Option<usize>,
    probs: Option<Tensor>,
    xa: Option<Tensor>,
}

/// Fewest tokens in a batch for [`BaseModel::split_rows`] to split it.
const SPLIT_MIN_TOKENS: usize = 128;

/// Most tokens per LM-head chunk: bounds the `[chunk, vocab]` logits buffer.
pub(crate) const LM_CHUNK: usize = 256;
/// Default budget for softmax probabilities kept for backward (see
/// [`BaseModel::with_probs_budget`]).
pub(crate) const KEEP_PROBS_BYTES: usize = 1 << 30;

pub(crate) type Adapters<'a> = [&'a LoraWeights];

pub(crate) fn pair<'a>(
    adapters: &'a Adapters,
    seg: &Segment,
    site: Site,
) -> Option<(&'a LoraPair, f64)> {
    let a = adapters.get(seg.adapter?)?;
    a.get(site).map(|p| (p, a.scale))
}

impl BaseModel {
    /// Dtype of logits and softmax: f32, or f64 for an f64 model (exact gradient checks).
    fn lm_dtype(&self) -> DType {
        if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F64 {
            // The fused kernel has no f64 path.
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.config.rms_norm_eps)?.sqrt()?;
            return Ok(x.broadcast_div(&r)?.broadcast_mul(w)?);
        }
        Ok(candle_nn::ops::rms_norm(
            x,
            w,
            self.config.rms_norm_eps as f32,
        )?)
    }

    /// d/dx of `x · w / rms(x)` given the output gradient `dy`.
    fn rms_backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)? as f64;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.config.rms_norm_eps)?
            .sqrt()?
            .recip()?;
        let gy = dy.broadcast_mul(w)?;
        let dot = (&gy * x)?.sum_keepdim(D::Minus1)?.affine(1.0 / d, 0.0)?;
        let coef = (r.powf(3.0)? * dot)?;
        Ok((gy.broadcast_mul(&r)? - x.broadcast_mul(&coef)?)?)
    }

    /// LoRA update `scale · (x Aᵀ) Bᵀ` for every segment carrying `site`, or None if none does.
    fn lora_forward(
        &self,
        x: &Tensor,
        segs: &[Segment],
        adapters: &Adapters,
        site: Site,
        out_dim: usize,
        save: Option<&mut Vec<(Target, Vec<Option<Tensor>>)>>,
    ) -> Result<Option<Tensor>> {
        if !segs.iter().any(|s| pair(adapters, s, site).is_some()) {
            return Ok(None);
        }
        let mut parts = Vec::with_capacity(segs.len());
        let mut xas = Vec::with_capacity(segs.len());
        for s in segs {
            match pair(adapters, s, site) {
                Some((p, scale)) => {
                    let xs = x.narrow(0, s.start, s.len)?;
                    let xa = xs.matmul(&p.a.to_dtype(x.dtype())?.t()?)?;
                    let d = xa
                        .matmul(&p.b.to_dtype(x.dtype())?.t()?)?
                        .affine(scale, 0.0)?;
                    parts.push(d);
                    xas.push(Some(xa));
                }
                None => {
                    parts.push(Tensor::zeros((s.len, out_dim), x.dtype(), x.device())?);
                    xas.push(None);
                }
            }
        }
        if let (Some(save), Site::Layer(_, t)) = (save, site) {
            save.push((t, xas));
        }
        Ok(Some(cat_rows(parts)?))
    }

    /// `base` plus the LoRA update of `site` on input `x`, where any segment carries it.
    fn with_lora(
        &self,
        base: Tensor,
        x: &Tensor,
        segs: &[Segment],
        adapters: &Adapters,
        site: Site,
        save: Option<&mut Vec<(Target, Vec<Option<Tensor>>)>>,
    ) -> Result<Tensor> {
        let out_dim = base.dim(1)?;
        match self.lora_forward(x, segs, adapters, site, out_dim, save)? {
            Some(d) => Ok((base + d)?),
            None => Ok(base),
        }
    }

    /// Backward of [`Self::lora_forward`]: accumulates dA, dB per adapter and returns the
    /// extra input gradient `scale · (dy B) A`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        segs: &[Segment],
        adapters: &Adapters,
        site: Site,
        xas: &[Option<Tensor>],
        grads: &mut [LoraGrads],
    ) -> Result<Option<Tensor>> {
        let in_dim = x.dim(1)?;
        let mut parts = Vec::with_capacity(segs.len());
        let mut any = false;
        for (s, xa) in segs.iter().zip(xas) {
            match (pair(adapters, s, site), xa, s.adapter) {
                (Some((p, scale)), Some(xa), Some(ai)) => {
                    let dys = dy.narrow(0, s.start, s.len)?;
                    let xs = x.narrow(0, s.start, s.len)?;
                    let db = dys.t()?.matmul(xa)?.affine(scale, 0.0)?;
                    let dxa = dys.matmul(&p.b.to_dtype(dy.dtype())?)?.affine(scale, 0.0)?;
                    let da = dxa.t()?.matmul(&xs)?;
                    parts.push(dxa.matmul(&p.a.to_dtype(dy.dtype())?)?);
                    if let Some(g) = grads.get_mut(ai) {
                        g.add(site, da.to_dtype(DType::F32)?, db.to_dtype(DType::F32)?)?;
                    }
                    any = true;
                }
                _ => parts.push(Tensor::zeros((s.len, in_dim), dy.dtype(), dy.device())?),
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(cat_rows(parts)?))
    }

    /// Additive causal mask `[group·len, total]` for `len` new queries at `pos0..`.
    pub(crate) fn causal_mask(
        &self,
        len: usize,
        pos0: usize,
        total: usize,
    ) -> Result<Option<Tensor>> {
        if len == 1 {
            return Ok(None);
        }
        let g = self.config.group_size();
        let mut m = vec![0f32; g * len * total];
        for r in 0..g * len {
            let pos = pos0 + r % len;
            for v in &mut m[r * total + pos + 1..(r + 1) * total] {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(Some(
            Tensor::from_vec(m, (g * len, total), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// Causal attention of one row. q `[len, q_dim]`, k and v `[len, kv_dim]`, before RoPE.
    #[allow(clippy::too_many_arguments)]
    fn attn_row(
        &self,
        lw: &LayerWeights,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        keep: bool,
    ) -> Result<(Tensor, Option<RowTape>)> {
        let HeadLayout {
            t,
            hd,
            h,
            kvh,
            g,
            scale,
        } = self.heads(q)?;
        let cos = self.cos.narrow(0, pos0, t)?;
        let sin = self.sin.narrow(0, pos0, t)?;
        let (q, k, qk_pre) = match (&lw.q_norm, &lw.k_norm) {
            (Some(qn), Some(kn)) => {
                let qp = q.reshape((t * h, hd))?;
                let kp = k.reshape((t * kvh, hd))?;
                let qo = self.rms(&qp, qn)?.reshape((t, h * hd))?;
                let ko = self.rms(&kp, kn)?.reshape((t, kvh * hd))?;
                (qo, ko, keep.then_some((qp, kp)))
            }
            _ => (q.clone(), k.clone(), None),
        };
        let q = heads_first(&q, t, h, hd)?.unsqueeze(0)?;
        let q = rope(&q, &cos, &sin)?
            .affine(scale, 0.0)?
            .reshape((kvh, g * t, hd))?;
        let k = k
            .reshape((t, kvh, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let k = rope(&k, &cos, &sin)?.squeeze(0)?;
        let v = v.reshape((t, kvh, hd))?.transpose(0, 1)?.contiguous()?;
        let (k, v) = match cache {
            Some((cache, layer)) => {
                let (k, v) = if layer < cache.k.len() {
                    (
                        Tensor::cat(&[&cache.k[layer], &k], 1)?,
                        Tensor::cat(&[&cache.v[layer], &v], 1)?,
                    )
                } else {
                    (k, v)
                };
                if layer < cache.k.len() {
                    cache.k[layer] = k.clone();
                    cache.v[layer] = v.clone();
                } else {
                    cache.k.push(k.clone());
                    cache.v.push(v.clone());
                }
                (k, v)
            }
            None => (k, v),
        };
        let s = q.matmul(&k.t()?)?;
        let s = match mask {
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        let p = softmax_last_dim(&s)?;
        let o = p.matmul(&v)?;
        let o = o
            .reshape((h, t, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, h * hd))?;
        let tape = keep.then_some(RowTape { q, k, v, p, qk_pre });
        Ok((o, tape))
    }

    /// Backward of one row's attention: (dq, dk, dv) before RoPE, shaped like the inputs.
    fn attn_row_backward(&self, d_o: &Tensor, rt: &RowTape, pos0: usize) -> Result<[Tensor; 3]> {
        let HeadLayout {
            t,
            hd,
            h,
            kvh,
            g,
            scale,
        } = self.heads(d_o)?;
        let cos = self.cos.narrow(0, pos0, t)?;
        let sin_neg = self.sin_neg.narrow(0, pos0, t)?;
        let d_o = heads_first(d_o, t, h, hd)?.reshape((kvh, g * t, hd))?;
        let dp = d_o.matmul(&rt.v.t()?)?;
        let dv = rt.p.t()?.matmul(&d_o)?;
        let rowdot = (&dp * &rt.p)?.sum_keepdim(D::Minus1)?;
        let ds = (&rt.p * dp.broadcast_sub(&rowdot)?)?;
        let dq = ds
            .matmul(&rt.k)?
            .affine(scale, 0.0)?
            .reshape((1, h, t, hd))?;
        let dq = rope(&dq, &cos, &sin_neg)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((t, h * hd))?;
        let dk = ds.t()?.matmul(&rt.q)?.unsqueeze(0)?;
        let dk = rope(&dk, &cos, &sin_neg)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((t, kvh * hd))?;
        let dv = dv.transpose(0, 1)?.reshape((t, kvh * hd))?;
        Ok([dq, dk, dv])
    }

    /// The transformer body over a packed batch; returns the last hidden state `[N, hidden]`.
    fn body(
        &self,
        b: &PackedBatch,
        adapters: &Adapters,
        mut tape: Option<&mut Vec<LayerTape>>,
        mut caches: Option<&mut [&mut KvCache]>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = b.num_tokens();
        let (dq, dkv, di) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let segs = &b.segments;
        let ids = Tensor::from_slice(&b.tokens, n, &self.device)?;
        let mut x = self.weights.embed.index_select(&ids, 0)?;
        let past: Vec<usize> = b.rows.iter().map(|r| r.pos0).collect();
        let masks = b
            .rows
            .iter()
            .map(|r| self.causal_mask(r.len, r.pos0, r.pos0 + r.len))
            .collect::<Result<Vec<_>>>()?;
        for (l, lw) in self.weights.layers.iter().enumerate() {
            let keep = tape.is_some();
            let mut xa = Vec::new();
            let mut save = keep.then_some(&mut xa);
            let h = self.rms(&x, &lw.attn_norm)?;
            let qkv = h.matmul(&lw.wqkv.t()?)?;
            let qkv = match &lw.bqkv {
                Some(bias) => qkv.broadcast_add(bias)?,
                None => qkv,
            };
            let mut parts = [
                qkv.narrow(1, 0, dq)?,
                qkv.narrow(1, dq, dkv)?,
                qkv.narrow(1, dq + dkv, dkv)?,
            ];
            for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
                let base = parts[i].clone();
                parts[i] = self.with_lora(
                    base,
                    &h,
                    segs,
                    adapters,
                    Site::Layer(l, t),
                    save.as_deref_mut(),
                )?;
            }
            let [q, k, v] = parts;
            let mut outs = Vec::with_capacity(b.rows.len());
            let mut row_tapes = Vec::new();
            for (ri, r) in b.rows.iter().enumerate() {
                let qr = q.narrow(0, r.start, r.len)?.contiguous()?;
                let kr = k.narrow(0, r.start, r.len)?.contiguous()?;
                let vr = v.narrow(0, r.start, r.len)?.contiguous()?;
                let cache = caches.as_deref_mut().map(|cs| (&mut *cs[ri], l));
                let (o, rt) =
                    self.attn_row(lw, &qr, &kr, &vr, past[ri], masks[ri].as_ref(), cache, keep)?;
                outs.push(o);
                row_tapes.extend(rt);
            }
            let o = cat_rows(outs)?;
            let ao = o.matmul(&lw.wo.t()?)?;
            let ao = self.with_lora(
                ao,
                &o,
                segs,
                adapters,
                Site::Layer(l, Target::O),
                save.as_deref_mut(),
            )?;
            let x_mid = (&x + ao)?;
            let h2 = self.rms(&x_mid, &lw.mlp_norm)?;
            let gu = h2.matmul(&lw.wgate_up.t()?)?;
            let g = gu.narrow(1, 0, di)?;
            let u = gu.narrow(1, di, di)?;
            let g = self.with_lora(
                g,
                &h2,
                segs,
                adapters,
                Site::Layer(l, Target::Gate),
                save.as_deref_mut(),
            )?;
            let u = self.with_lora(
                u,
                &h2,
                segs,
                adapters,
                Site::Layer(l, Target::Up),
                save.as_deref_mut(),
            )?;
            let a = (g.silu()? * &u)?;
            let m = a.matmul(&lw.wdown.t()?)?;
            let m = self.with_lora(
                m,
                &a,
                segs,
                adapters,
                Site::Layer(l, Target::Down),
                save.as_deref_mut(),
            )?;
            let x_out = (&x_mid + m)?;
            if let Some(tape) = tape.as_deref_mut() {
                tape.push(LayerTape {
                    x_in: x,
                    h,
                    rows: row_tapes,
                    o,
                    x_mid,
                    h2,
                    g,
                    u,
                    a,
                    xa,
                });
            }
            x = x_out;
        }
        if let Some(cs) = caches {
            for (cache, r) in cs.iter_mut().zip(&b.rows) {
                cache.len = r.pos0 + r.len;
            }
        }
        Ok(x)
    }

    /// Logits `[len, vocab]` (f32) of hidden states `xf` (already normed) for one segment's
    /// slice, with that segment's LM-head LoRA, and the LoRA `x Aᵀ` when kept.
    fn lm_logits(
        &self,
        xf: &Tensor,
        lora: Option<(&LoraPair, f64)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut logits = self.linear(xf, &self.weights.lm_head)?;
        let mut xa = None;
        if let Some((p, scale)) = lora {
            let a = xf.matmul(&p.a.to_dtype(xf.dtype())?.t()?)?;
            logits = (logits
                + a.matmul(&p.b.to_dtype(xf.dtype())?.t()?)?
                    .affine(scale, 0.0)?)?;
            xa = Some(a);
        }
        Ok((logits.to_dtype(self.lm_dtype())?, xa))
    }

    fn check_adapters(
        &self,
        adapters: &Adapters,
        used: impl Iterator<Item = Option<usize>>,
    ) -> Result<()> {
        for a in used.flatten() {
            let Some(w) = adapters.get(a) else {
                return Err(Error::invalid(
                    "adapter",
                    format!("adapter index {a} out of range"),
                ));
            };
            for (site, p) in &w.pairs {
                let (inp, out) = site.dims(&self.config);
                if p.a.dims() != [w.config.rank, inp] || p.b.dims() != [out, w.config.rank] {
                    return Err(Error::invalid(
                        "adapter",
                        format!(
                            "LoRA {site:?} shapes {:?}/{:?} do not fit this model",
                            p.a.dims(),
                            p.b.dims()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Forward pass for training or scoring: the log-probability of every target of every row
    /// (per input row, `[len · k]` row-major). With `keep`, also the tape for [`Self::backward`].
    /// The rows were checked when the batch was made ([`Self::train_batch`]).
    pub fn forward_train(
        &self,
        batch: &TrainBatch,
        adapters: &Adapters,
        keep: bool,
    ) -> Result<(Vec<Vec<f32>>, Option<Tape>)> {
        let (lp, tape) = self.forward_train_f64(batch, adapters, keep)?;
        Ok((
            lp.into_iter()
                .map(|r| r.into_iter().map(|x| x as f32).collect())
                .collect(),
            tape,
        ))
    }

    /// [`Self::forward_train`] with logprobs in f64 (exact for an f64 model, as gradient
    /// checks need).
    pub fn forward_train_f64(
        &self,
        batch: &TrainBatch,
        adapters: &Adapters,
        keep: bool,
    ) -> Result<(Vec<Vec<f64>>, Option<Tape>)> {
        batch.runs_on(&self.config)?;
        let rows = batch.rows();
        self.check_adapters(adapters, rows.iter().map(|r| r.adapter))?;
        let Some(parts) = self.split_rows(rows) else {
            let (lp, tape) = self.forward_packed(rows, adapters, keep)?;
            let inner = tape.map(TapeKind::Packed);
            return Ok((lp, inner.map(|inner| Tape { inner })));
        };
        let done: Vec<Result<(Vec<Vec<f64>>, Option<PackedTape>)>> = parts
            .par_iter()
            .map(|idx| {
                let sub: Vec<TrainRow> = idx.iter().map(|&i| rows[i]).collect();
                self.forward_packed(&sub, adapters, keep)
            })
            .collect();
        let mut out = vec![Vec::new(); rows.len()];
        let mut tapes = Vec::with_capacity(parts.len());
        for (idx, r) in parts.into_iter().zip(done) {
            let (lp, tape) = r?;
            for (&i, lp) in idx.iter().zip(lp) {
                out[i] = lp;
            }
            tapes.extend(tape.map(|t| (idx, t)));
        }
        let tape = keep.then(|| Tape {
            inner: TapeKind::Split {
                seeds: rows.iter().map(|r| r.tokens.len() * r.k).collect(),
                parts: tapes,
            },
        });
        Ok((out, tape))
    }

    /// On the host, a batch of several rows runs as one part per pool thread, side by side,
    /// each part's matrix products on its own thread (the pool steals across when one part
    /// ends first): about 15-20% faster on 2 cores than every product split across both,
    /// which waits on the slower half at each of a pass's hundreds of products. Parts are
    /// balanced by tokens. None: one packed pass.
    fn split_rows(&self, rows: &[TrainRow]) -> Option<Vec<Vec<usize>>> {
        let threads = rayon::current_num_threads();
        let tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
        if !self.host_kernels() || threads < 2 || rows.len() < 2 || tokens < SPLIT_MIN_TOKENS {
            return None;
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].tokens.len()));
        let mut parts: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); threads.min(rows.len())];
        for i in order {
            if let Some(p) = parts.iter_mut().min_by_key(|p| p.0) {
                p.0 += rows[i].tokens.len();
                p.1.push(i);
            }
        }
        Some(
            parts
                .into_iter()
                .map(|(_, mut idx)| {
                    idx.sort_unstable();
                    idx
                })
                .collect(),
        )
    }

    /// One packed pass over `rows` (already checked).
    fn forward_packed(
        &self,
        rows: &[TrainRow],
        adapters: &Adapters,
        keep: bool,
    ) -> Result<(Vec<Vec<f64>>, Option<PackedTape>)> {
        let spec: Vec<(&[u32], Option<usize>, usize)> =
            rows.iter().map(|r| (r.tokens, r.adapter, 0)).collect();
        let batch = PackedBatch::new(&spec);
        let kmax = rows.iter().map(|r| r.k).max().unwrap_or(1);
        // Targets packed as [N, kmax], padded with id 0 (their gradient is always zero).
        let mut tgt = vec![0u32; batch.num_tokens() * kmax];
        for (pr, &i) in batch.rows.iter().zip(&batch.order) {
            let r = &rows[i];
            for t in 0..r.tokens.len() {
                let dst = (pr.start + t) * kmax;
                tgt[dst..dst + r.k].copy_from_slice(&r.targets[t * r.k..(t + 1) * r.k]);
            }
        }
        let keep_probs =
            keep && batch.num_tokens() * self.config.vocab_size * 4 <= self.probs_budget;
        let ks: Vec<usize> = rows.iter().map(|r| r.k).collect();
        let (lp, inner) = if self.host_kernels() {
            // On a pool thread, as the inference step (see `forward_infer_top`).
            let (lp, tape) = rayon::scope(|_| {
                self.forward_train_host(&batch, &tgt, kmax, adapters, keep, keep_probs)
            })?;
            let lp: Vec<Vec<f64>> = lp
                .chunks(kmax)
                .map(|r| r.iter().map(|&v| v as f64).collect())
                .collect();
            (lp, tape.map(PassTape::Host))
        } else {
            let (lp, tape) = self.forward_candle(&batch, tgt, kmax, adapters, keep, keep_probs)?;
            (lp, tape.map(PassTape::Candle))
        };
        let mut out = vec![Vec::new(); rows.len()];
        for (pr, &i) in batch.rows.iter().zip(&batch.order) {
            let k = rows[i].k;
            out[i] = lp[pr.start..pr.start + pr.len]
                .iter()
                .flat_map(|row| row[..k].iter().copied())
                .collect();
        }
        let tape = inner.map(|pass| PackedTape {
            ks,
            batch,
            kmax,
            pass,
        });
        Ok((out, tape))
    }

    /// The candle forward pass: per packed token, the log-probability of each of its
    /// `kmax` targets, and the tape with `keep`.
    fn forward_candle(
        &self,
        batch: &PackedBatch,
        tgt: Vec<u32>,
        kmax: usize,
        adapters: &Adapters,
        keep: bool,
        keep_probs: bool,
    ) -> Result<(Vec<Vec<f64>>, Option<CandleTape>)> {
        let targets = Tensor::from_vec(tgt, (batch.num_tokens(), kmax), &self.device)?;
        let mut layers = Vec::new();
        let x_last = self.body(batch, adapters, keep.then_some(&mut layers), None)?;
        let xf = self.rms(&x_last, &self.weights.final_norm)?;
        let mut lp_parts = Vec::new();
        let mut lm = Vec::new();
        for s in &batch.segments {
            let lora = pair(adapters, s, Site::LmHead);
            let mut off = 0;
            while off < s.len {
                let len = LM_CHUNK.min(s.len - off);
                let start = s.start + off;
                let (logits, xa) = self.lm_logits(&xf.narrow(0, start, len)?, lora)?;
                let lse = logsumexp(&logits)?;
                let tg = targets.narrow(0, start, len)?.contiguous()?;
                lp_parts.push(logits.gather(&tg, 1)?.broadcast_sub(&lse)?);
                if keep {
                    let probs = keep_probs
                        .then(|| logits.broadcast_sub(&lse)?.exp())
                        .transpose()?;
                    lm.push(LmChunk {
                        start,
                        len,
                        adapter: s.adapter,
                        probs,
                        xa,
                    });
                }
                off += len;
            }
        }
        let lp = Tensor::cat(&lp_parts, 0)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        let tape = keep.then(|| CandleTape {
            layers,
            x_last,
            xf,
            targets,
            lm,
        });
        Ok((lp, tape))
    }

    /// Backward pass seeded with d loss / d logprob for every target (shaped like the
    /// output of [`Self::forward_train`]). Returns gradients per adapter index.
    pub fn backward(
        &self,
        tape: Tape,
        dlp: &[Vec<f32>],
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>> {
        let (seeds, parts) = match tape.inner {
            TapeKind::Packed(p) => return self.backward_packed(p, dlp, adapters),
            TapeKind::Split { seeds, parts } => (seeds, parts),
        };
        if dlp.len() != seeds.len() {
            return Err(Error::invalid(
                "gradient",
                format!("{} rows for {} data", dlp.len(), seeds.len()),
            ));
        }
        for (i, (d, &n)) in dlp.iter().zip(&seeds).enumerate() {
            check_seeds(i, d, n)?;
        }
        let done: Vec<Result<Vec<LoraGrads>>> = parts
            .into_par_iter()
            .map(|(idx, p)| {
                let sub: Vec<Vec<f32>> = idx.iter().map(|&i| dlp[i].clone()).collect();
                self.backward_packed(p, &sub, adapters)
            })
            .collect();
        let mut grads = vec![LoraGrads::default(); adapters.len()];
        for part in done {
            for (acc, g) in grads.iter_mut().zip(part?) {
                acc.merge(g)?;
            }
        }
        Ok(grads)
    }

    /// Backward of one packed pass.
    fn backward_packed(
        &self,
        tape: PackedTape,
        dlp: &[Vec<f32>],
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>> {
        let PackedTape {
            batch,
            kmax,
            ks,
            pass,
        } = tape;
        if dlp.len() != ks.len() {
            return Err(Error::invalid(
                "gradient",
                format!("{} rows for {} data", dlp.len(), ks.len()),
            ));
        }
        let mut g = vec![0f32; batch.num_tokens() * kmax];
        for (pr, &i) in batch.rows.iter().zip(&batch.order) {
            let k = ks[i];
            check_seeds(i, &dlp[i], pr.len * k)?;
            for t in 0..pr.len {
                let dst = (pr.start + t) * kmax;
                g[dst..dst + k].copy_from_slice(&dlp[i][t * k..(t + 1) * k]);
            }
        }
        match pass {
            PassTape::Host(t) => rayon::scope(|_| self.backward_host(t, &batch, &g, adapters)),
            PassTape::Candle(t) => self.backward_candle(t, &batch, g, kmax, adapters),
        }
    }

    /// Backward of [`Self::forward_candle`], seeded with `g` (`[N, kmax]`).
    fn backward_candle(
        &self,
        tape: CandleTape,
        batch: &PackedBatch,
        g: Vec<f32>,
        kmax: usize,
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>> {
        let CandleTape {
            layers,
            x_last,
            xf,
            targets,
            lm,
        } = tape;
        let g = Tensor::from_vec(g, (batch.num_tokens(), kmax), &self.device)?
            .to_dtype(self.lm_dtype())?;
        let mut grads = vec![LoraGrads::default(); adapters.len()];
        let segs = &batch.segments;

        // LM head and final norm.
        let mut dxf_parts = Vec::with_capacity(lm.len());
        for ch in &lm {
            let seg = Segment {
                start: ch.start,
                len: ch.len,
                adapter: ch.adapter,
            };
            let lora = pair(adapters, &seg, Site::LmHead);
            let xf_c = xf.narrow(0, ch.start, ch.len)?;
            let (probs, xa) = match &ch.probs {
                Some(p) => (p.clone(), ch.xa.clone()),
                None => {
                    let (logits, xa) = self.lm_logits(&xf_c, lora)?;
                    let lse = logsumexp(&logits)?;
                    (logits.broadcast_sub(&lse)?.exp()?, xa)
                }
            };
            let gc = g.narrow(0, ch.start, ch.len)?.contiguous()?;
            let tg = targets.narrow(0, ch.start, ch.len)?.contiguous()?;
            let gsum = gc.sum_keepdim(1)?;
            let dlogits = probs
                .broadcast_mul(&gsum.neg()?)?
                .scatter_add(&tg, &gc, 1)?;
            let dlogits = dlogits.to_dtype(self.dtype)?;
            let mut dx = dlogits.matmul(&self.weights.lm_head)?;
            if let (Some((p, scale)), Some(xa), Some(ai)) = (lora, xa, ch.adapter) {
                let db = dlogits.t()?.matmul(&xa)?.affine(scale, 0.0)?;
                let dxa = dlogits
                    .matmul(&p.b.to_dtype(self.dtype)?)?
                    .affine(scale, 0.0)?;
                let da = dxa.t()?.matmul(&xf_c)?;
                dx = (dx + dxa.matmul(&p.a.to_dtype(self.dtype)?)?)?;
                grads[ai].add(
                    Site::LmHead,
                    da.to_dtype(DType::F32)?,
                    db.to_dtype(DType::F32)?,
                )?;
            }
            dxf_parts.push(dx);
        }
        let dxf = Tensor::cat(&dxf_parts, 0)?;
        let mut dx = self.rms_backward(&x_last, &self.weights.final_norm, &dxf)?;

        let c = &self.config;
        for (l, (lw, t)) in self.weights.layers.iter().zip(&layers).enumerate().rev() {
            let xa_of = |target: Target| {
                t.xa.iter()
                    .find(|(tt, _)| *tt == target)
                    .map(|(_, v)| v.as_slice())
            };
            let lora_bwd = |x: &Tensor,
                            dy: &Tensor,
                            target: Target,
                            grads: &mut [LoraGrads]|
             -> Result<Option<Tensor>> {
                match xa_of(target) {
                    Some(xas) => self.lora_backward(
                        x,
                        dy,
                        segs,
                        adapters,
                        Site::Layer(l, target),
                        xas,
                        grads,
                    ),
                    None => Ok(None),
                }
            };
            // MLP
            let mut da = dx.matmul(&lw.wdown)?;
            if let Some(e) = lora_bwd(&t.a, &dx, Target::Down, &mut grads)? {
                da = (da + e)?;
            }
            let sg = candle_nn::ops::sigmoid(&t.g)?;
            let silu = (&t.g * &sg)?;
            let dsilu = (&sg * ((&t.g * (1.0 - &sg)?)? + 1.0)?)?;
            let dg = (&da * &t.u)?.mul(&dsilu)?;
            let du = (&da * silu)?;
            let mut dh2 = Tensor::cat(&[&dg, &du], 1)?.matmul(&lw.wgate_up)?;
            if let Some(e) = lora_bwd(&t.h2, &dg, Target::Gate, &mut grads)? {
                dh2 = (dh2 + e)?;
            }
            if let Some(e) = lora_bwd(&t.h2, &du, Target::Up, &mut grads)? {
                dh2 = (dh2 + e)?;
            }
            let dx_mid = (&dx + self.rms_backward(&t.x_mid, &lw.mlp_norm, &dh2)?)?;
            // Attention
            let mut d_o = dx_mid.matmul(&lw.wo)?;
            if let Some(e) = lora_bwd(&t.o, &dx_mid, Target::O, &mut grads)? {
                d_o = (d_o + e)?;
            }
            let mut dqs = Vec::with_capacity(batch.rows.len());
            let mut dks = Vec::with_capacity(batch.rows.len());
            let mut dvs = Vec::with_capacity(batch.rows.len());
            for (r, rt) in batch.rows.iter().zip(&t.rows) {
                let [dq, dk, dv] =
                    self.attn_row_backward(&d_o.narrow(0, r.start, r.len)?, rt, r.pos0)?;
                let (dq, dk) = match (&rt.qk_pre, &lw.q_norm, &lw.k_norm) {
                    (Some((qp, kp)), Some(qn), Some(kn)) => {
                        let (t, hd) = (r.len, c.head_dim);
                        let dq = self.rms_backward(qp, qn, &dq.reshape((t * c.num_heads, hd))?)?;
                        let dk =
                            self.rms_backward(kp, kn, &dk.reshape((t * c.num_kv_heads, hd))?)?;
                        (dq.reshape((t, c.q_dim()))?, dk.reshape((t, c.kv_dim()))?)
                    }
                    _ => (dq, dk),
                };
                dqs.push(dq);
                dks.push(dk);
                dvs.push(dv);
            }
            let dq = Tensor::cat(&dqs, 0)?;
            let dk = Tensor::cat(&dks, 0)?;
            let dv = Tensor::cat(&dvs, 0)?;
            let mut dh = Tensor::cat(&[&dq, &dk, &dv], 1)?.matmul(&lw.wqkv)?;
            for (target, dy) in [(Target::Q, &dq), (Target::K, &dk), (Target::V, &dv)] {
                if let Some(e) = lora_bwd(&t.h, dy, target, &mut grads)? {
                    dh = (dh + e)?;
                }
            }
            dx = (dx_mid + self.rms_backward(&t.x_in, &lw.attn_norm, &dh)?)?;
        }
        Ok(grads)
    }

    /// Prefill or decode: run each row's new tokens through the model, appending to its
    /// cache. Returns the last position's logits per row `[rows, vocab]` (f32, input order)
    /// and, with `prompt_logprobs`, per row the log-probability of each new token after the
    /// first given the tokens before it.
    pub fn forward_infer(
        &self,
        rows: &[InferRow],
        caches: &mut [&mut KvCache],
        adapters: &Adapters,
        prompt_logprobs: bool,
    ) -> Result<(Tensor, Option<Vec<Vec<f32>>>)> {
        let (logits, plp, _) =
            self.forward_infer_top(rows, caches, adapters, prompt_logprobs, 0)?;
        Ok((logits, plp))
    }

    /// [`Self::forward_infer`], plus with `prompt_top_k > 0` (and `prompt_logprobs`), per
    /// row and per new token after the first, the `prompt_top_k` most likely tokens at that
    /// position with their log-probabilities, best first.
    pub fn forward_infer_top(
        &self,
        rows: &[InferRow],
        caches: &mut [&mut KvCache],
        adapters: &Adapters,
        prompt_logprobs: bool,
        prompt_top_k: usize,
    ) -> Result<InferOut> {
        if self.host_kernels() {
            // The whole step on a pool thread: the kernels' parallel loops then start on a
            // worker whose sibling is still spinning, instead of waking the pool and
            // parking the caller a hundred times a step.
            return rayon::scope(|_| {
                self.infer_step(rows, caches, adapters, prompt_logprobs, prompt_top_k, None)
            });
        }
        self.infer_step(rows, caches, adapters, prompt_logprobs, prompt_top_k, None)
    }

    /// Prefill or decode like [`Self::forward_infer`], handing `visit` the logits of row
    /// `i`'s new tokens from index `from[i]` up to (not including) its last one, whose
    /// logits are the step's output. Only those positions go through the LM head, so a
    /// request scoring a suffix of a long prompt pays for the suffix alone. Returns the last
    /// position's logits per row `[rows, vocab]` (f32, input order).
    pub fn forward_infer_scored(
        &self,
        rows: &[InferRow],
        caches: &mut [&mut KvCache],
        adapters: &Adapters,
        from: &[Option<usize>],
        visit: LogitsVisitor,
    ) -> Result<Tensor> {
        if from.len() != rows.len() {
            return Err(Error::invalid("from", "one entry per row"));
        }
        let score = Some((from, visit));
        if self.host_kernels() {
            // On a pool thread, as in `forward_infer_top`.
            return rayon::scope(|_| {
                Ok(self.infer_step(rows, caches, adapters, false, 0, score)?.0)
            });
        }
        Ok(self.infer_step(rows, caches, adapters, false, 0, score)?.0)
    }

    fn infer_step(
        &self,
        rows: &[InferRow],
        caches: &mut [&mut KvCache],
        adapters: &Adapters,
        prompt_logprobs: bool,
        prompt_top_k: usize,
        mut score: Option<(&[Option<usize>], LogitsVisitor)>,
    ) -> Result<InferOut> {
        if rows.len() != caches.len() || rows.is_empty() {
            return Err(Error::invalid(
                "rows",
                "one cache per row, at least one row",
            ));
        }
        for (i, (r, c)) in rows.iter().zip(caches.iter()).enumerate() {
            self.check_tokens(&format!("rows[{i}].tokens"), r.tokens, c.len)?;
        }
        self.check_adapters(adapters, rows.iter().map(|r| r.adapter))?;
        let spec: Vec<(&[u32], Option<usize>, usize)> = rows
            .iter()
            .zip(caches.iter())
            .map(|(r, c)| (r.tokens, r.adapter, c.len))
            .collect();
        let batch = PackedBatch::new(&spec);
        // Caches in packed order, as body indexes them.
        let mut slots: Vec<Option<&mut KvCache>> =
            caches.iter_mut().map(|c| Some(&mut **c)).collect();
        let mut packed: Vec<&mut KvCache> = batch
            .order
            .iter()
            .map(|&i| {
                slots[i]
                    .take()
                    .ok_or_else(|| Error::invalid("rows", "duplicate row"))
            })
            .collect::<Result<_>>()?;
        let x = if self.host_kernels() {
            self.body_host(&batch, adapters, &mut packed)?
        } else {
            self.body(&batch, adapters, None, Some(&mut packed))?
        };
        let xf = self.rms(&x, &self.weights.final_norm)?;
        let mut last = vec![None; rows.len()];
        let mut plp = prompt_logprobs.then(|| vec![Vec::new(); rows.len()]);
        let mut ptop = (prompt_logprobs && prompt_top_k > 0).then(|| vec![Vec::new(); rows.len()]);
        // Every row's last position through the base LM head in one matmul: in a decode
        // step of many sequences the LM head is read once instead of once per row.
        let last_pos: Vec<u32> = batch
            .rows
            .iter()
            .map(|pr| (pr.start + pr.len - 1) as u32)
            .collect();
        let last_pos = Tensor::from_vec(last_pos, batch.rows.len(), &self.device)?;
        let (base_last, _) = self.lm_logits(&xf.index_select(&last_pos, 0)?, None)?;
        for (j, (pr, &i)) in batch.rows.iter().zip(&batch.order).enumerate() {
            let seg = Segment {
                start: pr.start,
                len: pr.len,
                adapter: pr.adapter,
            };
            let lora = pair(adapters, &seg, Site::LmHead);
            let logits = match lora {
                None => base_last.narrow(0, j, 1)?,
                Some(_) => {
                    self.lm_logits(&xf.narrow(0, pr.start + pr.len - 1, 1)?, lora)?
                        .0
                }
            };
            last[i] = Some(logits);
            if let Some(plp) = plp.as_mut() {
                let toks = rows[i].tokens;
                let mut out = Vec::with_capacity(toks.len().saturating_sub(1));
                let mut off = 0;
                while off + 1 < pr.len {
                    let len = LM_CHUNK.min(pr.len - 1 - off);
                    let (logits, _) = self.lm_logits(&xf.narrow(0, pr.start + off, len)?, lora)?;
                    let lse = logsumexp(&logits)?;
                    if let Some(ptop) = ptop.as_mut() {
                        let lv = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                        let lsev = lse.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        for (row, z) in lv.iter().zip(lsev) {
                            ptop[i].push(top_k_of(row, prompt_top_k, z));
                        }
                    }
                    let tg =
                        Tensor::from_slice(&toks[off + 1..off + 1 + len], (len, 1), &self.device)?;
                    out.extend(
                        logits
                            .gather(&tg, 1)?
                            .broadcast_sub(&lse)?
                            .flatten_all()?
                            .to_dtype(DType::F32)?
                            .to_vec1::<f32>()?,
                    );
                    off += len;
                }
                plp[i] = out;
            }
            if let Some((from, visit)) = score.as_mut() {
                let mut off = from[i].unwrap_or(pr.len);
                while off + 1 < pr.len {
                    let len = LM_CHUNK.min(pr.len - 1 - off);
                    let (logits, _) = self.lm_logits(&xf.narrow(0, pr.start + off, len)?, lora)?;
                    let v = logits
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    visit(i, off, &v)?;
                    off += len;
                }
            }
        }
        let last: Vec<Tensor> = last.into_iter().flatten().collect();
        Ok((Tensor::cat(&last, 0)?.to_dtype(DType::F32)?, plp, ptop))
    }
}

/// Last-position logits `[rows, vocab]`, and optionally prompt logprobs and prompt top-k
/// (see [`BaseModel::forward_infer_top`]).
pub type InferOut = (
    Tensor,
    Option<Vec<Vec<f32>>>,
    Option<Vec<Vec<Vec<(u32, f32)>>>>,
);

/// Head geometry of a `[t, heads · head_dim]` row and the attention scale.
struct HeadLayout {
    t: usize,
    hd: usize,
    h: usize,
    kvh: usize,
    g: usize,
    scale: f64,
}

impl BaseModel {
    fn heads(&self, x: &Tensor) -> Result<HeadLayout> {
        let c = &self.config;
        Ok(HeadLayout {
            t: x.dim(0)?,
            hd: c.head_dim,
            h: c.num_heads,
            kvh: c.num_kv_heads,
            g: c.group_size(),
            scale: 1.0 / (c.head_dim as f64).sqrt(),
        })
    }
}

/// `[t, h · hd]` → `[h, t, hd]`, contiguous.
fn heads_first(x: &Tensor, t: usize, h: usize, hd: usize) -> Result<Tensor> {
    Ok(x.reshape((t, h, hd))?.transpose(0, 1)?.contiguous()?)
}

/// The `k` largest entries of a logits row as (id, logit − `lse`), best first.
pub fn top_k_of(row: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.into_iter().map(|i| (i as u32, row[i] - lse)).collect()
}

/// Row `i`'s seeds: `n` finite values.
fn check_seeds(i: usize, d: &[f32], n: usize) -> Result<()> {
    if d.len() != n {
        return Err(Error::invalid(
            format!("gradient[{i}]"),
            format!("has {} entries, expected {n}", d.len()),
        ));
    }
    if d.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            format!("gradient[{i}]"),
            "contains NaN or infinity",
        ));
    }
    Ok(())
}

/// Concatenate along rows, without a copy when there is one part.
fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(if parts.len() == 1 {
        parts.swap_remove(0)
    } else {
        Tensor::cat(&parts, 0)?
    })
}

/// Row-wise log-sum-exp of `[n, v]`, shape `[n, 1]`.
pub fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?)
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Tape>();
    f::<KvCache>();
    let _ = Device::Cpu;
}
