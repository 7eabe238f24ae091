//! The cpu backend: the decoder layer and passes over plain f32 buffers, the one
//! implementation of the layer's math on the host. [`BaseModel::layer_fwd`] serves the
//! training forward (keeping a tape for [`BaseModel::backward_host`]) and prefill/decode
//! (appending keys and values to KV caches, [`BaseModel::body_host`]); the family's
//! optional pieces (q/k/v biases, per-head q/k RMSNorm) live there and in `layer_bwd`.
//!
//! On a CPU the candle pass spends about half its time outside the matrix products: every
//! op allocates its output (page faults), elementwise ops run on one thread, and each row's
//! attention is a chain of small ops that leaves the second core idle. Here every matrix
//! product is one call of the `gemm` crate (the kernel candle itself uses) reading its
//! operands in place with strides, or, for few rows, the streaming kernel of [`kernels`];
//! transposes, column blocks of fused weights and accumulation into a residual cost
//! nothing; norms, SiLU and RoPE run over rows in parallel; attention runs as one task per
//! (row, key/value head), so a batch of many adapters' rows keeps both cores busy.
//!
//! Chosen for a CPU model in f32 ([`super::choose`]); the candle backend
//! ([`super::candle`]) serves f64 (the finite-difference checks) and GPUs, and is the
//! reference this one is tested against (`tests/host_train.rs`, `tests/multi_adapter.rs`).

pub(crate) mod kernels;
pub mod quant;

use super::{own_tape, Backend, Cpu, PassTape, TrainOut};
use crate::error::Result;
use crate::lora::{LoraGrads, Site, Target};
use crate::model::batch::{PackedBatch, Segment};
use crate::model::front::{pair, Adapters, KvCache, LM_CHUNK};
use crate::model::{BaseModel, Weight};
use crate::view::HostView;
use candle_core::{DType, Tensor};
use gemm::Parallelism;
use kernels::{
    attend_head, matmul_nt, matmul_nt_acc, rope_in_place, AttnShape, PAR_MIN_WORK, SMALL_M,
};
use rayon::prelude::*;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn parallel_parts(&self) -> bool {
        true
    }

    fn train_forward(
        &self,
        m: &BaseModel,
        batch: &PackedBatch,
        targets: Vec<u32>,
        kmax: usize,
        adapters: &Adapters,
        keep: bool,
        keep_probs: bool,
    ) -> Result<TrainOut> {
        // On a pool thread, as the inference step (see `BaseModel::forward_infer_top`).
        let (lp, tape) = rayon::scope(|_| {
            m.forward_train_host(batch, &targets, kmax, adapters, keep, keep_probs)
        })?;
        let lp = lp
            .chunks(kmax)
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect();
        Ok((lp, tape.map(|t| Box::new(t) as PassTape)))
    }

    fn train_backward(
        &self,
        m: &BaseModel,
        tape: PassTape,
        batch: &PackedBatch,
        g: Vec<f32>,
        _kmax: usize,
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>> {
        let tape = own_tape::<HostTape>(tape, self.name())?;
        rayon::scope(|_| m.backward_host(*tape, batch, &g, adapters))
    }

    fn infer_hidden(
        &self,
        m: &BaseModel,
        batch: &PackedBatch,
        adapters: &Adapters,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let x = m.body_host(batch, adapters, caches)?;
        let w = HostView::new(&m.weights.final_norm)?;
        let (xf, _) = rms_fwd(&x, w.slice(), m.config.rms_norm_eps as f32);
        let hid = m.config.hidden_size;
        Ok(Tensor::from_vec(xf, (batch.num_tokens(), hid), &m.device)?)
    }

    /// The LM head of inference: packed weights read in place.
    fn linear(&self, x: &Tensor, w: &Weight) -> Result<Tensor> {
        let m = x.dim(0)?;
        let w = match w {
            Weight::Packed(p) => {
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                let out = p.nt(HostView::new(&x)?.slice(), m);
                return Ok(Tensor::from_vec(out, (m, p.rows()), x.device())?);
            }
            Weight::Dense(w) => w,
        };
        if m > SMALL_M || x.dtype() != DType::F32 {
            return Ok(x.matmul(&w.t()?)?);
        }
        let (n, k) = w.dims2()?;
        let x = x.contiguous()?;
        let out = matmul_nt(
            HostView::new(&x)?.slice(),
            m,
            k,
            HostView::new(w)?.slice(),
            n,
        );
        Ok(Tensor::from_vec(out, (m, n), x.device())?)
    }
}

/// Multiply-adds from which a matrix product is split across the thread pool.
const PAR_GEMM: usize = 1 << 18;
/// Elements from which a row-wise elementwise loop is split across the pool.
const PAR_ELEMS: usize = 1 << 14;

/// A matrix operand read in place: element `(i, j)` is `data[off + i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    off: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix whose rows are `ld` apart, starting at `off`.
    fn rows(data: &'a [f32], off: usize, ld: usize) -> Self {
        Mat {
            data,
            off,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of [`Mat::rows`]`(data, off, ld)`.
    fn t(data: &'a [f32], off: usize, ld: usize) -> Self {
        Mat {
            data,
            off,
            rs: 1,
            cs: ld,
        }
    }

    /// Panics unless every element of an `r x c` view lies inside `data`: the bounds the
    /// unsafe call below relies on (shapes come from the model config, never from users).
    fn check(&self, r: usize, c: usize) {
        if r > 0 && c > 0 {
            assert!(
                self.off + (r - 1) * self.rs + (c - 1) * self.cs < self.data.len(),
                "matrix view out of bounds"
            );
        }
    }
}

/// `dst[doff + i·ldd + j] (+)= alpha · Σₖ a(i, k) · b(k, j)` for `i < m`, `j < n`;
/// accumulates when `acc`, else overwrites. Split across the pool when `par` and the
/// product is big enough.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    doff: usize,
    ldd: usize,
    acc: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldd && doff + (m - 1) * ldd + n <= dst.len(),
        "gemm output out of bounds"
    );
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[doff + i * ldd..doff + i * ldd + n].fill(0.0);
            }
        }
        return;
    }
    a.check(m, k);
    b.check(k, n);
    // SAFETY: every element read or written lies inside its slice (checked above), and
    // `dst` is borrowed mutably for the call, so nothing else aliases it.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr().add(doff),
            ldd,
            acc,
            a,
            b,
            alpha,
            par,
        )
    }
}

