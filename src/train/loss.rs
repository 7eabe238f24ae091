//! Losses on per-token log-probabilities. A loss maps each datum's target logprobs and its
//! `loss_fn_inputs` to a total loss, d loss / d logprob per target and metrics; the model
//! then runs one backward pass seeded with that gradient. Built-in losses are sums exactly
//! as Tinker defines them (nothing normalised). Any [`LossFunction`] (a wasm plugin, later)
//! drives the same backward pass.
//!
//! A loss sees only its datums: what `stable_reinforce` needs from sampling time arrives as
//! the `recorded:` inputs ([`RECORDED_LOGPROBS`], [`RECORDED_SAMPLED`]), which the server
//! fills from its own record (`api::tinker::provenance`) and never accepts from a client.

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
    Gspo,
    StableReinforce,
}

impl BuiltinLoss {
    pub const ALL: [BuiltinLoss; 7] = [
        BuiltinLoss::CrossEntropy,
        BuiltinLoss::ImportanceSampling,
        BuiltinLoss::Ppo,
        BuiltinLoss::Cispo,
        BuiltinLoss::Dro,
        BuiltinLoss::Gspo,
        BuiltinLoss::StableReinforce,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinLoss::CrossEntropy => "cross_entropy",
            BuiltinLoss::ImportanceSampling => "importance_sampling",
            BuiltinLoss::Ppo => "ppo",
            BuiltinLoss::Cispo => "cispo",
            BuiltinLoss::Dro => "dro",
            BuiltinLoss::Gspo => "gspo",
            BuiltinLoss::StableReinforce => "stable_reinforce",
        }
    }

    /// Whether the loss reads what the server recorded at sampling time, so a request's
    /// provenance spans must be resolved before it runs.
    pub fn needs_provenance(self) -> bool {
        self == BuiltinLoss::StableReinforce
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
/// `stable_reinforce`: weight of the KL estimate between the sampler and the learner.
pub const DEFAULT_KL_COEFF: f64 = 0.05;
/// `stable_reinforce`: importance weights are truncated at this ratio.
pub const DEFAULT_MAX_RATIO: f64 = 2.0;

/// Loss inputs the server fills in itself; a client may not send a name with this prefix.
pub const RECORDED_PREFIX: &str = "recorded:";
/// Per target, the sampler's logprob of that token as recorded when it was sampled (0 where
/// the target is not a sampled token).
pub const RECORDED_LOGPROBS: &str = "recorded:sampler_logprobs";
/// Per target, 1 where it is a sampled token (a `SampledProvenanceSpan`), 0 where it is a
/// prompt token.
pub const RECORDED_SAMPLED: &str = "recorded:sampled";

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

/// The numbers a loss's config may set, each checked once per request.
struct Params {
    lo: f64,
    hi: f64,
    beta: f64,
    kl_coeff: f64,
    max_ratio: f64,
}

impl Params {
    /// The keys `loss` reads; others are ignored, as before (a plugin may share a config).
    fn of(loss: BuiltinLoss, config: &LossConfig) -> Result<Self> {
        use BuiltinLoss::*;
        let uses = |losses: &[BuiltinLoss]| losses.contains(&loss);
        let get = |key, default, used| {
            if used {
                number(config, key, default)
            } else {
                Ok(default)
            }
        };
        let clipped = uses(&[Ppo, Cispo, Gspo]);
        let p = Params {
            lo: get("clip_low_threshold", DEFAULT_CLIP_LOW, clipped)?,
            hi: get("clip_high_threshold", DEFAULT_CLIP_HIGH, clipped)?,
            beta: get("beta", DEFAULT_DRO_BETA, uses(&[Dro]))?,
            kl_coeff: get("kl_coeff", DEFAULT_KL_COEFF, uses(&[StableReinforce]))?,
            max_ratio: get("max_ratio", DEFAULT_MAX_RATIO, uses(&[StableReinforce]))?,
        };
        if p.lo > p.hi {
            return Err(Error::invalid(
                "loss_fn_config",
                format!("clip_low_threshold {} > clip_high_threshold {}", p.lo, p.hi),
            ));
        }
        if p.kl_coeff < 0.0 {
            return Err(Error::invalid(
                "loss_fn_config.kl_coeff",
                format!("{} is negative", p.kl_coeff),
            ));
        }
        if p.max_ratio <= 0.0 {
            return Err(Error::invalid(
                "loss_fn_config.max_ratio",
                format!("{} is not positive", p.max_ratio),
            ));
        }
        Ok(p)
    }
}

/// What one datum adds to a request's totals.
#[derive(Default)]
struct Tally {
    loss: f64,
    /// Tokens whose advantage is not 0 and whose ratio the loss clipped or truncated.
    clipped: f64,
    /// `stable_reinforce`: sampled tokens, the KL estimate's sum, the largest ratio.
    sampled: f64,
    kl: f64,
    ratio_max: Option<f64>,
    /// `gspo`: the datum's sequence ratio (when its mask marks any token).
    seq_ratio: Option<f64>,
}

impl LossFunction for BuiltinLoss {
    fn compute(&self, data: &[LossDatum], config: &LossConfig) -> Result<LossOutput> {
        let p = Params::of(*self, config)?;
        let mut total = Tally::default();
        let mut grads = Vec::with_capacity(data.len());
        let mut elementwise = Vec::with_capacity(data.len());
        let (mut ratio_max, mut seq_min, mut seq_max) = (None::<f64>, None::<f64>, None::<f64>);
        for (i, d) in data.iter().enumerate() {
            let mut g = vec![0f32; d.logprobs.len()];
            let mut el = vec![0f32; d.len];
            if *self != BuiltinLoss::CrossEntropy && d.k != 1 {
                return Err(Error::invalid(
                    format!("data[{i}].loss_fn_inputs.target_tokens"),
                    format!("{} takes [N] targets, not [N, K]", self.name()),
                ));
            }
            let t = match self {
                BuiltinLoss::CrossEntropy => cross_entropy(d, i, &mut g, &mut el)?,
                BuiltinLoss::Gspo => gspo(d, i, &p, &mut g, &mut el)?,
                BuiltinLoss::StableReinforce => stable_reinforce(d, i, &p, &mut g, &mut el)?,
                _ => per_token(*self, d, i, &p, &mut g, &mut el)?,
            };
            total.loss += t.loss;
            total.clipped += t.clipped;
            total.sampled += t.sampled;
            total.kl += t.kl;
            let max = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.max(b)));
            if let Some(r) = t.ratio_max {
                ratio_max = max(ratio_max, r);
            }
            if let Some(s) = t.seq_ratio {
                seq_max = max(seq_max, s);
                seq_min = Some(seq_min.map_or(s, |m| m.min(s)));
            }
            grads.push(g);
            elementwise.push(el);
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("loss:sum".to_owned(), total.loss);
        let mut put = |k: &str, v: f64| metrics.insert(k.to_owned(), v);
        match self {
            BuiltinLoss::Ppo | BuiltinLoss::Cispo => {
                put("clipped_tokens:sum", total.clipped);
            }
            BuiltinLoss::Gspo => {
                put("clipped_tokens:sum", total.clipped);
                if let (Some(lo), Some(hi)) = (seq_min, seq_max) {
                    put("sequence_ratio:min", lo);
                    put("sequence_ratio:max", hi);
                }
            }
            BuiltinLoss::StableReinforce => {
                put("truncated_tokens:sum", total.clipped);
                put("sampled_tokens:sum", total.sampled);
                put("kl_sample_train:sum", total.kl);
                if let Some(r) = ratio_max {
                    put("importance_ratio:max", r);
                }
            }
            _ => {}
        }
        Ok(LossOutput {
            loss: total.loss,
            grads,
            metrics,
            elementwise: Some(elementwise),
        })
    }
}

