//! The candle backend: the decoder layer and its hand-derived backward pass on candle's
//! general tensor ops, for any device and dtype. It serves f64 (the finite-difference
//! checks in `tests/gradients.rs`) and GPUs, and is the reference the cpu backend is tested
//! against (`tests/host_train.rs`, `tests/multi_adapter.rs`, `tests/families.rs`).
//!
//! This file holds the pass: the body (norms, projections, MLP, residuals), the LM head
//! with its log-softmax, and the backward of each. Gradients flow only to LoRA parameters:
//! the frozen base weights are used in plain matmuls whose backward computes the input
//! gradient alone, so no full-size gradient of a base weight is ever allocated. We do not
//! use candle's autograd (several of its fused ops silently drop gradients); every backward
//! here is explicit. Every piece runs over the whole packed batch at once: base matmuls
//! over all tokens, attention over all rows in padded groups ([`attention`]), and LoRA for
//! all adapters in one set of products ([`lora`]). The family's optional pieces (q/k/v
//! biases in `body`, per-head q/k RMSNorm in [`attention`]) are switched by the weights.

mod attention;
mod lora;
#[cfg(test)]
mod tests;

pub(crate) use attention::SCORES_BYTES;

use super::{own_tape, Backend, Candle, PassTape, TrainOut};
use crate::error::Result;
use crate::lora::{LoraGrads, Site, Target};
use crate::model::batch::PackedBatch;
use crate::model::front::{logsumexp, Adapters, KvCache, LM_CHUNK};
use crate::model::BaseModel;
use attention::{AttnPlan, AttnTape};
use candle_core::{DType, Tensor, D};
use lora::{LoraPlan, Stack};

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
        let (lp, tape) = m.forward_candle(
            batch,
            targets,
            kmax,
            adapters,
            keep,
            keep_probs,
            self.scores_budget,
        )?;
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
        let plan = AttnPlan::new(m, batch, self.scores_budget)?;
        let x = m.body(batch, &plan, adapters, None, Some(caches))?;
        m.rms(&x, &m.weights.final_norm)
    }

    fn linear(&self, x: &Tensor, w: &crate::model::Weight) -> Result<Tensor> {
        let w = w.dense()?;
        Ok(x.matmul(&w.t()?)?)
    }
}

/// The candle pass's activations.
struct CandleTape {
    plan: AttnPlan,
    layers: Vec<LayerTape>,
    x_last: Tensor,
    xf: Tensor,
    targets: Tensor,
    lm: Vec<LmChunk>,
}

struct LayerTape {
    x_in: Tensor,
    h: Tensor,
    attn: AttnTape,
    o: Tensor,
    x_mid: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    a: Tensor,
    /// LoRA `xs` (picked `x Aᵀ`, see [`lora`]) per target.
    xs: Vec<(Target, Tensor)>,
}

/// A chunk of the LM head: tokens `start..start + len` of the batch.
struct LmChunk {
    start: usize,
    len: usize,
    probs: Option<Tensor>,
    /// The LM-head LoRA's `xs` of the chunk, where a token of it has one.
    xs: Option<Tensor>,
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

    /// `base` plus the LoRA update of `site` on input `x` (all packed tokens), where any
    /// token's adapter carries it; with `save`, keeps its `xs` for backward.
    fn with_lora(
        &self,
        base: Tensor,
        x: &Tensor,
        lora: &mut LoraPlan,
        site: Site,
        save: Option<&mut Vec<(Target, Tensor)>>,
    ) -> Result<Tensor> {
        let Some(stack) = lora.stack(site)? else {
            return Ok(base);
        };
        let (d, xs) = stack.forward(x, 0)?;
        if let (Some(save), Site::Layer(_, t)) = (save, site) {
            save.push((t, xs));
        }
        Ok((base + d)?)
    }