/// [`gemm`] into a raw destination: `dst[i·ldd + j]` for `i < m`, `j < n`.
///
/// # Safety
/// Those elements of `dst` must be valid for reads and writes and touched by nothing else
/// during the call; `a` and `b` must hold their `m x k` and `k x n` views ([`Mat::check`]).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    acc: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
    par: bool,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if par && threads > 1 && m * n * k >= PAR_GEMM {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        acc,
        a.data.as_ptr().add(a.off),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr().add(b.off),
        b.cs as isize,
        b.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        parallelism,
    );
}

/// Run `f(row index, row)` over the `width`-wide rows of `out`, in parallel when big.
/// `x · Wᵀ` of a frozen base weight as a new `[n, W rows]` buffer, for `x: [n, W cols]`:
/// packed blocks read in place, a dense weight through the streaming kernel for few rows
/// (unless `gemm_only`) or the GEMM.
fn base_nt(w: &Weight, x: &[f32], n: usize, gemm_only: bool) -> Result<Vec<f32>> {
    let (width, k) = w.dims2()?;
    let t = match w {
        Weight::Packed(p) => return Ok(p.nt(x, n)),
        Weight::Dense(t) => t,
    };
    let wv = HostView::new(t)?;
    if n <= SMALL_M && !gemm_only {
        return Ok(matmul_nt(x, n, k, wv.slice(), width));
    }
    let mut out = vec![0f32; n * width];
    gemm(
        (n, width, k),
        &mut out,
        0,
        width,
        false,
        Mat::rows(x, 0, k),
        Mat::t(wv.slice(), 0, k),
        1.0,
        true,
    );
    Ok(out)
}

/// `dx += dy · W` of a frozen base weight (`dy: [n, W rows]`, `dx: [n, W cols]`): the input
/// gradient of [`base_nt`].
fn base_nn_acc(w: &Weight, dy: &[f32], n: usize, dx: &mut [f32]) -> Result<()> {
    let (width, k) = w.dims2()?;
    match w {
        Weight::Packed(p) => p.nn_acc(dy, n, dx),
        Weight::Dense(t) => {
            let wv = HostView::new(t)?;
            gemm(
                (n, k, width),
                dx,
                0,
                k,
                true,
                Mat::rows(dy, 0, width),
                Mat::rows(wv.slice(), 0, k),
                1.0,
                true,
            );
        }
    }
    Ok(())
}

