//! Training operations: one multi-adapter `forward_backward` over many requests (each with
//! its own adapter, data and loss), and the optimizer step. Ties model, losses and adapters
//! together; knows nothing of HTTP, queues or persistence.

pub mod loss;

use crate::error::{Error, Result};
use crate::lora::{LoraGrads, LoraWeights};
use crate::model::{BaseModel, CheckedRow, TrainBatch};
use loss::{validate_output, LossConfig, LossDatum, LossFunction, LossInputs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One training example: the model input and the loss's per-token inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Datum {
    pub model_input: Vec<u32>,
    pub loss_fn_inputs: LossInputs,
}

impl Datum {
    /// Check the datum against the model, naming it `field` in errors: its token ids, its
    /// target ids and `k` (parsed here, once), every loss input's leading dimension. The
    /// only check a datum gets; what passes is kept as a [`CheckedDatum`].
    pub fn check(self, model: &BaseModel, field: &str) -> Result<CheckedDatum> {
        let Datum {
            model_input,
            loss_fn_inputs,
        } = self;
        let len = model_input.len();
        let row = model.check_train_row(field, model_input, || {
            loss::targets_of(&loss_fn_inputs, len, field)
        })?;
        for (name, t) in &loss_fn_inputs {
            let lead = t.shape.first().copied().unwrap_or(t.len());
            if lead != len {
                return Err(Error::invalid(
                    format!("{field}.loss_fn_inputs.{name}"),
                    format!("leading dimension {lead} differs from the model_input length {len}"),
                ));
            }
        }
        Ok(CheckedDatum {
            row,
            loss_fn_inputs,
        })
    }

    /// Next-token cross-entropy on `tokens`: inputs `tokens[..n-1]`, targets `tokens[1..]`,
    /// weight 1 on every target at or after `prompt_len - 1` (0 before).
    pub fn next_token(tokens: &[u32], prompt_len: usize) -> Self {
        let n = tokens.len().saturating_sub(1);
        let w: Vec<f32> = (0..n)
            .map(|i| if i + 1 >= prompt_len { 1.0 } else { 0.0 })
            .collect();
        let mut inputs = LossInputs::new();
        inputs.insert(
            "target_tokens".into(),
            loss::TensorIn::i64(vec![n], tokens[1..].iter().map(|&t| t as i64).collect()),
        );
        inputs.insert("weights".into(), loss::TensorIn::f32(vec![n], w));
        Datum {
            model_input: tokens[..n].to_vec(),
            loss_fn_inputs: inputs,
        }
    }
}

/// A datum that passed [`Datum::check`] against a base model: its tokens and parsed target
/// ids as the model accepted them ([`CheckedRow`]), and its loss inputs. Made once, when
/// its request is submitted; the training pass takes it as it is.
#[derive(Debug, Clone)]
pub struct CheckedDatum {
    row: CheckedRow,
    loss_fn_inputs: LossInputs,
}

impl CheckedDatum {
    pub fn row(&self) -> &CheckedRow {
        &self.row
    }

    pub fn model_input(&self) -> &[u32] {
        self.row.tokens()
    }

    /// Target ids, `[len, k]` row-major.
    pub fn targets(&self) -> &[u32] {
        self.row.targets()
    }

    /// Candidates per position (1 for `[N]` targets, K for `[N, K]`).
    pub fn k(&self) -> usize {
        self.row.k()
    }

    pub fn loss_fn_inputs(&self) -> &LossInputs {
        &self.loss_fn_inputs
    }

    /// The datum as it was submitted.
    pub fn into_datum(self) -> Datum {
        Datum {
            model_input: self.row.into_tokens(),
            loss_fn_inputs: self.loss_fn_inputs,
        }
    }
}

/// Check a request's data: at least one datum, each as [`Datum::check`] (named `data[i]`).
pub fn check_data(model: &BaseModel, data: Vec<Datum>) -> Result<Vec<CheckedDatum>> {
    if data.is_empty() {
        return Err(Error::invalid("data", "no data"));
    }
    data.into_iter()
        .enumerate()
        .map(|(i, d)| d.check(model, &format!("data[{i}]")))
        .collect()
}

/// One request's share of a batch.
pub struct Work<'a> {
    pub adapter: Option<usize>,
    /// Checked against the model the pass runs on ([`check_data`]).
    pub data: &'a [CheckedDatum],
    pub loss: &'a dyn LossFunction,
    pub config: &'a LossConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkResult {
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
    /// Per datum, target logprobs `[len · k]`.
    pub logprobs: Vec<Vec<f32>>,
    pub k: Vec<usize>,
    pub elementwise: Option<Vec<Vec<f32>>>,
    /// Sum of the data's `weights` input (0 where a datum has none): the tokens the loss
    /// counted, for the built-in losses. Kept with the result so a mean per token renders
    /// the same whenever the result is read (the REST `/fwdbwd` reports `loss / weight_sum`).
    #[serde(default)]
    pub weight_sum: f64,
}