    /// The transformer body over a packed batch; returns the last hidden state `[N, hidden]`.
    fn body(
        &self,
        b: &PackedBatch,
        plan: &AttnPlan,
        adapters: &Adapters,
        mut tape: Option<&mut Vec<LayerTape>>,
        mut caches: Option<&mut [&mut KvCache]>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = b.num_tokens();
        let (dq, dkv, di) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut lora = LoraPlan::new(b, adapters, &self.device, self.dtype);
        let ids = Tensor::from_slice(&b.tokens, n, &self.device)?;
        let mut x = self.weights.embed.dense()?.index_select(&ids, 0)?;
        for (l, lw) in self.weights.layers.iter().enumerate() {
            let keep = tape.is_some();
            let mut xs = Vec::new();
            let mut save = keep.then_some(&mut xs);
            let h = self.rms(&x, &lw.attn_norm)?;
            let qkv = h.matmul(&lw.wqkv.dense()?.t()?)?;
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
                parts[i] =
                    self.with_lora(base, &h, &mut lora, Site::Layer(l, t), save.as_deref_mut())?;
            }
            let [q, k, v] = &parts;
            let cache = caches.as_deref_mut().map(|cs| (cs, l));
            let (o, attn) = self.attention(lw, plan, [q, k, v], cache, keep)?;
            let ao = o.matmul(&lw.wo.dense()?.t()?)?;
            let ao = self.with_lora(
                ao,
                &o,
                &mut lora,
                Site::Layer(l, Target::O),
                save.as_deref_mut(),
            )?;
            let x_mid = (&x + ao)?;
            let h2 = self.rms(&x_mid, &lw.mlp_norm)?;
            let gu = h2.matmul(&lw.wgate_up.dense()?.t()?)?;
            let g = gu.narrow(1, 0, di)?;
            let u = gu.narrow(1, di, di)?;
            let g = self.with_lora(
                g,
                &h2,
                &mut lora,
                Site::Layer(l, Target::Gate),
                save.as_deref_mut(),
            )?;
            let u = self.with_lora(
                u,
                &h2,
                &mut lora,
                Site::Layer(l, Target::Up),
                save.as_deref_mut(),
            )?;
            let a = (g.silu()? * &u)?;
            let m = a.matmul(&lw.wdown.dense()?.t()?)?;
            let m = self.with_lora(m, &a, &mut lora, Site::Layer(l, Target::Down), save)?;
            let x_out = (&x_mid + m)?;
            if let (Some(tape), Some(attn)) = (tape.as_deref_mut(), attn) {
                tape.push(LayerTape {
                    x_in: x,
                    h,
                    attn,
                    o,
                    x_mid,
                    h2,
                    g,
                    u,
                    a,
                    xs,
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

    /// Logits `[len, vocab]` (in [`Self::lm_dtype`]) of the normed hidden states `xf` of
    /// tokens `start..`, with the LM-head LoRA of the tokens that have one, and its `xs`.
    fn lm_chunk_logits(
        &self,
        xf: &Tensor,
        start: usize,
        stack: Option<&Stack>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut logits = xf.matmul(&self.weights.lm_head.dense()?.t()?)?;
        let mut xs = None;
        if let Some(stack) = stack {
            let (d, s) = stack.forward(xf, start)?;
            logits = (logits + d)?;
            xs = Some(s);
        }
        Ok((logits.to_dtype(self.lm_dtype())?, xs))
    }

    /// The candle forward pass: per packed token, the log-probability of each of its
    /// `kmax` targets, and the tape with `keep`. The LM head runs over the packed tokens
    /// in chunks of [`LM_CHUNK`], whatever their rows and adapters.
    #[allow(clippy::too_many_arguments)]
    fn forward_candle(
        &self,
        batch: &PackedBatch,
        tgt: Vec<u32>,
        kmax: usize,
        adapters: &Adapters,
        keep: bool,
        keep_probs: bool,
        scores_budget: usize,
    ) -> Result<(Vec<Vec<f64>>, Option<CandleTape>)> {
        let n = batch.num_tokens();
        let targets = Tensor::from_vec(tgt, (n, kmax), &self.device)?;
        let plan = AttnPlan::new(self, batch, scores_budget)?;
        let mut layers = Vec::new();
        let x_last = self.body(batch, &plan, adapters, keep.then_some(&mut layers), None)?;
        let xf = self.rms(&x_last, &self.weights.final_norm)?;
        let mut lora = LoraPlan::new(batch, adapters, &self.device, self.dtype);
        let stack = lora.stack(Site::LmHead)?;
        let mut lp_parts = Vec::new();
        let mut lm = Vec::new();
        let mut start = 0;
        while start < n {
            let len = LM_CHUNK.min(n - start);
            let st = stack
                .as_ref()
                .filter(|_| lora.any_in(Site::LmHead, start, len));
            let (logits, xs) = self.lm_chunk_logits(&xf.narrow(0, start, len)?, start, st)?;
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
                    probs,
                    xs,
                });
            }
            start += len;
        }
        let lp = cat_rows(lp_parts)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let tape = keep.then(|| CandleTape {
            plan,
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
            plan,
            layers,
            x_last,
            xf,
            targets,
            lm,
        } = tape;
        let g = Tensor::from_vec(g, (batch.num_tokens(), kmax), &self.device)?
            .to_dtype(self.lm_dtype())?;
        let mut grads = vec![LoraGrads::default(); adapters.len()];
        let mut lora = LoraPlan::new(batch, adapters, &self.device, self.dtype);

        // LM head and final norm.
        let stack = lora.stack(Site::LmHead)?;
        let mut dxf_parts = Vec::with_capacity(lm.len());
        for ch in &lm {
            let xf_c = xf.narrow(0, ch.start, ch.len)?;
            let st = stack
                .as_ref()
                .filter(|_| lora.any_in(Site::LmHead, ch.start, ch.len));
            let (probs, xs) = match &ch.probs {
                Some(p) => (p.clone(), ch.xs.clone()),
                None => {
                    let (logits, xs) = self.lm_chunk_logits(&xf_c, ch.start, st)?;
                    let lse = logsumexp(&logits)?;
                    (logits.broadcast_sub(&lse)?.exp()?, xs)
                }
            };
            let gc = g.narrow(0, ch.start, ch.len)?.contiguous()?;
            let tg = targets.narrow(0, ch.start, ch.len)?.contiguous()?;
            let gsum = gc.sum_keepdim(1)?;
            let dlogits = probs
                .broadcast_mul(&gsum.neg()?)?
                .scatter_add(&tg, &gc, 1)?;
            let dlogits = dlogits.to_dtype(self.dtype)?;
            let mut dx = dlogits.matmul(self.weights.lm_head.dense()?)?;
            if let (Some(st), Some(xs)) = (st, xs) {
                let e = st.backward(&xf_c, &dlogits, &xs, ch.start, Site::LmHead, &mut grads)?;
                dx = (dx + e)?;
            }
            dxf_parts.push(dx);
        }
        let dxf = cat_rows(dxf_parts)?;
        let mut dx = self.rms_backward(&x_last, &self.weights.final_norm, &dxf)?;

        for (l, (lw, t)) in self.weights.layers.iter().zip(&layers).enumerate().rev() {
            let mut lora_bwd = |x: &Tensor,
                                dy: &Tensor,
                                target: Target,
                                grads: &mut [LoraGrads]|
             -> Result<Option<Tensor>> {
                let Some((_, xs)) = t.xs.iter().find(|(tt, _)| *tt == target) else {
                    return Ok(None);
                };
                let site = Site::Layer(l, target);
                match lora.stack(site)? {
                    Some(st) => Ok(Some(st.backward(x, dy, xs, 0, site, grads)?)),
                    None => Ok(None),
                }
            };
            // MLP
            let mut da = dx.matmul(lw.wdown.dense()?)?;
            if let Some(e) = lora_bwd(&t.a, &dx, Target::Down, &mut grads)? {
                da = (da + e)?;
            }
            let sg = candle_nn::ops::sigmoid(&t.g)?;
            let silu = (&t.g * &sg)?;
            let dsilu = (&sg * ((&t.g * (1.0 - &sg)?)? + 1.0)?)?;
            let dg = (&da * &t.u)?.mul(&dsilu)?;
            let du = (&da * silu)?;
            let mut dh2 = Tensor::cat(&[&dg, &du], 1)?.matmul(lw.wgate_up.dense()?)?;
            if let Some(e) = lora_bwd(&t.h2, &dg, Target::Gate, &mut grads)? {
                dh2 = (dh2 + e)?;
            }
            if let Some(e) = lora_bwd(&t.h2, &du, Target::Up, &mut grads)? {
                dh2 = (dh2 + e)?;
            }
            let dx_mid = (&dx + self.rms_backward(&t.x_mid, &lw.mlp_norm, &dh2)?)?;
            // Attention
            let mut d_o = dx_mid.matmul(lw.wo.dense()?)?;
            if let Some(e) = lora_bwd(&t.o, &dx_mid, Target::O, &mut grads)? {
                d_o = (d_o + e)?;
            }
            let [dq, dk, dv] = self.attention_backward(lw, &plan, &d_o, &t.attn)?;
            let mut dh = Tensor::cat(&[&dq, &dk, &dv], 1)?.matmul(lw.wqkv.dense()?)?;
            for (target, dy) in [(Target::Q, &dq), (Target::K, &dk), (Target::V, &dv)] {
                if let Some(e) = lora_bwd(&t.h, dy, target, &mut grads)? {
                    dh = (dh + e)?;
                }
            }
            dx = (dx_mid + self.rms_backward(&t.x_in, &lw.attn_norm, &dh)?)?;
        }
        Ok(grads)
    }
}
