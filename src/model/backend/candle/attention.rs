//! Causal attention of the candle backend over all rows of a batch at once, and its
//! backward pass.
//!
//! The math, per row and head: `O = softmax(Q Kᵀ / √d + M) V` with RoPE on Q and K (and,
//! in Qwen3, a per-head RMSNorm before it), where `M` masks key positions after the query
//! (causal) and beyond the row's keys (padding). Backward: `dV = Pᵀ dO`,
//! `dS = P ⊙ (dO Vᵀ − rowsum(dO Vᵀ ⊙ P))`, `dQ = dS K / √d`, `dK = dSᵀ Q`, then RoPE by
//! the opposite angle and the q/k norms' backward.
//!
//! How rows share kernels ([`AttnPlan`]): RoPE and the q/k norms run over the packed
//! tokens in one call each (every token at its own position). The rows are then split
//! into groups of similar key length; a group's queries, keys and values are gathered into
//! zero-padded `[rows · kv_heads, group · queries, head_dim]` tensors (grouped-query
//! attention: the `group` query heads sharing a key/value head are stacked along the
//! query axis, so K and V are never repeated), and its scores are one batched product,
//! one masked softmax and one batched product with V. The outputs of all groups are
//! gathered back to packed order with one `index_select`. With KV caches (prefill and
//! decode), a row's keys are its cache followed by its new tokens, and positions beyond
//! them are masked.
//!
//! Padding contributes exactly zero: masked scores get a large negative *finite* value, so
//! `exp` underflows to 0 where a query has any key, and a padding query (all keys masked)
//! gets a finite uniform row whose output is never gathered; in backward its `dO` is a
//! zero row, so it adds nothing to dK or dV. A group's scores stay under a byte budget
//! ([`SCORES_BYTES`] by default), computed with checked arithmetic; a row whose scores
//! alone exceed it runs alone, as the per-row pass did.

use super::cat_rows;
use crate::error::{Error, Result};
use crate::model::batch::PackedBatch;
use crate::model::front::KvCache;
use crate::model::weights::LayerWeights;
use crate::model::BaseModel;
use candle_core::{DType, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope;

/// Default most bytes of one group's attention scores `[rows, heads, queries, keys]`.
pub(crate) const SCORES_BYTES: usize = 256 << 20;

/// A group's padded area may be at most this many times its rows' own: rows of very
/// different lengths go to different groups rather than pad each other.
const PAD_FACTOR: usize = 2;

/// Rows whose attention runs as one padded batched product.
struct Group {
    /// Packed row indices.
    rows: Vec<usize>,
    /// Their new tokens.
    lens: Vec<usize>,
    /// Queries per row (the longest row's new tokens).
    t: usize,
    /// Keys per row (the longest row's cache plus new tokens).
    s: usize,
    /// `[rows · t]`: each padded query slot's packed token, or `N` (a zero row) for padding.
    gather: Tensor,
    /// Additive mask `[rows, 1, 1, t, s]`; None when nothing is masked.
    mask: Option<Tensor>,
}

/// How one batch's rows run through attention: groups, the way back to packed order, and
/// the RoPE tables at each packed token's position. Built once per pass, used by every
/// layer (see the module doc).
pub(crate) struct AttnPlan {
    groups: Vec<Group>,
    /// `[N]`: each packed token's slot among the groups' outputs stacked.
    scatter: Tensor,
    /// `[N, 1, head_dim / 2]`: cos, sin and −sin at each packed token's position.
    cos: Tensor,
    sin: Tensor,
    sin_neg: Tensor,
    n: usize,
}

/// What backward needs of one layer's attention.
pub(crate) struct AttnTape {
    /// Per group: q (rotated, scaled), k (rotated), v, all padded, and the probabilities.
    groups: Vec<[Tensor; 4]>,
    /// With per-head q/k norms: q `[N·h, hd]` and k `[N·kvh, hd]` before them.
    qk_pre: Option<(Tensor, Tensor)>,
}

/// The masked scores' value: finite in the dtype, far below any real score.
fn mask_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -6.0e4,
        _ => -1.0e30,
    }
}

fn too_large(what: &str) -> Error {
    Error::invalid("batch", format!("{what} does not fit in memory"))
}

/// `a · b · …` or an error naming `what`.
fn checked_product(what: &str, xs: &[usize]) -> Result<usize> {
    xs.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| too_large(what))
}

