//! Loss plugins (`loraplex:plugin/loss-plugin`): the Rust-side batch types,
//! the conversion to and from the WIT types, one call in a fresh store, and
//! the checks on what the plugin returns. It must never pass a plugin's
//! output on unchecked: gradient shapes, finiteness and metric keys are all
//! verified here.

use std::collections::BTreeMap;

use wasmtime::component::InstancePre;
use wasmtime::Store;

use super::error::PluginError;
use super::limits::{PluginLimits, MAX_METRIC_KEY_LEN};
use super::sandbox::{call_error, PluginState};
use super::types::ConfigValue;

mod wit {
    wasmtime::component::bindgen!({ world: "loss-plugin", path: "wit" });
}

use wit::exports::loraplex::plugin::loss as wit_loss;
use wit::loraplex::plugin::types as wit_types;

pub(crate) use wit::LossPluginPre;

/// One datum of a batch, as the training engine has it.
#[derive(Debug, Clone, PartialEq)]
pub struct LossDatum {
    /// The learner's log-probability of each target token.
    pub logprobs: Vec<f32>,
    /// The datum's `loss_fn_inputs`.
    pub inputs: Vec<NamedTensor>,
}

/// A named input tensor (`advantages`, `logprobs`, `target_tokens`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    /// Dimensions; empty means 1-D (as in the Tinker API).
    pub shape: Vec<u64>,
    pub data: TensorData,
}

/// A tensor's values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NamedTensor {
    /// A 1-D f32 tensor.
    pub fn f32(name: &str, values: Vec<f32>) -> Self {
        NamedTensor {
            name: name.to_string(),
            shape: vec![values.len() as u64],
            data: TensorData::F32(values),
        }
    }

    /// A 1-D i64 tensor.
    pub fn i64(name: &str, values: Vec<i64>) -> Self {
        NamedTensor {
            name: name.to_string(),
            shape: vec![values.len() as u64],
            data: TensorData::I64(values),
        }
    }
}

/// What a loss plugin computed, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// Total loss over the batch.
    pub loss: f64,
    /// d loss / d logprob, one vector per datum, shaped like its logprobs.
    pub grads: Vec<Vec<f32>>,
    /// `name:reduction` → value; always holds `loss:sum`.
    pub metrics: BTreeMap<String, f64>,
}

/// The reductions the Tinker SDK understands.
const REDUCTIONS: [&str; 7] = ["sum", "mean", "min", "max", "slack", "hash2", "unique"];

pub(crate) fn wit_config(
    config: &BTreeMap<String, ConfigValue>,
) -> Vec<(String, wit_types::ConfigValue)> {
    config
        .iter()
        .map(|(k, v)| {
            let v = match v {
                ConfigValue::Number(x) => wit_types::ConfigValue::Number(*x),
                ConfigValue::Text(s) => wit_types::ConfigValue::Text(s.clone()),
            };
            (k.clone(), v)
        })
        .collect()
}

fn check_inputs(data: &[LossDatum]) -> Result<(), PluginError> {
    for (i, d) in data.iter().enumerate() {
        for t in &d.inputs {
            let expected = if t.shape.is_empty() {
                Some(t.data.len() as u64)
            } else {
                t.shape.iter().try_fold(1u64, |acc, &n| acc.checked_mul(n))
            };
            if expected != Some(t.data.len() as u64) {
                return Err(PluginError::BadInput {
                    what: format!(
                        "datum {i}: tensor `{}` has shape {:?} but {} values",
                        t.name,
                        t.shape,
                        t.data.len()
                    ),
                });
            }
        }
    }
    Ok(())
}

fn wit_data(data: &[LossDatum]) -> Vec<wit_loss::Datum> {
    data.iter()
        .map(|d| wit_loss::Datum {
            logprobs: d.logprobs.clone(),
            inputs: d
                .inputs
                .iter()
                .map(|t| wit_types::NamedTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: match &t.data {
                        TensorData::F32(v) => wit_types::TensorData::Float32(v.clone()),
                        TensorData::I64(v) => wit_types::TensorData::Int64(v.clone()),
                    },
                })
                .collect(),
        })
        .collect()
}

