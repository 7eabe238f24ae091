//! The candle backend: the decoder layer and its hand-derived backward pass on candle's
//! general tensor ops, for any device and dtype. It serves f64 (the finite-difference
//! checks in `tests/gradients.rs`) and GPUs, and is the reference the cpu backend is tested
//! against (`tests/host_train.rs`, `tests/multi_adapter.rs`, `tests/families.rs`).
//!
//! Gradients flow only to LoRA parameters: the frozen base weights are used in plain
//! matmuls whose backward computes the input gradient alone, so no full-size gradient of a
//! base weight is ever allocated. We do not use candle's autograd (several of its fused ops
//! silently drop gradients); every backward here is explicit. Base matmuls run over the
//! packed batch, LoRA updates per adapter segment, attention per row. The family's optional
//! pieces (q/k/v biases, per-head q/k RMSNorm) live in `body` and `attn_row`.

use super::{own_tape, Backend, Candle, PassTape, TrainOut};
use crate::error::Result;
use crate::lora::{LoraGrads, Site, Target};
use crate::model::batch::{PackedBatch, Segment};
use crate::model::front::{logsumexp, pair, Adapters, KvCache, LM_CHUNK};
use crate::model::weights::LayerWeights;
use crate::model::BaseModel;
use candle_core::{DType, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope;

impl Backend for Candle {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn parallel_parts(&self) -> bool {
        false
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
        let (lp, tape) = m.forward_candle(batch, targets, kmax, adapters, keep, keep_probs)?;
        Ok((lp, tape.map(|t| Box::new(t) as PassTape)))
    }

    fn train_backward(
        &self,
        m: &BaseModel,
        tape: PassTape,
        batch: &PackedBatch,
        g: Vec<f32>,
        kmax: usize,
        adapters: &Adapters,
    ) -> Result<Vec<LoraGrads>> {
        let tape = own_tape::<CandleTape>(tape, self.name())?;
        m.backward_candle(*tape, batch, g, kmax, adapters)
    }

    fn infer_hidden(
        &self,
        m: &BaseModel,
        batch: &PackedBatch,
        adapters: &Adapters,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let x = m.body(batch, adapters, None, Some(caches))?;
        m.rms(&x, &m.weights.final_norm)
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&w.t()?)?)
    }
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

/// Head geometry of a `[t, heads · head_dim]` row and the attention scale.
struct HeadLayout {
    t: usize,
    hd: usize,
    h: usize,
    kvh: usize,
    g: usize,
    scale: f64,
}

/// `[t, h · hd]` → `[h, t, hd]`, contiguous.
fn heads_first(x: &Tensor, t: usize, h: usize, hd: usize) -> Result<Tensor> {
    Ok(x.reshape((t, h, hd))?.transpose(0, 1)?.contiguous()?)
}

/// Concatenate along rows, without a copy when there is one part.
fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(if parts.len() == 1 {
        parts.swap_remove(0)
    } else {
        Tensor::cat(&parts, 0)?
    })
}

impl BaseModel {
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
