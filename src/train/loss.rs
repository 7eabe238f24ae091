//! Losses on per-token log-probabilities. A loss maps each datum's target logprobs and its
//! `loss_fn_inputs` to a total loss, d loss / d logprob per target and metrics; the model
//! then runs one backward pass seeded with that gradient. Built-in losses are sums exactly
//! as Tinker defines them (nothing normalised). Any [`LossFunction`] (a wasm plugin, later)
//! drives the same backward pass.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dtype", content = "data", rename_all = "lowercase")]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A named input tensor of a datum (`target_tokens`, `weights`, `advantages`...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorIn {
    pub shape: Vec<usize>,
    #[serde(flatten)]
    pub data: TensorData,
}

impl TensorIn {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        TensorIn {
            shape,
            data: TensorData::F32(data),
        }
    }
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        TensorIn {
            shape,
            data: TensorData::I64(data),
        }
    }
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub type LossInputs = BTreeMap<String, TensorIn>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigValue {
    Number(f64),
    Text(String),
}

impl From<f64> for ConfigValue {
    fn from(x: f64) -> Self {
        ConfigValue::Number(x)
    }
}

impl From<&str> for ConfigValue {
    fn from(s: &str) -> Self {
        ConfigValue::Text(s.to_string())
    }
}

pub type LossConfig = BTreeMap<String, ConfigValue>;

/// What a loss sees of one datum.
#[derive(Debug, Clone, Copy)]
pub struct LossDatum<'a> {
    /// Target logprobs, `[len · k]` row-major.
    pub logprobs: &'a [f32],
    pub len: usize,
    pub k: usize,
    pub inputs: &'a LossInputs,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    pub loss: f64,
    /// d loss / d logprob, one vector per datum shaped like its logprobs.
    pub grads: Vec<Vec<f32>>,
    /// `name:reduction` → value; always has `loss:sum`.
    pub metrics: BTreeMap<String, f64>,
    /// Per-token loss per datum (`[len]`), where the loss defines one.
    pub elementwise: Option<Vec<Vec<f32>>>,
}

pub trait LossFunction: Send + Sync {
    fn compute(&self, data: &[LossDatum], config: &LossConfig) -> Result<LossOutput>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinLoss {
    CrossEntropy,
    ImportanceSampling,
    Ppo,
    Cispo,
    Dro,
}

impl BuiltinLoss {
    pub const ALL: [BuiltinLoss; 5] = [
        BuiltinLoss::CrossEntropy,
        BuiltinLoss::ImportanceSampling,
        BuiltinLoss::Ppo,
        BuiltinLoss::Cispo,
        BuiltinLoss::Dro,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinLoss::CrossEntropy => "cross_entropy",
            BuiltinLoss::ImportanceSampling => "importance_sampling",
            BuiltinLoss::Ppo => "ppo",
            BuiltinLoss::Cispo => "cispo",
            BuiltinLoss::Dro => "dro",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == name)
            .ok_or_else(|| {
                Error::invalid(
                    "loss_fn",
                    format!(
                        "unknown loss {name:?}; built-in losses are {}",
                        Self::ALL.map(|l| l.name()).join(", ")
                    ),
                )
            })
    }
}

pub const DEFAULT_CLIP_LOW: f64 = 0.8;
pub const DEFAULT_CLIP_HIGH: f64 = 1.2;
pub const DEFAULT_DRO_BETA: f64 = 0.05;

fn number(config: &LossConfig, key: &str, default: f64) -> Result<f64> {
    match config.get(key) {
        None => Ok(default),
        Some(ConfigValue::Number(x)) if x.is_finite() => Ok(*x),
        Some(v) => Err(Error::invalid(
            format!("loss_fn_config.{key}"),
            format!("expected a finite number, got {v:?}"),
        )),
    }
}

/// Target token ids of a datum and their `k` (1 for `[N]`, K for `[N, K]`), validated
/// against the model input length `len`.
pub fn targets_of(inputs: &LossInputs, len: usize, field: &str) -> Result<(Vec<u32>, usize)> {
    let f = format!("{field}.loss_fn_inputs.target_tokens");
    let t = inputs
        .get("target_tokens")
        .ok_or_else(|| Error::invalid(&f, "missing"))?;
    let k = tensor_k(t, len, &f)?;
    let ids = match &t.data {
        TensorData::I64(v) => v,
        TensorData::F32(_) => return Err(Error::invalid(&f, "must be int64")),
    };
    let ids = ids
        .iter()
        .map(|&x| {
            u32::try_from(x)
                .map_err(|_| Error::invalid(&f, format!("token id {x} is negative or too large")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((ids, k))
}

/// Check a per-token tensor's shape (`[len]` or `[len, k]`, empty shape meaning 1-D) and
/// return its k.
fn tensor_k(t: &TensorIn, len: usize, field: &str) -> Result<usize> {
    let shape: Vec<usize> = if t.shape.is_empty() {
        vec![t.len()]
    } else {
        t.shape.clone()
    };
    let (lead, k) = match shape.as_slice() {
        [n] => (*n, 1),
        [n, k] => (*n, *k),
        s => {
            return Err(Error::invalid(
                field,
                format!("shape {s:?} must be [N] or [N, K]"),
            ))
        }
    };
    if lead != len {
        return Err(Error::invalid(
            field,
            format!("leading dimension {lead} differs from the model_input length {len}"),
        ));
    }
    if k == 0 || shape.iter().product::<usize>() != t.len() {
        return Err(Error::invalid(
            field,
            format!("shape {shape:?} does not match {} values", t.len()),
        ));
    }
    Ok(k)
}

/// A float input of a datum with the same shape as its targets.
fn floats<'a>(d: &'a LossDatum, i: usize, name: &str) -> Result<Option<&'a [f32]>> {
    let field = format!("data[{i}].loss_fn_inputs.{name}");
    let Some(t) = d.inputs.get(name) else {
        return Ok(None);
    };
    let k = tensor_k(t, d.len, &field)?;
    if k != d.k {
        return Err(Error::invalid(
            &field,
            format!("has {k} columns, target_tokens has {}", d.k),
        ));
    }
    match &t.data {
        TensorData::F32(v) => {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(&field, "contains NaN or infinity"));
            }
            Ok(Some(v.as_slice()))
        }
        TensorData::I64(_) => Err(Error::invalid(&field, "must be float32")),
    }
}

