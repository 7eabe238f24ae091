//! AdamW for one adapter, matching `torch.optim.AdamW` (decoupled weight decay, bias
//! correction) with Tinker's `AdamParams`, plus optional global-norm gradient clipping.
//! Owns the per-adapter moment estimates and step count; nothing else.

use super::{LoraGrads, LoraWeights, Site};
use crate::error::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Tinker's `AdamParams`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamParams {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// ≤ 0 disables clipping.
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            grad_clip_norm: 0.0,
        }
    }
}

impl AdamParams {
    pub fn validate(&self) -> Result<()> {
        let f = |name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(Error::invalid(
                    format!("adam_params.{name}"),
                    "out of range",
                ))
            }
        };
        f(
            "learning_rate",
            self.learning_rate.is_finite() && self.learning_rate >= 0.0,
        )?;
        f("beta1", (0.0..1.0).contains(&self.beta1))?;
        f("beta2", (0.0..1.0).contains(&self.beta2))?;
        f("eps", self.eps.is_finite() && self.eps >= 0.0)?;
        f(
            "weight_decay",
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
        )?;
        f("grad_clip_norm", self.grad_clip_norm.is_finite())?;
        Ok(())
    }
}

/// First and second moments of one tensor.
#[derive(Debug, Clone)]
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

#[derive(Debug, Clone, Default)]
pub struct AdamState {
    pub step: u64,
    /// Keyed by (site, 0 for A / 1 for B).
    pub moments: BTreeMap<(Site, u8), Moments>,
}

/// What a step did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    pub grad_norm: f64,
    pub clipped: bool,
}