impl AttnPlan {
    /// Plan `b`'s rows, whose caches (when prefilling or decoding) hold `pos0` tokens each,
    /// with at most `budget` bytes of scores per group.
    pub(crate) fn new(m: &BaseModel, b: &PackedBatch, budget: usize) -> Result<Self> {
        let c = &m.config;
        let n = b.num_tokens();
        let elt = m.dtype.size_in_bytes();
        // Longest key span first, so a group's first row sets its key length.
        let mut order: Vec<usize> = (0..b.rows.len()).collect();
        order.sort_by_key(|&i| {
            let r = &b.rows[i];
            (std::cmp::Reverse(r.pos0 + r.len), std::cmp::Reverse(r.len))
        });
        let mut groups: Vec<(Vec<usize>, usize, usize, usize)> = Vec::new(); // rows, t, s, area
        for i in order {
            let r = &b.rows[i];
            let s_row = r
                .pos0
                .checked_add(r.len)
                .ok_or_else(|| too_large("a row"))?;
            let area = checked_product("a row's scores", &[r.len, s_row])?;
            if let Some((rows, t, s, real)) = groups.last_mut() {
                let t2 = (*t).max(r.len);
                let padded = checked_product("scores", &[rows.len() + 1, t2, *s])?;
                let bytes = checked_product("scores", &[padded, c.num_heads, elt])?;
                let real2 = real.checked_add(area).ok_or_else(|| too_large("scores"))?;
                let waste_ok = padded <= real2.saturating_mul(PAD_FACTOR);
                if bytes <= budget && waste_ok {
                    rows.push(i);
                    *t = t2;
                    *real = real2;
                    continue;
                }
            }
            groups.push((vec![i], r.len, s_row, area));
        }
        let mask_v = mask_value(m.dtype);
        let mut scatter = vec![0u32; n];
        let mut slot0 = 0usize;
        let mut planned = Vec::with_capacity(groups.len());
        for (rows, t, s, _) in groups {
            let bsz = rows.len();
            let slots = checked_product("a group", &[bsz, t])?;
            let mut gather = vec![n as u32; slots];
            let mut mask = vec![0f32; checked_product("a group's mask", &[slots, s])?];
            let mut masked = false;
            for (bi, &ri) in rows.iter().enumerate() {
                let r = &b.rows[ri];
                for i in 0..t {
                    let slot = bi * t + i;
                    let row = &mut mask[slot * s..(slot + 1) * s];
                    // Query i sees keys 0..=pos0+i; a padding query sees none.
                    let seen = if i < r.len { r.pos0 + i + 1 } else { 0 };
                    if seen < s {
                        row[seen..].fill(mask_v);
                        masked = true;
                    }
                    if i < r.len {
                        gather[slot] = (r.start + i) as u32;
                        scatter[r.start + i] = (slot0 + slot) as u32;
                    }
                }
            }
            let mask = if masked {
                Some(Tensor::from_vec(mask, (bsz, 1, 1, t, s), &m.device)?.to_dtype(m.dtype)?)
            } else {
                None
            };
            planned.push(Group {
                gather: Tensor::from_vec(gather, slots, &m.device)?,
                lens: rows.iter().map(|&ri| b.rows[ri].len).collect(),
                rows,
                t,
                s,
                mask,
            });
            slot0 += slots;
        }
        let pos: Vec<u32> = b
            .rows
            .iter()
            .flat_map(|r| (r.pos0..r.pos0 + r.len).map(|p| p as u32))
            .collect();
        // `rows` are in packed order and contiguous, so `pos` is per packed token.
        let pos = Tensor::from_vec(pos, n, &m.device)?;
        let half = c.head_dim / 2;
        let at = |table: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&pos, 0)?.reshape((n, 1, half))?)
        };
        Ok(AttnPlan {
            groups: planned,
            scatter: Tensor::from_vec(scatter, n, &m.device)?,
            cos: at(&m.cos)?,
            sin: at(&m.sin)?,
            sin_neg: at(&m.sin_neg)?,
            n,
        })
    }

    /// Number of groups (for tests).
    #[cfg(test)]
    pub(crate) fn num_groups(&self) -> usize {
        self.groups.len()
    }
}