/// Runs one loss call in a fresh store and checks its output.
pub(crate) fn compute(
    pre: &LossPluginPre<PluginState>,
    mut store: Store<PluginState>,
    limits: &PluginLimits,
    data: &[LossDatum],
    config: &BTreeMap<String, ConfigValue>,
) -> Result<LossOutput, PluginError> {
    check_inputs(data)?;
    let wit_data = wit_data(data);
    let wit_config = wit_config(config);
    let plugin = pre
        .instantiate(&mut store)
        .map_err(|e| call_error(&store, e))?;
    let result = plugin
        .loraplex_plugin_loss()
        .call_compute(&mut store, &wit_data, &wit_config)
        .map_err(|e| call_error(&store, e))?;
    let out = result.map_err(|message| PluginError::PluginFailed { message })?;
    validate(out, data, limits)
}

fn bad(what: String) -> PluginError {
    PluginError::BadOutput { what }
}

fn validate(
    out: wit_loss::LossOutput,
    data: &[LossDatum],
    limits: &PluginLimits,
) -> Result<LossOutput, PluginError> {
    if !out.loss.is_finite() {
        return Err(bad(format!("loss is {}", out.loss)));
    }
    if out.grads.len() != data.len() {
        return Err(bad(format!(
            "gradients for {} datums, the batch has {}",
            out.grads.len(),
            data.len()
        )));
    }
    for (i, (g, d)) in out.grads.iter().zip(data).enumerate() {
        if g.len() != d.logprobs.len() {
            return Err(bad(format!(
                "gradient of datum {i} has {} values, its logprobs have {}",
                g.len(),
                d.logprobs.len()
            )));
        }
        if let Some(t) = g.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!(
                "gradient of datum {i} at token {t} is {}",
                g[t]
            )));
        }
    }
    if out.metrics.len() > limits.max_metrics {
        return Err(bad(format!(
            "{} metrics, the limit is {}",
            out.metrics.len(),
            limits.max_metrics
        )));
    }
    let mut metrics = BTreeMap::new();
    for (key, value) in out.metrics {
        check_metric_key(&key)?;
        if !value.is_finite() {
            return Err(bad(format!("metric `{key}` is {value}")));
        }
        if metrics.insert(key.clone(), value).is_some() {
            return Err(bad(format!("metric `{key}` appears twice")));
        }
    }
    // `loss:sum` is mandatory in the API; a plugin that leaves it out gets
    // its loss.
    metrics.entry("loss:sum".to_string()).or_insert(out.loss);
    Ok(LossOutput {
        loss: out.loss,
        grads: out.grads,
        metrics,
    })
}

fn check_metric_key(key: &str) -> Result<(), PluginError> {
    if key.len() > MAX_METRIC_KEY_LEN {
        let head: String = key.chars().take(32).collect();
        return Err(bad(format!(
            "metric key `{head}...` is {} bytes, the limit is {MAX_METRIC_KEY_LEN}",
            key.len()
        )));
    }
    let well_formed = key.rsplit_once(':').is_some_and(|(name, reduction)| {
        !name.is_empty()
            && REDUCTIONS.contains(&reduction)
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':'))
    });
    if !well_formed {
        return Err(bad(format!(
            "metric key `{key}` is not `name:reduction` with reduction one of {}",
            REDUCTIONS.join(", ")
        )));
    }
    Ok(())
}

/// Checks a component's loss export against the world.
pub(crate) fn prepare(
    pre: InstancePre<PluginState>,
) -> wasmtime::Result<LossPluginPre<PluginState>> {
    LossPluginPre::new(pre)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_keys_must_name_a_known_reduction() {
        assert!(check_metric_key("loss:sum").is_ok());
        assert!(check_metric_key("clip/fraction:mean").is_ok());
        assert!(check_metric_key("loss").is_err());
        assert!(check_metric_key(":sum").is_err());
        assert!(check_metric_key("loss:median").is_err());
        assert!(check_metric_key("bad name:sum").is_err());
        assert!(check_metric_key(&format!("{}:sum", "a".repeat(200))).is_err());
    }

    #[test]
    fn shapes_must_match_values() {
        let mut d = LossDatum {
            logprobs: vec![0.0; 3],
            inputs: vec![NamedTensor::f32("advantages", vec![1.0; 3])],
        };
        assert!(check_inputs(std::slice::from_ref(&d)).is_ok());
        d.inputs[0].shape = vec![2, 2];
        assert!(matches!(
            check_inputs(&[d]),
            Err(PluginError::BadInput { .. })
        ));
    }
}