/// Sum of every datum's f32 `weights` input, in data and token order.
pub fn weight_sum(data: &[CheckedDatum]) -> f64 {
    data.iter()
        .filter_map(|d| match d.loss_fn_inputs.get("weights").map(|t| &t.data) {
            Some(loss::TensorData::F32(w)) => Some(w.iter().map(|&x| x as f64).sum::<f64>()),
            _ => None,
        })
        .sum()
}

/// Run every request's data through the model in one batch, compute each request's loss
/// and (unless `forward_only`) one backward pass. A request whose adapter slot or loss is
/// bad fails alone; the others proceed. Returns per-request results and per-adapter gradients.
pub fn forward_backward(
    model: &BaseModel,
    adapters: &[&LoraWeights],
    work: &[Work],
    forward_only: bool,
) -> Result<(Vec<Result<WorkResult>>, Vec<LoraGrads>)> {
    let _span =
        tracing::info_span!("forward_backward", requests = work.len(), forward_only).entered();
    // Data was checked at submission; here only each request's adapter slot. A request
    // that fails it fails alone; the others enter the batch.
    let mut results: Vec<Option<Result<WorkResult>>> = work
        .iter()
        .map(|w| check_work(adapters, w).err().map(Err))
        .collect();
    let batch = TrainBatch::of_checked(
        work.iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .flat_map(|(w, _)| w.data.iter().map(move |d| (d.row(), w.adapter))),
    );
    if batch.is_empty() {
        let out = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::invalid("data", "empty"))))
            .collect();
        return Ok((out, vec![LoraGrads::default(); adapters.len()]));
    }
    let (lps, tape) = model.forward_train(&batch, adapters, !forward_only)?;
    let mut dlp: Vec<Vec<f32>> = lps.iter().map(|l| vec![0f32; l.len()]).collect();
    let mut next = 0;
    for (wi, w) in work.iter().enumerate() {
        if results[wi].is_some() {
            continue;
        }
        let first = next;
        let data: Vec<LossDatum> = w
            .data
            .iter()
            .enumerate()
            .map(|(j, d)| LossDatum {
                logprobs: &lps[first + j],
                len: d.model_input().len(),
                k: d.k(),
                inputs: d.loss_fn_inputs(),
            })
            .collect();
        next += data.len();
        let out = w
            .loss
            .compute(&data, w.config)
            .and_then(|o| validate_output(&o, &data).map(|_| o));
        results[wi] = Some(out.map(|o| {
            for (j, g) in o.grads.iter().enumerate() {
                dlp[first + j].copy_from_slice(g);
            }
            WorkResult {
                loss: o.loss,
                metrics: o.metrics,
                logprobs: lps[first..next].to_vec(),
                k: data.iter().map(|d| d.k).collect(),
                elementwise: o.elementwise,
                weight_sum: weight_sum(w.data),
            }
        }));
    }
    let grads = match tape {
        Some(tape) => model.backward(tape, &dlp, adapters)?,
        None => vec![LoraGrads::default(); adapters.len()],
    };
    let out = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::invalid("data", "not run"))))
        .collect();
    Ok((out, grads))
}

/// What a request needs besides its (already checked) data: some data, an adapter slot
/// that exists.
fn check_work(adapters: &[&LoraWeights], w: &Work) -> Result<()> {
    if w.data.is_empty() {
        return Err(Error::invalid("data", "no data"));
    }
    if let Some(a) = w.adapter {
        if a >= adapters.len() {
            return Err(Error::invalid("model_id", "unknown adapter"));
        }
    }
    Ok(())
}

/// An adapter being trained: weights, gradients accumulated since the last step, AdamW state.
#[derive(Debug, Clone)]
pub struct TrainableAdapter {
    pub weights: LoraWeights,
    pub grads: LoraGrads,
    pub optim: crate::lora::optim::AdamState,
}

impl TrainableAdapter {
    pub fn new(weights: LoraWeights) -> Self {
        TrainableAdapter {
            weights,
            grads: LoraGrads::default(),
            optim: Default::default(),
        }
    }

    pub fn accumulate(&mut self, g: LoraGrads) -> Result<()> {
        self.grads.merge(g)
    }

    /// Apply and clear the accumulated gradient.
    pub fn optim_step(
        &mut self,
        p: &crate::lora::optim::AdamParams,
    ) -> Result<crate::lora::optim::StepReport> {
        let grads = std::mem::take(&mut self.grads);
        self.optim.step(&mut self.weights, &grads, p)
    }
}
