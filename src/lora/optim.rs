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
                let g = if clip != 1.0 {
                    g.affine(clip, 0.0)?
                } else {
                    g.clone()
                };
                let mom = match self.moments.remove(&(*site, which)) {
                    Some(m) => m,
                    None => Moments {
                        m: g.zeros_like()?,
                        v: g.zeros_like()?,
                    },
                };
                let m = ((mom.m.affine(p.beta1, 0.0))? + g.affine(1.0 - p.beta1, 0.0)?)?;
                let v = ((mom.v.affine(p.beta2, 0.0))? + g.sqr()?.affine(1.0 - p.beta2, 0.0)?)?;
                // torch: p ← p(1 − lr·wd); p ← p − lr · m̂ / (√v̂ + eps)
                let decayed = param.affine(1.0 - p.learning_rate * p.weight_decay, 0.0)?;
                let denom = (v.affine(1.0 / bc2, 0.0)?.sqrt()? + p.eps)?;
                let update = m.affine(p.learning_rate / bc1, 0.0)?.div(&denom)?;
                *param = (decayed - update)?;
                self.moments.insert((*site, which), Moments { m, v });
            }
        }
        Ok(StepReport {
            step: self.step,
            grad_norm,
            clipped: clip != 1.0,
        })
    }
}