/// `−Σ w·lp`, over every target (K of them per position with `[N, K]` targets).
fn cross_entropy(d: &LossDatum, i: usize, g: &mut [f32], el: &mut [f32]) -> Result<Tally> {
    let w = floats(d, i, "weights")?;
    let mut t = Tally::default();
    for j in 0..d.logprobs.len() {
        let wj = w.map_or(1.0, |w| w[j]) as f64;
        let l = -wj * d.logprobs[j] as f64;
        t.loss += l;
        el[j / d.k] += l as f32;
        g[j] = -wj as f32;
    }
    Ok(t)
}

/// Position `j`'s clip range: the per-token inputs where given, else the config's. An
/// inverted range is the client's error (and would make `clamp` panic).
fn bounds(
    p: &Params,
    lo_t: Option<&[f32]>,
    hi_t: Option<&[f32]>,
    i: usize,
    j: usize,
) -> Result<(f64, f64)> {
    let lo = lo_t.map_or(p.lo, |v| v[j] as f64);
    let hi = hi_t.map_or(p.hi, |v| v[j] as f64);
    if lo > hi {
        return Err(Error::invalid(
            format!("data[{i}].loss_fn_inputs.clip_low_threshold"),
            format!("position {j}: clip_low_threshold {lo} > clip_high_threshold {hi}"),
        ));
    }
    Ok((lo, hi))
}