fn required<'a>(d: &'a LossDatum, i: usize, name: &str) -> Result<&'a [f32]> {
    floats(d, i, name)?
        .ok_or_else(|| Error::invalid(format!("data[{i}].loss_fn_inputs.{name}"), "missing"))
}

impl LossFunction for BuiltinLoss {
    fn compute(&self, data: &[LossDatum], config: &LossConfig) -> Result<LossOutput> {
        let lo = number(config, "clip_low_threshold", DEFAULT_CLIP_LOW)?;
        let hi = number(config, "clip_high_threshold", DEFAULT_CLIP_HIGH)?;
        let beta = number(config, "beta", DEFAULT_DRO_BETA)?;
        if lo > hi {
            return Err(Error::invalid(
                "loss_fn_config",
                format!("clip_low_threshold {lo} > clip_high_threshold {hi}"),
            ));
        }
        let mut total = 0f64;
        let mut grads = Vec::with_capacity(data.len());
        let mut elementwise = Vec::with_capacity(data.len());
        let mut clipped = 0f64;
        for (i, d) in data.iter().enumerate() {
            let n = d.logprobs.len();
            let mut g = vec![0f32; n];
            let mut el = vec![0f32; d.len];
            if *self == BuiltinLoss::CrossEntropy {
                let w = floats(d, i, "weights")?;
                for j in 0..n {
                    let wj = w.map_or(1.0, |w| w[j]) as f64;
                    let l = -wj * d.logprobs[j] as f64;
                    total += l;
                    el[j / d.k] += l as f32;
                    g[j] = -wj as f32;
                }
            } else {
                if d.k != 1 {
                    return Err(Error::invalid(
                        format!("data[{i}].loss_fn_inputs.target_tokens"),
                        format!("{} takes [N] targets, not [N, K]", self.name()),
                    ));
                }
                let q = required(d, i, "logprobs")?;
                let a = required(d, i, "advantages")?;
                let lo_t = floats(d, i, "clip_low_threshold")?;
                let hi_t = floats(d, i, "clip_high_threshold")?;
                for j in 0..n {
                    let (lp, q, a) = (d.logprobs[j] as f64, q[j] as f64, a[j] as f64);
                    let (lo, hi) = (
                        lo_t.map_or(lo, |v| v[j] as f64),
                        hi_t.map_or(hi, |v| v[j] as f64),
                    );
                    let r = (lp - q).exp();
                    let (l, dl) = match self {
                        BuiltinLoss::ImportanceSampling => (-r * a, -r * a),
                        BuiltinLoss::Ppo => {
                            let un = r * a;
                            let cl = r.clamp(lo, hi) * a;
                            if un <= cl {
                                (-un, -r * a)
                            } else {
                                clipped += 1.0;
                                (-cl, 0.0)
                            }
                        }
                        BuiltinLoss::Cispo => {
                            let c = r.clamp(lo, hi);
                            if c != r {
                                clipped += 1.0;
                            }
                            (-c * lp * a, -c * a)
                        }
                        BuiltinLoss::Dro => (
                            -(lp * a - 0.5 * beta * (lp - q).powi(2)),
                            -a + beta * (lp - q),
                        ),
                        BuiltinLoss::CrossEntropy => unreachable!("handled above"),
                    };
                    total += l;
                    el[j] = l as f32;
                    g[j] = dl as f32;
                }
            }
            grads.push(g);
            elementwise.push(el);
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("loss:sum".to_owned(), total);
        if matches!(self, BuiltinLoss::Ppo | BuiltinLoss::Cispo) {
            metrics.insert("clipped_tokens:sum".to_owned(), clipped);
        }
        Ok(LossOutput {
            loss: total,
            grads,
            metrics,
            elementwise: Some(elementwise),
        })
    }
}

/// Check a loss's output against the data it was given (lengths, finiteness, metric keys):
/// the model must never be seeded by a malformed gradient, built-in or plugin.
pub fn validate_output(out: &LossOutput, data: &[LossDatum]) -> Result<()> {
    if out.grads.len() != data.len() {
        return Err(Error::invalid(
            "loss output",
            format!("{} gradients for {} data", out.grads.len(), data.len()),
        ));
    }
    for (i, (g, d)) in out.grads.iter().zip(data).enumerate() {
        if g.len() != d.logprobs.len() {
            return Err(Error::invalid(
                format!("loss output gradient[{i}]"),
                format!("has {} entries, expected {}", g.len(), d.logprobs.len()),
            ));
        }
        if g.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid(
                format!("loss output gradient[{i}]"),
                "contains NaN or infinity",
            ));
        }
    }
    if !out.loss.is_finite() {
        return Err(Error::invalid("loss output", "loss is NaN or infinite"));
    }
    for k in out.metrics.keys() {
        if k.matches(':').count() != 1 {
            return Err(Error::invalid(
                "loss output metrics",
                format!("key {k:?} is not name:reduction"),
            ));
        }
    }
    Ok(())
}