fn for_rows<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.len() >= PAR_ELEMS {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// `1 / rms(v)` of one row.
fn rms_inv(v: &[f32], eps: f32) -> f32 {
    1.0 / (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32 + eps).sqrt()
}

/// RMS norm of each row of `x` times `w`: the normed rows and each row's `1 / rms`.
fn rms_fwd(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let rinv: Vec<f32> = x.chunks(d).map(|r| rms_inv(r, eps)).collect();
    let mut h = vec![0f32; x.len()];
    for_rows(&mut h, d, |i, hr| {
        for ((o, v), w) in hr.iter_mut().zip(&x[i * d..(i + 1) * d]).zip(w) {
            *o = v * rinv[i] * w;
        }
    });
    (h, rinv)
}

/// `acc += d/dx (x · w / rms(x))` given the output gradient `dy`.
fn rms_bwd_acc(x: &[f32], w: &[f32], rinv: &[f32], dy: &[f32], acc: &mut [f32]) {
    let d = w.len();
    for_rows(acc, d, |i, ar| {
        let (xr, dyr) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
        let r = rinv[i];
        let dot: f32 = xr.iter().zip(dyr).zip(w).map(|((x, g), w)| g * w * x).sum();
        let coef = r * r * r * dot / d as f32;
        for (((a, x), g), w) in ar.iter_mut().zip(xr).zip(dyr).zip(w) {
            *a += g * w * r - x * coef;
        }
    });
}

/// Activations kept from a host training pass for [`BaseModel::backward_host`].
pub(crate) struct HostTape {
    layers: Vec<LayerTape>,
    x_last: Vec<f32>,
    rinv_f: Vec<f32>,
    xf: Vec<f32>,
    lm: Vec<LmChunk>,
    targets: Vec<u32>,
    kmax: usize,
}

struct LayerTape {
    x_in: Vec<f32>,
    rinv1: Vec<f32>,
    h: Vec<f32>,
    /// `[q · scale | k | v]` per token, RoPE applied to q and k.
    qkv: Vec<f32>,
    /// With per-head q/k norms: `[q | k | v]` per token before them.
    qk_pre: Option<Vec<f32>>,
    /// Attention probabilities per (row, query head), `[t, t]` each.
    p: Vec<Vec<f32>>,
    o: Vec<f32>,
    x_mid: Vec<f32>,
    rinv2: Vec<f32>,
    h2: Vec<f32>,
    gu: Vec<f32>,
    a: Vec<f32>,
    xa: SavedXa,
}

/// LoRA `x Aᵀ` per target, per segment (None where a segment's adapter lacks the target).
type SavedXa = Vec<(Target, Vec<Option<Vec<f32>>>)>;

/// Tokens `start..start+len` through the LM head. Chunks span segments: the base LM head
/// runs once over all of a chunk's rows, each segment's LoRA over its own.
struct LmChunk {
    start: usize,
    len: usize,
    probs: Option<Vec<f32>>,
    loras: Vec<LmLora>,
}

/// An LM-head LoRA over rows `seg.start..` of a chunk, and its `x Aᵀ`.
struct LmLora {
    seg: Segment,
    xa: Vec<f32>,
}

/// One adapter segment's LoRA gradient for one site.
type SiteGrad = (usize, Vec<f32>, Vec<f32>);

/// Split `buf` (rows `width` wide) into each segment's rows.
fn segment_rows<'s, 'b>(
    buf: &'b mut [f32],
    width: usize,
    segs: &'s [Segment],
) -> Vec<(&'s Segment, &'b mut [f32])> {
    let mut out = Vec::with_capacity(segs.len());
    let mut rest = buf;
    for s in segs {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(s.len * width);
        out.push((s, mine));
        rest = tail;
    }
    out
}

impl BaseModel {
    /// The host forward pass over a packed batch. `targets`: `[N, kmax]`. Returns the log
    /// probability of every target (`[N, kmax]`, padding included) and, with `keep`, the
    /// tape. Runs on the calling thread's pool (callers wrap it in `rayon::scope`).
    pub(crate) fn forward_train_host(
        &self,
        b: &PackedBatch,
        targets: &[u32],
        kmax: usize,
        adapters: &Adapters,
        keep: bool,
        keep_probs: bool,
    ) -> Result<(Vec<f32>, Option<HostTape>)> {
        let c = &self.config;
        let n = b.num_tokens();
        let eps = c.rms_norm_eps as f32;
        let mut x = self.embed_rows(b)?;
        let mut layers = Vec::new();
        for l in 0..self.weights.layers.len() {
            let (x_out, tape) = self.layer_fwd(b, adapters, l, x, None, keep)?;
            x = x_out;
            layers.extend(tape);
        }
        let (xf, rinv_f) = rms_fwd(&x, HostView::new(&self.weights.final_norm)?.slice(), eps);
        let mut lp = vec![0f32; n * kmax];
        let mut lm = Vec::new();
        let vocab = c.vocab_size;
        // With the softmax kept for backward the whole batch is one chunk (the buffer is
        // kept anyway, and the LM head's weight is read and packed once for all adapters).
        let to_probs = keep && keep_probs;
        let chunk = if to_probs { n } else { LM_CHUNK };
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let (mut logits, loras) = self.lm_logits_host(&xf, start, len, b, adapters)?;
            let tg = &targets[start * kmax..(start + len) * kmax];
            let lpc = &mut lp[start * kmax..(start + len) * kmax];
            // Per row: the targets' log-probabilities, then (kept for backward) the row
            // turned into probabilities.
            let rows = logits.par_chunks_mut(vocab).zip(lpc.par_chunks_mut(kmax));
            rows.enumerate().for_each(|(i, (row, lpr))| {
                let tgr = &tg[i * kmax..(i + 1) * kmax];
                for (o, &t) in lpr.iter_mut().zip(tgr) {
                    *o = row[t as usize];
                }
                let lse = log_softmax_row(row, to_probs);
                lpr.iter_mut().for_each(|o| *o -= lse);
            });
            if keep {
                lm.push(LmChunk {
                    start,
                    len,
                    probs: keep_probs.then_some(logits),
                    loras,
                });
            }
            start += len;
        }
        let tape = keep.then(|| HostTape {
            layers,
            x_last: x,
            rinv_f,
            xf,
            lm,
            targets: targets.to_vec(),
            kmax,
        });
        Ok((lp, tape))
    }

    /// Logits `[len, vocab]` of normed hidden rows `start..start+len`, with the LM-head
    /// LoRA of each segment there that carries one, and those LoRAs' `x Aᵀ`.
    fn lm_logits_host(
        &self,
        xf: &[f32],
        start: usize,
        len: usize,
        b: &PackedBatch,
        adapters: &Adapters,
    ) -> Result<(Vec<f32>, Vec<LmLora>)> {
        let (hid, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let xs = &xf[start * hid..(start + len) * hid];
        let mut logits = base_nt(&self.weights.lm_head, xs, len, true)?;
        let mut loras = Vec::new();
        for s in &b.segments {
            let (lo, hi) = (s.start.max(start), (s.start + s.len).min(start + len));
            let Some((p, scale)) = pair(adapters, s, Site::LmHead).filter(|_| lo < hi) else {
                continue;
            };
            let (a, bm) = (HostView::new(&p.a)?, HostView::new(&p.b)?);
            let r = p.a.dim(0)?;
            let rows = hi - lo;
            let mut xa = vec![0f32; rows * r];
            gemm(
                (rows, r, hid),
                &mut xa,
                0,
                r,
                false,
                Mat::rows(xf, lo * hid, hid),
                Mat::t(a.slice(), 0, hid),
                1.0,
                true,
            );
            gemm(
                (rows, vocab, r),
                &mut logits,
                (lo - start) * vocab,
                vocab,
                true,
                Mat::rows(&xa, 0, r),
                Mat::t(bm.slice(), 0, r),
                scale as f32,
                true,
            );
            let seg = Segment {
                start: lo,
                len: rows,
                adapter: s.adapter,
            };
            loras.push(LmLora { seg, xa });
        }
        Ok((logits, loras))
    }

    /// Base projection `x Wᵀ` (plus `bias`) of `x: [N, in]` into a new `[N, W rows]`
    /// buffer, plus the LoRA update of each of `parts` (their outputs side by side in `W`'s
    /// rows). Returns the output and, with `save`, the LoRA `x Aᵀ` per part and segment.
    /// Few rows (a decode step) use the streaming [`matmul_nt`] kernel, which reads each
    /// weight row once; more use the `gemm` crate.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        x: &[f32],
        n: usize,
        w: &Weight,
        bias: Option<&Tensor>,
        parts: &[Target],
        layer: usize,
        segs: &[Segment],
        adapters: &Adapters,
        save: bool,
    ) -> Result<(Vec<f32>, SavedXa)> {
        let (width, k) = w.dims2()?;
        let small = n <= SMALL_M;
        let mut out = base_nt(w, x, n, false)?;
        if let Some(bias) = bias {
            let bv = HostView::new(bias)?;
            let bs = bv.slice();
            for_rows(&mut out, width, |_, r| {
                r.iter_mut().zip(bs).for_each(|(o, b)| *o += b);
            });
        }
        let carries = |s: &Segment| {
            parts
                .iter()
                .any(|&t| pair(adapters, s, Site::Layer(layer, t)).is_some())
        };
        let carrying: Vec<&Segment> = segs.iter().filter(|s| carries(s)).collect();
        if carrying.is_empty() {
            return Ok((out, Vec::new()));
        }
        // Multiply-adds of the LoRA updates: rank · (in + out) per token and part.
        let work: usize = carrying
            .iter()
            .flat_map(|s| {
                parts.iter().filter_map(move |&t| {
                    let (p, _) = pair(adapters, s, Site::Layer(layer, t))?;
                    Some(s.len * p.a.dims().first()? * (k + t.dims(&self.config).1))
                })
            })
            .sum();
        let par = carrying.len() > 1 && (!small || work >= PAR_MIN_WORK / 4);
        let one = |(s, rows): (&Segment, &mut [f32])| -> Result<Vec<Option<Vec<f32>>>> {
            let mut col0 = 0;
            let mut xas = Vec::with_capacity(parts.len());
            for &t in parts {
                let (_, dim) = t.dims(&self.config);
                let xa = match pair(adapters, s, Site::Layer(layer, t)) {
                    Some((p, scale)) => {
                        let r = p.a.dim(0)?;
                        let (a, bm) = (HostView::new(&p.a)?, HostView::new(&p.b)?);
                        let xs = &x[s.start * k..(s.start + s.len) * k];
                        let xa = if small {
                            let xa = matmul_nt(xs, s.len, k, a.slice(), r);
                            let sc = scale as f32;
                            matmul_nt_acc(&xa, s.len, r, bm.slice(), dim, sc, rows, width, col0);
                            xa
                        } else {
                            let mut xa = vec![0f32; s.len * r];
                            gemm(
                                (s.len, r, k),
                                &mut xa,
                                0,
                                r,
                                false,
                                Mat::rows(xs, 0, k),
                                Mat::t(a.slice(), 0, k),
                                1.0,
                                !par,
                            );
                            gemm(
                                (s.len, dim, r),
                                rows,
                                col0,
                                width,
                                true,
                                Mat::rows(&xa, 0, r),
                                Mat::t(bm.slice(), 0, r),
                                scale as f32,
                                !par,
                            );
                            xa
                        };
                        save.then_some(xa)
                    }
                    None => None,
                };
                xas.push(xa);
                col0 += dim;
            }
            Ok(xas)
        };
        // Segments own disjoint, consecutive row ranges of `out`; only carrying ones work.
        let mut per_seg: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; parts.len()]; segs.len()];
        let split: Vec<(&mut Vec<Option<Vec<f32>>>, (&Segment, &mut [f32]))> = per_seg
            .iter_mut()
            .zip(segment_rows(&mut out, width, segs))
            .filter(|(_, (s, _))| carries(s))
            .collect();
        let run =
            |(slot, seg): (&mut Vec<Option<Vec<f32>>>, (&Segment, &mut [f32]))| -> Result<()> {
                *slot = one(seg)?;
                Ok(())
            };
        if par {
            split.into_par_iter().try_for_each(run)?;
        } else {
            split.into_iter().try_for_each(run)?;
        }
        if !save {
            return Ok((out, Vec::new()));
        }
        let saved = parts
            .iter()
            .enumerate()
            .filter(|(_, &t)| {
                segs.iter()
                    .any(|s| pair(adapters, s, Site::Layer(layer, t)).is_some())
            })
            .map(|(pi, &t)| {
                let xas = per_seg.iter_mut().map(|xas| xas[pi].take()).collect();
                (t, xas)
            })
            .collect();
        Ok((out, saved))
    }

    /// The embeddings of a batch's tokens, `[N, hidden]`.
    fn embed_rows(&self, b: &PackedBatch) -> Result<Vec<f32>> {
        let hid = self.config.hidden_size;
        let mut x = vec![0f32; b.num_tokens() * hid];
        match &self.weights.embed {
            Weight::Dense(t) => {
                let embed = HostView::new(t)?;
                let e = embed.slice();
                for (row, &t) in x.chunks_exact_mut(hid).zip(&b.tokens) {
                    row.copy_from_slice(&e[t as usize * hid..(t as usize + 1) * hid]);
                }
            }
            Weight::Packed(p) => {
                for (row, &t) in x.chunks_exact_mut(hid).zip(&b.tokens) {
                    p.row(t as usize, row);
                }
            }
        }
        Ok(x)
    }

    /// The transformer body of an inference step (prefill or decode): every layer of
    /// [`Self::layer_fwd`] without a tape, each row's keys and values appended to its
    /// cache. Returns the last layer's output `[N, hidden]` (before the final norm).
    pub(crate) fn body_host(
        &self,
        b: &PackedBatch,
        adapters: &Adapters,
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>> {
        let layers = self.weights.layers.len();
        for cache in caches.iter_mut() {
            cache.hk.resize_with(layers, Vec::new);
            cache.hv.resize_with(layers, Vec::new);
        }
        let mut x = self.embed_rows(b)?;
        for l in 0..layers {
            x = self
                .layer_fwd(b, adapters, l, x, Some(&mut *caches), false)?
                .0;
        }
        for (cache, r) in caches.iter_mut().zip(&b.rows) {
            cache.len = r.pos0 + r.len;
        }
        Ok(x)
    }

    /// One decoder layer forward, the one implementation the host runs for training and
    /// for inference. With `caches` (inference: one per row, in packed order) each row's
    /// new keys and values join its cache and its queries attend over all of it; without,
    /// rows start at position 0 and attend over themselves. With `keep`, returns the
    /// activations its backward pass needs (training only: no caches).
    fn layer_fwd(
        &self,
        b: &PackedBatch,
        adapters: &Adapters,
        l: usize,
        x: Vec<f32>,
        mut caches: Option<&mut [&mut KvCache]>,
        keep: bool,
    ) -> Result<(Vec<f32>, Option<LayerTape>)> {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let n = b.num_tokens();
        let (hid, dq, dkv, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let (h_n, kvh, g) = (c.num_heads, c.num_kv_heads, c.group_size());
        let w3 = dq + 2 * dkv;
        let di = c.intermediate_size;
        let eps = c.rms_norm_eps as f32;
        let segs = &b.segments;
        let (h, rinv1) = rms_fwd(&x, HostView::new(&lw.attn_norm)?.slice(), eps);
        let (mut qkv, mut xa) = self.project(
            &h,
            n,
            &lw.wqkv,
            lw.bqkv.as_ref(),
            &Target::ATTN[..3],
            l,
            segs,
            adapters,
            keep,
        )?;
        // Qwen3: RMSNorm over each query and key head (before RoPE).
        let qk_pre = match (&lw.q_norm, &lw.k_norm) {
            (Some(qn), Some(kn)) => {
                let pre = keep.then(|| qkv.clone());
                let (qn, kn) = (HostView::new(qn)?, HostView::new(kn)?);
                let (qn, kn) = (qn.slice(), kn.slice());
                for_rows(&mut qkv, w3, |_, row| {
                    for (hi, head) in row[..dq + dkv].chunks_exact_mut(hd).enumerate() {
                        let w = if hi < h_n { qn } else { kn };
                        let r = rms_inv(head, eps);
                        head.iter_mut().zip(w).for_each(|(v, w)| *v *= r * w);
                    }
                });
                pre
            }
            _ => None,
        };
        // RoPE on q (then the attention scale) and k, per token at its position.
        let pos = token_positions(b);
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        {
            let (cos_t, sin_t) = (HostView::new(&self.cos)?, HostView::new(&self.sin)?);
            let (cos, sin) = (cos_t.slice(), sin_t.slice());
            for_rows(&mut qkv, w3, |i, row| {
                let p = pos[i];
                let (cs, sn) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for (hi, head) in row[..dq + dkv].chunks_exact_mut(hd).enumerate() {
                    rope_in_place(head, cs, sn);
                    if hi < h_n {
                        head.iter_mut().for_each(|v| *v *= scale);
                    }
                }
            });
        }
        // Keys and values join their row's cache; attention reads them from there.
        if let Some(cs) = caches.as_deref_mut() {
            for (r, cache) in b.rows.iter().zip(cs.iter_mut()) {
                for t in r.start..r.start + r.len {
                    let row = &qkv[t * w3..(t + 1) * w3];
                    cache.hk[l].extend_from_slice(&row[dq..dq + dkv]);
                    cache.hv[l].extend_from_slice(&row[dq + dkv..]);
                }
            }
        }
        let cached: Option<Vec<&KvCache>> = caches.map(|cs| cs.iter().map(|c| &**c).collect());
        // Where row `ri`'s keys and values lie: (keys, values, row stride, column offset
        // of kv head 0).
        let kv_of = |ri: usize| -> (&[f32], &[f32], usize, usize, usize) {
            match &cached {
                Some(cs) => (&cs[ri].hk[l], &cs[ri].hv[l], dkv, 0, 0),
                None => {
                    let r0 = b.rows[ri].start * w3;
                    (&qkv, &qkv, w3, r0 + dq, r0 + dq + dkv)
                }
            }
        };
        let mut o = vec![0f32; n * dq];
        // One new token with a cache (a decode step): the streaming kernel, tokens in
        // parallel.
        let single: Vec<Option<usize>> = {
            let mut s = vec![None; n];
            if cached.is_some() && !keep {
                for (ri, r) in b.rows.iter().enumerate() {
                    if r.len == 1 {
                        s[r.start] = Some(ri);
                    }
                }
            }
            s
        };
        let shape = AttnShape {
            heads: h_n,
            kv_heads: kvh,
            head_dim: hd,
            scale: 1.0,
        };
        // A task per (token, query head): one decoding sequence still uses every core.
        let one = |(ih, oh): (usize, &mut [f32])| {
            let (i, h) = (ih / h_n, ih % h_n);
            if let Some(ri) = single[i] {
                let (keys, values, _, _, _) = kv_of(ri);
                let q = &qkv[i * w3 + h * hd..i * w3 + (h + 1) * hd];
                attend_head(shape, h, q, keys, values, oh);
            }
        };
        let work: usize = b
            .rows
            .iter()
            .filter(|r| single[r.start].is_some())
            .map(|r| 2 * (r.pos0 + 1) * dq)
            .sum();
        if work < PAR_MIN_WORK {
            o.chunks_mut(hd).enumerate().for_each(one);
        } else {
            o.par_chunks_mut(hd).enumerate().for_each(one);
        }
        // Other rows: a task per (row, kv head), each owning its group's query heads.
        // Query block i0..i1 (positions pos0+i0..) meets keys 0..pos0+i1 only.
        let tasks: Vec<(usize, usize)> = (0..b.rows.len())
            .filter(|&ri| single[b.rows[ri].start].is_none())
            .flat_map(|ri| (0..kvh).map(move |kh| (ri, kh)))
            .collect();
        let qkv_ref = &qkv;
        let results: Vec<Vec<(Vec<f32>, Vec<f32>)>> = tasks
            .par_iter()
            .map(|&(ri, kh)| {
                let r = &b.rows[ri];
                let (t, total) = (r.len, r.pos0 + r.len);
                let (keys, values, ld, k0, v0) = kv_of(ri);
                let (k0, v0) = (k0 + kh * hd, v0 + kh * hd);
                (0..g)
                    .map(|gi| {
                        let q0 = r.start * w3 + (kh * g + gi) * hd;
                        let mut p = vec![0f32; t * total];
                        for (i0, i1) in causal_blocks(t) {
                            gemm(
                                (i1 - i0, r.pos0 + i1, hd),
                                &mut p,
                                i0 * total,
                                total,
                                false,
                                Mat::rows(qkv_ref, q0 + i0 * w3, w3),
                                Mat::t(keys, k0, ld),
                                1.0,
                                false,
                            );
                        }
                        for (i, row) in p.chunks_mut(total).enumerate() {
                            softmax_causal(row, r.pos0 + i + 1);
                        }
                        let mut oh = vec![0f32; t * hd];
                        for (i0, i1) in causal_blocks(t) {
                            gemm(
                                (i1 - i0, hd, r.pos0 + i1),
                                &mut oh,
                                i0 * hd,
                                hd,
                                false,
                                Mat::rows(&p, i0 * total, total),
                                Mat::rows(values, v0, ld),
                                1.0,
                                false,
                            );
                        }
                        (if keep { p } else { Vec::new() }, oh)
                    })
                    .collect()
            })
            .collect();
        let mut p_all: Vec<Vec<f32>> = vec![Vec::new(); if keep { b.rows.len() * h_n } else { 0 }];
        for (&(ri, kh), heads) in tasks.iter().zip(results) {
            let r = &b.rows[ri];
            for (gi, (p, oh)) in heads.into_iter().enumerate() {
                let hq = kh * g + gi;
                for (i, src) in oh.chunks_exact(hd).enumerate() {
                    let dst = (r.start + i) * dq + hq * hd;
                    o[dst..dst + hd].copy_from_slice(src);
                }
                if keep {
                    p_all[ri * h_n + hq] = p;
                }
            }
        }
        drop(cached);
        let (ao, xa_o) =
            self.project(&o, n, &lw.wo, None, &[Target::O], l, segs, adapters, keep)?;
        xa.extend(xa_o);
        let mut x_mid = ao;
        for_rows(&mut x_mid, hid, |i, r| {
            for (a, b) in r.iter_mut().zip(&x[i * hid..(i + 1) * hid]) {
                *a += b;
            }
        });
        let (h2, rinv2) = rms_fwd(&x_mid, HostView::new(&lw.mlp_norm)?.slice(), eps);
        let (gu, xa_gu) = self.project(
            &h2,
            n,
            &lw.wgate_up,
            None,
            &[Target::Gate, Target::Up],
            l,
            segs,
            adapters,
            keep,
        )?;
        xa.extend(xa_gu);
        let mut a = vec![0f32; n * di];
        for_rows(&mut a, di, |i, ar| {
            let (gr, ur) = gu[i * 2 * di..(i + 1) * 2 * di].split_at(di);
            for ((o, g), u) in ar.iter_mut().zip(gr).zip(ur) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
        let (m, xa_d) = self.project(
            &a,
            n,
            &lw.wdown,
            None,
            &[Target::Down],
            l,
            segs,
            adapters,
            keep,
        )?;
        xa.extend(xa_d);
        let mut x_out = m;
        for_rows(&mut x_out, hid, |i, r| {
            for (a, b) in r.iter_mut().zip(&x_mid[i * hid..(i + 1) * hid]) {
                *a += b;
            }
        });
        if !keep {
            return Ok((x_out, None));
        }
        Ok((
            x_out,
            Some(LayerTape {
                x_in: x,
                rinv1,
                h,
                qkv,
                qk_pre,
                p: p_all,
                o,
                x_mid,
                rinv2,
                h2,
                gu,
                a,
                xa,
            }),
        ))
    }

    /// Backward of [`Self::forward_train_host`] seeded with `g = d loss / d logprob`
    /// (`[N, kmax]`). Returns gradients per adapter index.
    pub(crate) fn backward_host(
        &self,
        tape: HostTape,
        b: &PackedBatch,
        g: &[f32],
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>> {
        let c = &self.config;
        let n = b.num_tokens();
        let (hid, vocab) = (c.hidden_size, c.vocab_size);
        let HostTape {
            layers,
            x_last,
            rinv_f,
            xf,
            lm,
            targets,
            kmax,
        } = tape;
        let mut site_grads: Vec<(Site, SiteGrad)> = Vec::new();
        let mut dxf = vec![0f32; n * hid];
        for ch in lm {
            let (mut d, loras) = match ch.probs {
                Some(p) => (p, ch.loras),
                None => {
                    let (mut logits, loras) =
                        self.lm_logits_host(&xf, ch.start, ch.len, b, adapters)?;
                    logits.par_chunks_mut(vocab).for_each(|row| {
                        log_softmax_row(row, true);
                    });
                    (logits, loras)
                }
            };
            // d logits = scatter(g) − p · Σ g, per row.
            let (gc, tg) = (
                &g[ch.start * kmax..(ch.start + ch.len) * kmax],
                &targets[ch.start * kmax..(ch.start + ch.len) * kmax],
            );
            d.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
                let gr = &gc[i * kmax..(i + 1) * kmax];
                let gsum: f32 = gr.iter().sum();
                row.iter_mut().for_each(|v| *v *= -gsum);
                for (&t, &gv) in tg[i * kmax..(i + 1) * kmax].iter().zip(gr) {
                    row[t as usize] += gv;
                }
            });
            let dst = &mut dxf[ch.start * hid..(ch.start + ch.len) * hid];
            base_nn_acc(&self.weights.lm_head, &d, ch.len, dst)?;
            for LmLora { seg, xa } in loras {
                let (Some((p, scale)), Some(ai)) =
                    (pair(adapters, &seg, Site::LmHead), seg.adapter)
                else {
                    continue;
                };
                let (da, db) = lora_site_bwd(
                    (p, scale),
                    &xf,
                    hid,
                    (&d, (seg.start - ch.start) * vocab, vocab),
                    &xa,
                    &seg,
                    &mut dxf[seg.start * hid..(seg.start + seg.len) * hid],
                    true,
                )?;
                site_grads.push((Site::LmHead, (ai, da, db)));
            }
        }
        let mut dx = vec![0f32; n * hid];
        rms_bwd_acc(
            &x_last,
            HostView::new(&self.weights.final_norm)?.slice(),
            &rinv_f,
            &dxf,
            &mut dx,
        );
        drop(dxf);
        for (l, t) in layers.into_iter().enumerate().rev() {
            self.layer_bwd(b, adapters, l, t, &mut dx, &mut site_grads)?;
        }
        let mut grads = vec![LoraGrads::default(); adapters.len()];
        for (site, (ai, da, db)) in site_grads {
            let Some(p) = adapters.get(ai).and_then(|a| a.get(site)) else {
                continue;
            };
            let da = Tensor::from_vec(da, p.a.dims(), p.a.device())?;
            let db = Tensor::from_vec(db, p.b.dims(), p.b.device())?;
            if let Some(gr) = grads.get_mut(ai) {
                gr.add(site, da, db)?;
            }
        }
        Ok(grads)
    }

    /// One decoder layer backward: `dx` holds d loss / d layer output on entry and
    /// d loss / d layer input on return.
    fn layer_bwd(
        &self,
        b: &PackedBatch,
        adapters: &Adapters,
        l: usize,
        t: LayerTape,
        dx: &mut [f32],
        site_grads: &mut Vec<(Site, SiteGrad)>,
    ) -> Result<()> {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let n = b.num_tokens();
        let (dq, dkv, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let (h_n, kvh, g) = (c.num_heads, c.num_kv_heads, c.group_size());
        let w3 = dq + 2 * dkv;
        let di = c.intermediate_size;
        // MLP: down projection.
        let da = self.project_back(
            dx,
            &lw.wdown,
            &t.a,
            &[Target::Down],
            l,
            b,
            adapters,
            &t.xa,
            site_grads,
        )?;
        // SiLU gate.
        let mut dgu = vec![0f32; n * 2 * di];
        for_rows(&mut dgu, 2 * di, |i, row| {
            let (dg, du) = row.split_at_mut(di);
            let (gr, ur) = t.gu[i * 2 * di..(i + 1) * 2 * di].split_at(di);
            let dar = &da[i * di..(i + 1) * di];
            for j in 0..di {
                let sg = 1.0 / (1.0 + (-gr[j]).exp());
                du[j] = dar[j] * gr[j] * sg;
                dg[j] = dar[j] * ur[j] * sg * (1.0 + gr[j] * (1.0 - sg));
            }
        });
        drop(da);
        let dh2 = self.project_back(
            &dgu,
            &lw.wgate_up,
            &t.h2,
            &[Target::Gate, Target::Up],
            l,
            b,
            adapters,
            &t.xa,
            site_grads,
        )?;
        drop(dgu);
        // dx becomes d loss / d x_mid.
        rms_bwd_acc(
            &t.x_mid,
            HostView::new(&lw.mlp_norm)?.slice(),
            &t.rinv2,
            &dh2,
            dx,
        );
        drop(dh2);
        // Attention output projection.
        let d_o = self.project_back(
            dx,
            &lw.wo,
            &t.o,
            &[Target::O],
            l,
            b,
            adapters,
            &t.xa,
            site_grads,
        )?;
        // Attention, a task per (row, kv head): dq of its query heads, dk and dv.
        let tasks: Vec<(usize, usize)> = (0..b.rows.len())
            .flat_map(|ri| (0..kvh).map(move |kh| (ri, kh)))
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let half = hd / 2;
        let (cos_t, sin_t) = (HostView::new(&self.cos)?, HostView::new(&self.sin_neg)?);
        let (cos, sin_neg) = (cos_t.slice(), sin_t.slice());
        let (qkv, p_all, d_o_ref) = (&t.qkv, &t.p, &d_o);
        type Grads3 = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        let results: Vec<Grads3> = tasks
            .par_iter()
            .map(|&(ri, kh)| {
                let r = &b.rows[ri];
                let tl = r.len;
                let (mut dk, mut dv) = (vec![0f32; tl * hd], vec![0f32; tl * hd]);
                let mut dqs = Vec::with_capacity(g);
                let mut dp = vec![0f32; tl * tl];
                for gi in 0..g {
                    let hq = kh * g + gi;
                    let p = &p_all[ri * h_n + hq];
                    let (q0, k0, v0, o0) = (
                        r.start * w3 + hq * hd,
                        r.start * w3 + dq + kh * hd,
                        r.start * w3 + dq + dkv + kh * hd,
                        r.start * dq + hq * hd,
                    );
                    // P is zero above the diagonal: query block i0..i1 needs keys 0..i1,
                    // key block j0..j1 gets gradient from queries j0.. only.
                    for (i0, i1) in causal_blocks(tl) {
                        gemm(
                            (i1 - i0, i1, hd),
                            &mut dp,
                            i0 * tl,
                            tl,
                            false,
                            Mat::rows(d_o_ref, o0 + i0 * dq, dq),
                            Mat::t(qkv, v0, w3),
                            1.0,
                            false,
                        );
                        gemm(
                            (i1 - i0, hd, tl - i0),
                            &mut dv,
                            i0 * hd,
                            hd,
                            gi > 0,
                            Mat::t(p, i0 * tl + i0, tl),
                            Mat::rows(d_o_ref, o0 + i0 * dq, dq),
                            1.0,
                            false,
                        );
                    }
                    // dS = P ∘ (dP − rowsum(dP ∘ P)), in place; zero wherever P is.
                    for (i, (dpr, pr)) in dp.chunks_mut(tl).zip(p.chunks(tl)).enumerate() {
                        let (live, masked) = dpr.split_at_mut(i + 1);
                        let dot: f32 = live.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (d, p) in live.iter_mut().zip(pr) {
                            *d = p * (*d - dot);
                        }
                        masked.fill(0.0);
                    }
                    let mut dqh = vec![0f32; tl * hd];
                    for (i0, i1) in causal_blocks(tl) {
                        gemm(
                            (i1 - i0, hd, i1),
                            &mut dqh,
                            i0 * hd,
                            hd,
                            false,
                            Mat::rows(&dp, i0 * tl, tl),
                            Mat::rows(qkv, k0, w3),
                            scale,
                            false,
                        );
                        gemm(
                            (i1 - i0, hd, tl - i0),
                            &mut dk,
                            i0 * hd,
                            hd,
                            gi > 0,
                            Mat::t(&dp, i0 * tl + i0, tl),
                            Mat::rows(qkv, q0 + i0 * w3, w3),
                            1.0,
                            false,
                        );
                    }
                    dqs.push(dqh);
                }
                // Undo RoPE: rotate the gradients back by each position's angle.
                let unrope = |buf: &mut [f32]| {
                    for (i, row) in buf.chunks_exact_mut(hd).enumerate() {
                        let p = r.pos0 + i;
                        rope_in_place(
                            row,
                            &cos[p * half..(p + 1) * half],
                            &sin_neg[p * half..(p + 1) * half],
                        );
                    }
                };
                dqs.iter_mut().for_each(|d| unrope(d));
                unrope(&mut dk);
                (dqs, dk, dv)
            })
            .collect();
        drop(d_o);
        let mut dqkv = vec![0f32; n * w3];
        for (&(ri, kh), (dqs, dk, dv)) in tasks.iter().zip(results) {
            let r = &b.rows[ri];
            for i in 0..r.len {
                let row = (r.start + i) * w3;
                for (gi, dqh) in dqs.iter().enumerate() {
                    let col = row + (kh * g + gi) * hd;
                    dqkv[col..col + hd].copy_from_slice(&dqh[i * hd..(i + 1) * hd]);
                }
                let col = row + dq + kh * hd;
                dqkv[col..col + hd].copy_from_slice(&dk[i * hd..(i + 1) * hd]);
                let col = row + dq + dkv + kh * hd;
                dqkv[col..col + hd].copy_from_slice(&dv[i * hd..(i + 1) * hd]);
            }
        }
        // Per-head q/k norms: through each head's RMSNorm, back to the projection.
        if let (Some(pre), Some(qn), Some(kn)) = (&t.qk_pre, &lw.q_norm, &lw.k_norm) {
            let eps = c.rms_norm_eps as f32;
            let (qn, kn) = (HostView::new(qn)?, HostView::new(kn)?);
            let (qn, kn) = (qn.slice(), kn.slice());
            for_rows(&mut dqkv, w3, |i, row| {
                let pre_row = &pre[i * w3..(i + 1) * w3];
                let heads = row[..dq + dkv].chunks_exact_mut(hd);
                for (hi, (dh, xh)) in heads.zip(pre_row.chunks_exact(hd)).enumerate() {
                    let w = if hi < h_n { qn } else { kn };
                    let r = rms_inv(xh, eps);
                    let dot: f32 = xh
                        .iter()
                        .zip(&*dh)
                        .zip(w)
                        .map(|((x, g), w)| g * w * x)
                        .sum();
                    let coef = r * r * r * dot / hd as f32;
                    for ((g, x), w) in dh.iter_mut().zip(xh).zip(w) {
                        *g = *g * w * r - x * coef;
                    }
                }
            });
        }
        let dh = self.project_back(
            &dqkv,
            &lw.wqkv,
            &t.h,
            &Target::ATTN[..3],
            l,
            b,
            adapters,
            &t.xa,
            site_grads,
        )?;
        rms_bwd_acc(
            &t.x_in,
            HostView::new(&lw.attn_norm)?.slice(),
            &t.rinv1,
            &dh,
            dx,
        );
        Ok(())
    }

    /// Backward of [`Self::project_train`]: the input gradient `dy · W` (`[N, in]`) for
    /// `dy: [N, W rows]`, plus the LoRA input gradient of each of `parts` (side by side in
    /// `dy`, as in `W`); records their dA, dB.
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        dy: &[f32],
        w: &Weight,
        x: &[f32],
        parts: &[Target],
        layer: usize,
        b: &PackedBatch,
        adapters: &Adapters,
        saved: &SavedXa,
        site_grads: &mut Vec<(Site, SiteGrad)>,
    ) -> Result<Vec<f32>> {
        let (width, k) = w.dims2()?;
        let n = dy.len() / width;
        let mut dx = vec![0f32; n * k];
        base_nn_acc(w, dy, n, &mut dx)?;
        let mut col0 = 0;
        for &t in parts {
            let xas = saved
                .iter()
                .find(|(tt, _)| *tt == t)
                .map(|(_, v)| v.as_slice());
            let site = Site::Layer(layer, t);
            let dy = (dy, col0, width);
            self.lora_bwd(
                (x, k),
                dy,
                &mut dx,
                &b.segments,
                adapters,
                site,
                xas,
                site_grads,
            )?;
            col0 += t.dims(&self.config).1;
        }
        Ok(dx)
    }

    /// Backward of one site's LoRA over every segment carrying it: adds the extra input
    /// gradient into `dx` (`[N, in]`) and records dA, dB per adapter. `dy`: the output
    /// gradient as (buffer, first column, row width).
    #[allow(clippy::too_many_arguments)]
    fn lora_bwd(
        &self,
        (x, in_dim): (&[f32], usize),
        dy: (&[f32], usize, usize),
        dx: &mut [f32],
        segs: &[Segment],
        adapters: &Adapters,
        site: Site,
        xas: Option<&[Option<Vec<f32>>]>,
        site_grads: &mut Vec<(Site, SiteGrad)>,
    ) -> Result<()> {
        let Some(xas) = xas else {
            return Ok(());
        };
        let work: Vec<(&Segment, &mut [f32], &Vec<f32>)> = segment_rows(dx, in_dim, segs)
            .into_iter()
            .zip(xas)
            .filter_map(|((s, rows), xa)| Some((s, rows, xa.as_ref()?)))
            .collect();
        let par = work.len() > 1;
        let one = |(s, rows, xa): (&Segment, &mut [f32], &Vec<f32>)| -> Result<Option<SiteGrad>> {
            let (Some((p, scale)), Some(ai)) = (pair(adapters, s, site), s.adapter) else {
                return Ok(None);
            };
            let (dy, col0, ld) = dy;
            let dy = (dy, s.start * ld + col0, ld);
            let (da, db) = lora_site_bwd((p, scale), x, in_dim, dy, xa, s, rows, !par)?;
            Ok(Some((ai, da, db)))
        };
        let got: Vec<Option<SiteGrad>> = if par {
            work.into_par_iter().map(one).collect::<Result<_>>()?
        } else {
            work.into_iter().map(one).collect::<Result<_>>()?
        };
        site_grads.extend(got.into_iter().flatten().map(|sg| (site, sg)));
        Ok(())
    }
}

/// One segment's LoRA backward at one site: returns (dA, dB) and adds
/// `scale · (dy B) A` into `dx_rows` (the segment's rows of the input gradient). `x`: the
/// whole batch's input (`[N, in]`); `dy`: (buffer, offset of the segment's first output
/// gradient, row width).
#[allow(clippy::too_many_arguments)]
fn lora_site_bwd(
    (p, scale): (&crate::lora::LoraPair, f64),
    x: &[f32],
    in_dim: usize,
    (dy, dys, ld): (&[f32], usize, usize),
    xa: &[f32],
    s: &Segment,
    dx_rows: &mut [f32],
    par: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (r, out_dim) = (p.a.dim(0)?, p.b.dim(0)?);
    let (a, bm) = (HostView::new(&p.a)?, HostView::new(&p.b)?);
    let scale = scale as f32;
    let mut db = vec![0f32; out_dim * r];
    gemm(
        (out_dim, r, s.len),
        &mut db,
        0,
        r,
        false,
        Mat::t(dy, dys, ld),
        Mat::rows(xa, 0, r),
        scale,
        par,
    );
    let mut dxa = vec![0f32; s.len * r];
    gemm(
        (s.len, r, out_dim),
        &mut dxa,
        0,
        r,
        false,
        Mat::rows(dy, dys, ld),
        Mat::rows(bm.slice(), 0, r),
        scale,
        par,
    );
    let mut da = vec![0f32; r * in_dim];
    gemm(
        (r, in_dim, s.len),
        &mut da,
        0,
        in_dim,
        false,
        Mat::t(&dxa, 0, r),
        Mat::rows(x, s.start * in_dim, in_dim),
        1.0,
        par,
    );
    gemm(
        (s.len, in_dim, r),
        dx_rows,
        0,
        in_dim,
        true,
        Mat::rows(&dxa, 0, r),
        Mat::rows(a.slice(), 0, in_dim),
        1.0,
        par,
    );
    Ok((da, db))
}

/// Rows per block of causal attention: a block of queries is multiplied only with the
/// keys up to its last row (about 40% less work than the full square at 128 tokens).
const ATT_BLOCK: usize = 32;

/// The `(start, end)` row blocks of a `t`-token causal attention.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(ATT_BLOCK)).map(move |b| (b * ATT_BLOCK, ((b + 1) * ATT_BLOCK).min(t)))
}

/// Each packed token's position.
fn token_positions(b: &PackedBatch) -> Vec<usize> {
    let mut pos = vec![0; b.num_tokens()];
    for r in &b.rows {
        for (i, p) in pos[r.start..r.start + r.len].iter_mut().enumerate() {
            *p = r.pos0 + i;
        }
    }
    pos
}

/// Softmax over the first `n` entries of a score row; the rest (future keys) become 0.
fn softmax_causal(row: &mut [f32], n: usize) {
    let (live, masked) = row.split_at_mut(n);
    let max = live.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0f32;
    for v in live.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|v| *v *= inv);
    masked.fill(0.0);
}

/// The log-sum-exp of a logits row; with `to_probs`, the row becomes its softmax. The
/// sum of a vocabulary's exponentials runs in f64 over four interleaved partial sums: a
/// plain f32 running sum over 49,152 terms costs about 1e-4 of the log-probability.
fn log_softmax_row(row: &mut [f32], to_probs: bool) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut acc = [0f64; 4];
    let mut chunks = row.chunks_exact_mut(4);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let e = (*v - max).exp();
            if to_probs {
                *v = e;
            }
            *a += e as f64;
        }
    }
    for v in chunks.into_remainder() {
        let e = (*v - max).exp();
        if to_probs {
            *v = e;
        }
        acc[0] += e as f64;
    }
    let sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    if to_probs {
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
    max + sum.ln() as f32
}