/// The per-token RL losses: each token's loss depends on that token alone.
fn per_token(
    loss: BuiltinLoss,
    d: &LossDatum,
    i: usize,
    p: &Params,
    g: &mut [f32],
    el: &mut [f32],
) -> Result<Tally> {
    let q = required(d, i, "logprobs")?;
    let a = required(d, i, "advantages")?;
    let lo_t = floats(d, i, "clip_low_threshold")?;
    let hi_t = floats(d, i, "clip_high_threshold")?;
    let mut t = Tally::default();
    for j in 0..d.logprobs.len() {
        let (lp, q, a) = (d.logprobs[j] as f64, q[j] as f64, a[j] as f64);
        let (lo, hi) = bounds(p, lo_t, hi_t, i, j)?;
        let r = (lp - q).exp();
        let (l, dl) = match loss {
            BuiltinLoss::ImportanceSampling => (-r * a, -r * a),
            BuiltinLoss::Ppo => {
                let un = r * a;
                let cl = r.clamp(lo, hi) * a;
                // Strictly smaller: a token with A = 0 (a prompt position) is never clipped.
                if un <= cl {
                    (-un, -r * a)
                } else {
                    t.clipped += 1.0;
                    (-cl, 0.0)
                }
            }
            BuiltinLoss::Cispo => {
                let c = r.clamp(lo, hi);
                // Counted only where the clipped weight multiplies something, as in ppo.
                if c != r && a != 0.0 {
                    t.clipped += 1.0;
                }
                (-c * lp * a, -c * a)
            }
            BuiltinLoss::Dro => (
                -(lp * a - 0.5 * p.beta * (lp - q).powi(2)),
                -a + p.beta * (lp - q),
            ),
            other => {
                return Err(Error::invalid(
                    "loss_fn",
                    format!("{} is not a per-token loss", other.name()),
                ))
            }
        };
        t.loss += l;
        el[j] = l as f32;
        g[j] = dl as f32;
    }
    Ok(t)
}