impl BaseModel {
    /// Attention of layer `lw` over every row of `plan`'s batch. `q` `[N, q_dim]`, `k` and
    /// `v` `[N, kv_dim]`, packed, before norms and RoPE. With `caches` (in packed order, and
    /// the layer index), each row's keys and values are appended to its cache first.
    /// Returns the output `[N, q_dim]` and, with `keep`, the tape.
    pub(crate) fn attention(
        &self,
        lw: &LayerWeights,
        plan: &AttnPlan,
        [q, k, v]: [&Tensor; 3],
        mut caches: Option<(&mut [&mut KvCache], usize)>,
        keep: bool,
    ) -> Result<(Tensor, Option<AttnTape>)> {
        let c = &self.config;
        let (n, hd, h, kvh, g) = (
            plan.n,
            c.head_dim,
            c.num_heads,
            c.num_kv_heads,
            c.group_size(),
        );
        let scale = 1.0 / (hd as f64).sqrt();
        let (q, k, qk_pre) = match (&lw.q_norm, &lw.k_norm) {
            (Some(qn), Some(kn)) => {
                let qp = q.reshape((n * h, hd))?;
                let kp = k.reshape((n * kvh, hd))?;
                let qo = self.rms(&qp, qn)?;
                let ko = self.rms(&kp, kn)?;
                (qo, ko, keep.then_some((qp, kp)))
            }
            _ => (q.clone(), k.clone(), None),
        };
        let q = rope(&q.reshape((n, h, 1, hd))?, &plan.cos, &plan.sin)?
            .affine(scale, 0.0)?
            .reshape((n, h * hd))?;
        let k = rope(&k.reshape((n, kvh, 1, hd))?, &plan.cos, &plan.sin)?.reshape((n, kvh * hd))?;
        // One zero row at index N: what padding slots gather.
        let qkv = Tensor::cat(&[&q, &k, v], 1)?.pad_with_zeros(0, 0, 1)?;
        let mut outs = Vec::with_capacity(plan.groups.len());
        let mut tapes = Vec::new();
        for gr in &plan.groups {
            let (bsz, t, s) = (gr.rows.len(), gr.t, gr.s);
            let x = qkv
                .index_select(&gr.gather, 0)?
                .reshape((bsz, t, h + 2 * kvh, hd))?;
            // [bsz, heads, t, hd] from columns `from..from + heads` of the gathered rows.
            let heads = |from: usize, heads: usize| -> Result<Tensor> {
                Ok(x.narrow(2, from, heads)?.transpose(1, 2)?.contiguous()?)
            };
            let qg = heads(0, h)?.reshape((bsz * kvh, g * t, hd))?;
            let (kg, vg) = match caches.as_mut() {
                None => (
                    heads(h, kvh)?.reshape((bsz * kvh, t, hd))?,
                    heads(h + kvh, kvh)?.reshape((bsz * kvh, t, hd))?,
                ),
                Some((cs, layer)) => {
                    let kn = heads(h, kvh)?;
                    let vn = heads(h + kvh, kvh)?;
                    let mut ks = Vec::with_capacity(bsz);
                    let mut vs = Vec::with_capacity(bsz);
                    for (bi, (&ri, &len)) in gr.rows.iter().zip(&gr.lens).enumerate() {
                        let cache = cs
                            .get_mut(ri)
                            .ok_or_else(|| Error::invalid("caches", "one cache per row"))?;
                        let (kr, vr) = append(
                            cache,
                            *layer,
                            kn.get(bi)?.narrow(1, 0, len)?,
                            vn.get(bi)?.narrow(1, 0, len)?,
                        )?;
                        let total = kr.dim(1)?;
                        ks.push(kr.pad_with_zeros(1, 0, s - total)?);
                        vs.push(vr.pad_with_zeros(1, 0, s - total)?);
                    }
                    (
                        Tensor::stack(&ks, 0)?.reshape((bsz * kvh, s, hd))?,
                        Tensor::stack(&vs, 0)?.reshape((bsz * kvh, s, hd))?,
                    )
                }
            };
            let scores = qg.matmul(&kg.t()?)?;
            let scores = match &gr.mask {
                Some(mk) => scores
                    .reshape((bsz, kvh, g, t, s))?
                    .broadcast_add(mk)?
                    .reshape((bsz * kvh, g * t, s))?,
                None => scores,
            };
            let p = softmax_last_dim(&scores)?;
            let o = p
                .matmul(&vg)?
                .reshape((bsz, h, t, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((bsz * t, h * hd))?;
            outs.push(o);
            if keep {
                tapes.push([qg, kg, vg, p]);
            }
        }
        let o = cat_rows(outs)?.index_select(&plan.scatter, 0)?;
        let tape = keep.then_some(AttnTape {
            groups: tapes,
            qk_pre,
        });
        Ok((o, tape))
    }

    /// Backward of [`Self::attention`] (training, no caches): the gradients of its `q`,
    /// `k` and `v` inputs, packed.
    pub(crate) fn attention_backward(
        &self,
        lw: &LayerWeights,
        plan: &AttnPlan,
        d_o: &Tensor,
        tape: &AttnTape,
    ) -> Result<[Tensor; 3]> {
        let c = &self.config;
        let (n, hd, h, kvh, g) = (
            plan.n,
            c.head_dim,
            c.num_heads,
            c.num_kv_heads,
            c.group_size(),
        );
        let scale = 1.0 / (hd as f64).sqrt();
        let d_o = d_o.pad_with_zeros(0, 0, 1)?;
        let mut parts = Vec::with_capacity(plan.groups.len());
        for (gr, [q, k, v, p]) in plan.groups.iter().zip(&tape.groups) {
            let (bsz, t) = (gr.rows.len(), gr.t);
            if gr.s != t {
                return Err(Error::Unavailable(
                    "attention backward of a pass with KV caches".into(),
                ));
            }
            let dog = d_o
                .index_select(&gr.gather, 0)?
                .reshape((bsz, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((bsz * kvh, g * t, hd))?;
            let dp = dog.matmul(&v.t()?)?;
            let dv = p.t()?.matmul(&dog)?;
            let rowdot = (&dp * p)?.sum_keepdim(D::Minus1)?;
            let ds = (p * dp.broadcast_sub(&rowdot)?)?;
            let dq = ds.matmul(k)?.affine(scale, 0.0)?;
            let dk = ds.t()?.matmul(q)?;
            // Back to [bsz · t, heads · hd] rows, q then k then v.
            let rows = |x: Tensor, heads: usize| -> Result<Tensor> {
                Ok(x.reshape((bsz, heads, t, hd))?
                    .transpose(1, 2)?
                    .reshape((bsz * t, heads * hd))?)
            };
            parts.push(Tensor::cat(
                &[rows(dq, h)?, rows(dk, kvh)?, rows(dv, kvh)?],
                1,
            )?);
        }
        let d = cat_rows(parts)?.index_select(&plan.scatter, 0)?;
        let (dq_dim, dkv) = (c.q_dim(), c.kv_dim());
        let dq = rope(
            &d.narrow(1, 0, dq_dim)?.reshape((n, h, 1, hd))?,
            &plan.cos,
            &plan.sin_neg,
        )?;
        let dk = rope(
            &d.narrow(1, dq_dim, dkv)?.reshape((n, kvh, 1, hd))?,
            &plan.cos,
            &plan.sin_neg,
        )?;
        let dv = d.narrow(1, dq_dim + dkv, dkv)?;
        let (dq, dk) = match (&tape.qk_pre, &lw.q_norm, &lw.k_norm) {
            (Some((qp, kp)), Some(qn), Some(kn)) => (
                self.rms_backward(qp, qn, &dq.reshape((n * h, hd))?)?,
                self.rms_backward(kp, kn, &dk.reshape((n * kvh, hd))?)?,
            ),
            _ => (dq, dk),
        };
        Ok([
            dq.reshape((n, dq_dim))?,
            dk.reshape((n, dkv))?,
            dv.contiguous()?,
        ])
    }
}

/// A row's new keys and values `[kvh, len, hd]` appended to its cache at `layer` (the
/// layers run in order, so a layer past the cache's end is its next); returns the row's
/// keys and values so far.
fn append(cache: &mut KvCache, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    let (k, v) = match (cache.k.get(layer), cache.v.get(layer)) {
        (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
        _ => (k.contiguous()?, v.contiguous()?),
    };
    if layer < cache.k.len() && layer < cache.v.len() {
        cache.k[layer] = k.clone();
        cache.v[layer] = v.clone();
    } else {
        cache.k.push(k.clone());
        cache.v.push(v.clone());
    }
    Ok((k, v))
}
