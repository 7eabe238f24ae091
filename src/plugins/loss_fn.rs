//! The bridge from a loaded loss component to the training path: [`PluginLoss`] implements
//! [`LossFunction`], so `forward_backward` runs a tenant's wasm loss on the batch's
//! per-token logprobs and seeds the backward pass with its gradient, exactly as it does for
//! a built-in loss. Owns only the conversion between the two sets of types.

use super::{
    LossDatum as PluginDatum, NamedTensor, PluginHost, PluginId, TensorData as PluginTensor,
};
use crate::error::{Error, Result};
use crate::train::loss::{LossConfig, LossDatum, LossFunction, LossOutput, TensorData};

/// A loss component loaded in a [`PluginHost`]. Who may name it is the caller's business.
#[derive(Clone)]
pub struct PluginLoss {
    pub host: PluginHost,
    pub id: PluginId,
}

impl LossFunction for PluginLoss {
    fn compute(&self, data: &[LossDatum], config: &LossConfig) -> Result<LossOutput> {
        let data: Vec<PluginDatum> = data
            .iter()
            .map(|d| PluginDatum {
                logprobs: d.logprobs.to_vec(),
                inputs: d
                    .inputs
                    .iter()
                    .map(|(name, t)| NamedTensor {
                        name: name.clone(),
                        shape: t.shape.iter().map(|&s| s as u64).collect(),
                        data: match &t.data {
                            TensorData::F32(v) => PluginTensor::F32(v.clone()),
                            TensorData::I64(v) => PluginTensor::I64(v.clone()),
                        },
                    })
                    .collect(),
            })
            .collect();

        let out = self
            .host
            .compute_loss(&self.id, &data, config)
            .map_err(Error::Plugin)?;
        Ok(LossOutput {
            loss: out.loss,
            grads: out.grads,
            metrics: out.metrics,
            elementwise: None,
        })
    }
}