/// GSPO-token: every token carries the datum's sequence ratio `s` (the geometric mean of
/// `p/q` over the tokens `sequence_ratio_mask` marks) as its value and the gradient of its
/// own logprob; then PPO's clipped objective, token by token.
fn gspo(d: &LossDatum, i: usize, p: &Params, g: &mut [f32], el: &mut [f32]) -> Result<Tally> {
    let q = required(d, i, "logprobs")?;
    let a = required(d, i, "advantages")?;
    let mask_field = format!("data[{i}].loss_fn_inputs.sequence_ratio_mask");
    let mask = floats(d, i, "sequence_ratio_mask")?.ok_or_else(|| {
        Error::invalid(
            &mask_field,
            "missing: gspo needs it to mark the tokens its sequence ratio is taken over \
             (nonzero on the sampled tokens, 0 elsewhere)",
        )
    })?;
    let lo_t = floats(d, i, "clip_low_threshold")?;
    let hi_t = floats(d, i, "clip_high_threshold")?;
    let (mut sum, mut count) = (0f64, 0usize);
    for j in 0..d.logprobs.len() {
        if mask[j] != 0.0 {
            sum += d.logprobs[j] as f64 - q[j] as f64;
            count += 1;
        }
    }
    let mut t = Tally::default();
    let s = if count > 0 {
        let s = (sum / count as f64).exp();
        t.seq_ratio = Some(s);
        s
    } else if a.iter().all(|&x| x == 0.0) {
        1.0
    } else {
        return Err(Error::invalid(
            &mask_field,
            "marks no token, so the sequence ratio is undefined, yet some advantages are \
             not 0; mark the tokens the ratio is taken over (the sampled ones)",
        ));
    };
    for j in 0..d.logprobs.len() {
        let a = a[j] as f64;
        let (lo, hi) = bounds(p, lo_t, hi_t, i, j)?;
        let un = s * a;
        let cl = s.clamp(lo, hi) * a;
        let (l, dl) = if un <= cl {
            (-un, -s * a)
        } else {
            t.clipped += 1.0;
            (-cl, 0.0)
        };
        t.loss += l;
        el[j] = l as f32;
        g[j] = dl as f32;
    }
    Ok(t)
}

/// StableReinforce as loraplex defines it (README): over the sampled tokens, REINFORCE
/// with the importance ratio to the recorded sampler logprob truncated at `max_ratio`, plus
/// `kl_coeff` times the k3 estimate of KL(sampler ‖ learner). Prompt tokens carry nothing
/// and must have advantage 0.
fn stable_reinforce(
    d: &LossDatum,
    i: usize,
    p: &Params,
    g: &mut [f32],
    el: &mut [f32],
) -> Result<Tally> {
    let a = required(d, i, "advantages")?;
    let (Some(q), Some(sampled)) = (
        floats(d, i, RECORDED_LOGPROBS)?,
        floats(d, i, RECORDED_SAMPLED)?,
    ) else {
        return Err(Error::invalid(
            format!("data[{i}].loss_fn_input_spans"),
            "missing: stable_reinforce needs provenance on every datum (Datum.with_provenance \
             naming sequences sampled with record_stability_info=True in this session)",
        ));
    };
    let mut t = Tally::default();
    for j in 0..d.logprobs.len() {
        let a = a[j] as f64;
        if sampled[j] == 0.0 {
            if a != 0.0 {
                return Err(Error::invalid(
                    format!("data[{i}].loss_fn_inputs.advantages"),
                    format!(
                        "position {j} is a prompt token (no SampledProvenanceSpan covers it) \
                         but has advantage {a}; stable_reinforce trains sampled tokens only"
                    ),
                ));
            }
            continue;
        }
        let x = d.logprobs[j] as f64 - q[j] as f64;
        let r = x.exp();
        let w = r.min(p.max_ratio);
        if r > p.max_ratio && a != 0.0 {
            t.clipped += 1.0;
        }
        // k3 = r − 1 − log r ≥ 0, unbiased for KL(q ‖ p) on tokens drawn from q.
        let kl = x.exp_m1() - x;
        let l = -w * a + p.kl_coeff * kl;
        t.loss += l;
        t.sampled += 1.0;
        t.kl += kl;
        t.ratio_max = Some(t.ratio_max.map_or(r, |m| m.max(r)));
        el[j] = l as f32;
        g[j] = (-w * a + p.kl_coeff * x.exp_m1()) as f32;
    }
    Ok(t)
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
