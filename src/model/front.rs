//! The model front: what a pass takes and gives (training rows, inference rows, KV caches,
//! tapes) and the plumbing both backends share: row checks, packing rows of many adapters
//! into one batch, splitting a batch into parts that run side by side, targets padded to a
//! common `k`, the budget for kept softmax probabilities, seeds of the backward pass, and
//! the inference step's LM head (last positions batched; prompt logprobs, top-k and scored
//! suffixes chunked). The layers' math lives in the backends ([`super::backend`]).

use super::backend::PassTape;
use super::batch::{PackedBatch, Segment};
use super::train_rows::{TrainBatch, TrainRow};
use super::BaseModel;
use crate::error::{Error, Result};
use crate::lora::{LoraGrads, LoraPair, LoraWeights, Site};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

/// Past keys and values of one sequence, after RoPE. A model keeps them in one of two
/// forms: per layer `[kv_heads, len, head_dim]` tensors on its device, or (on the host
/// kernels) per layer `[len, kv_heads · head_dim]` buffers that grow in place.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
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
    pub(crate) fn lm_dtype(&self) -> DType {
        if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Logits `[len, vocab]` (f32) of hidden states `xf` (already normed) for one segment's
    /// slice, with that segment's LM-head LoRA, and the LoRA `x Aᵀ` when kept.
    pub(crate) fn lm_logits(
        &self,
        xf: &Tensor,
        lora: Option<(&LoraPair, f64)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut logits = self.backend.linear(xf, &self.weights.lm_head)?;
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
        if !self.backend.parallel_parts()
            || threads < 2
            || rows.len() < 2
            || tokens < SPLIT_MIN_TOKENS
        {
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
        let (lp, inner) = self
            .backend
            .train_forward(self, &batch, tgt, kmax, adapters, keep, keep_probs)?;
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
        self.backend
            .train_backward(self, pass, &batch, g, kmax, adapters)
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
        Ok(self.infer_step(rows, caches, adapters, false, 0, score)?.0)
    }

    /// One prefill or decode step (see [`Self::forward_infer_top`] and
    /// [`Self::forward_infer_scored`]). The whole step runs on a pool thread: the cpu
    /// kernels' parallel loops then start on a worker whose sibling is still spinning,
    /// instead of waking the pool and parking the caller a hundred times a step.
    fn infer_step(
        &self,
        rows: &[InferRow],
        caches: &mut [&mut KvCache],
        adapters: &Adapters,
        prompt_logprobs: bool,
        prompt_top_k: usize,
        score: Option<(&[Option<usize>], LogitsVisitor)>,
    ) -> Result<InferOut> {
        rayon::scope(|_| {
            self.infer_step_on_pool(rows, caches, adapters, prompt_logprobs, prompt_top_k, score)
        })
    }

    /// [`Self::infer_step`]'s work, on the pool thread it runs on.
    fn infer_step_on_pool(
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
        let xf = self
            .backend
            .infer_hidden(self, &batch, adapters, &mut packed)?;
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