impl AdamState {
    /// Apply `grads` to `weights` and advance the step count.
    pub fn step(
        &mut self,
        weights: &mut LoraWeights,
        grads: &LoraGrads,
        p: &AdamParams,
    ) -> Result<StepReport> {
        p.validate()?;
        let grad_norm = grads.norm()?;
        let clip = if p.grad_clip_norm > 0.0 && grad_norm > p.grad_clip_norm {
            p.grad_clip_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (site, pair) in weights.pairs.iter_mut() {
            let Some((ga, gb)) = grads.pairs.get(site) else {
                continue;
            };
            for (which, param, g) in [(0u8, &mut pair.a, ga), (1u8, &mut pair.b, gb)] {
                let mom = self.moments.remove(&(*site, which));
                let (new, mom) = match host_update(param, g, mom.as_ref(), p, clip, bc1, bc2)? {
                    Some(done) => done,
                    None => tensor_update(param, g, mom, p, clip, bc1, bc2)?,
                };
                *param = new;
                self.moments.insert((*site, which), mom);
            }
        }
        Ok(StepReport {
            step: self.step,
            grad_norm,
            clipped: clip != 1.0,
        })
    }
}

/// One parameter's AdamW update with candle ops (any device).
fn tensor_update(
    param: &Tensor,
    g: &Tensor,
    mom: Option<Moments>,
    p: &AdamParams,
    clip: f64,
    bc1: f64,
    bc2: f64,
) -> Result<(Tensor, Moments)> {
    let g = if clip != 1.0 {
        g.affine(clip, 0.0)?
    } else {
        g.clone()
    };
    let mom = match mom {
        Some(m) => m,
        None => Moments {
            m: g.zeros_like()?,
            v: g.zeros_like()?,
        },
    };
    let m = ((mom.m.affine(p.beta1, 0.0))? + g.affine(1.0 - p.beta1, 0.0)?)?;
    let v = ((mom.v.affine(p.beta2, 0.0))? + g.sqr()?.affine(1.0 - p.beta2, 0.0)?)?;
    let decayed = param.affine(1.0 - p.learning_rate * p.weight_decay, 0.0)?;
    let denom = (v.affine(1.0 / bc2, 0.0)?.sqrt()? + p.eps)?;
    let update = m.affine(p.learning_rate / bc1, 0.0)?.div(&denom)?;
    Ok(((decayed - update)?, Moments { m, v }))
}

/// The same update in one pass over the values, for contiguous f32 tensors on the CPU
/// (None otherwise): the op-by-op version allocates a dozen tensors per parameter, and an
/// adapter on every site has hundreds of parameters. Same f32 arithmetic, same order.
fn host_update(
    param: &Tensor,
    g: &Tensor,
    mom: Option<&Moments>,
    p: &AdamParams,
    clip: f64,
    bc1: f64,
    bc2: f64,
) -> Result<Option<(Tensor, Moments)>> {
    use crate::view::HostView;
    let host = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let all = [Some(param), Some(g), mom.map(|m| &m.m), mom.map(|m| &m.v)];
    if !all.iter().flatten().all(|t| host(t) && t.is_contiguous())
        || g.dims() != param.dims()
        || mom.is_some_and(|m| m.m.dims() != param.dims() || m.v.dims() != param.dims())
    {
        return Ok(None);
    }
    let (pv, gv) = (HostView::new(param)?, HostView::new(g)?);
    let moments = match mom {
        Some(m) => Some((HostView::new(&m.m)?, HostView::new(&m.v)?)),
        None => None,
    };
    let n = pv.slice().len();
    let (mut w, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    // f32 coefficients, as candle's `affine` applies them.
    let (clip, b1, b1c, b2, b2c) = (
        clip as f32,
        p.beta1 as f32,
        (1.0 - p.beta1) as f32,
        p.beta2 as f32,
        (1.0 - p.beta2) as f32,
    );
    let decay = (1.0 - p.learning_rate * p.weight_decay) as f32;
    let (inv_bc2, step, eps) = (
        (1.0 / bc2) as f32,
        (p.learning_rate / bc1) as f32,
        p.eps as f32,
    );
    for i in 0..n {
        let gi = if clip != 1.0 {
            gv.slice()[i] * clip
        } else {
            gv.slice()[i]
        };
        let (m0, v0) = match &moments {
            Some((mm, vv)) => (mm.slice()[i], vv.slice()[i]),
            None => (0.0, 0.0),
        };
        let mi = m0 * b1 + gi * b1c;
        let vi = v0 * b2 + (gi * gi) * b2c;
        let denom = (vi * inv_bc2).sqrt() + eps;
        w[i] = pv.slice()[i] * decay - (mi * step) / denom;
        m[i] = mi;
        v[i] = vi;
    }
    let (dims, dev) = (param.dims(), param.device());
    Ok(Some((
        Tensor::from_vec(w, dims, dev)?,
        Moments {
            m: Tensor::from_vec(m, dims, dev)?,
            v: Tensor::from_vec(v, dims, dev)?,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;
    use candle_core::Device;

    fn rand(dims: &[usize], seed: u64) -> Tensor {
        let mut r = SplitMix64::new(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.normal()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    }

    #[test]
    fn one_pass_update_equals_the_op_by_op_update() -> Result<()> {
        let p = AdamParams {
            learning_rate: 3e-3,
            weight_decay: 0.1,
            ..Default::default()
        };
        let dims = [8, 37];
        let (w, g1, g2) = (rand(&dims, 1), rand(&dims, 2), rand(&dims, 3));
        // A first step (no moments yet) with clipping, then a second without.
        let (bc1, bc2) = (1.0 - p.beta1, 1.0 - p.beta2);
        let (hw, hm) = host_update(&w, &g1, None, &p, 0.5, bc1, bc2)?.expect("host path");
        let (tw, tm) = tensor_update(&w, &g1, None, &p, 0.5, bc1, bc2)?;
        let (bc1, bc2) = (1.0 - p.beta1.powi(2), 1.0 - p.beta2.powi(2));
        let (hw2, hm2) = host_update(&hw, &g2, Some(&hm), &p, 1.0, bc1, bc2)?.expect("host");
        let (tw2, tm2) = tensor_update(&tw, &g2, Some(tm), &p, 1.0, bc1, bc2)?;
        for (a, b) in [(&hw2, &tw2), (&hm2.m, &tm2.m), (&hm2.v, &tm2.v)] {
            let (a, b) = (flat(a), flat(b));
            let err = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err <= 1e-6, "differ by {err}");
        }
        assert_ne!(flat(&hw2), flat(&w), "the step moved the weights");
        Ok(())
    }
}
