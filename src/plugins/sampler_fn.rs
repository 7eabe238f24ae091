//! The bridge from a loaded sampler component to the sampling engine: [`PluginSampler`]
//! implements the engine's [`TokenSampler`], opening one plugin session per sequence (its
//! state lives in the component's resource) and feeding it the engine's random bits, so a
//! seeded request is reproducible. Owns only the conversion.

use super::{ConfigValue, PluginHost, PluginId, SamplerChoice, SamplerSession};
use crate::error::{Error, Result};
use crate::jobs::{SequenceSampler, TokenSampler};
use crate::sample::SamplingParams;
use crate::util::SplitMix64;
use std::collections::BTreeMap;

/// A sampler component loaded in a [`PluginHost`], with the request's plugin config.
#[derive(Clone)]
pub struct PluginSampler {
    pub host: PluginHost,
    pub id: PluginId,
    pub config: BTreeMap<String, ConfigValue>,
}

impl TokenSampler for PluginSampler {
    fn start(
        &self,
        prompt: &[u32],
        _: &SamplingParams,
        vocab_size: usize,
    ) -> Result<Box<dyn SequenceSampler>> {
        let s = self
            .host
            .new_sampler(&self.id, prompt, &self.config, vocab_size)
            .map_err(Error::Plugin)?;
        Ok(Box::new(PluginSequence(s)))
    }
}

struct PluginSequence(SamplerSession);

impl SequenceSampler for PluginSequence {
    fn step(
        &mut self,
        logits: &[f32],
        generated: &[u32],
        rng: &mut SplitMix64,
    ) -> Result<Option<u32>> {
        match self
            .0
            .step(logits, generated, rng.next_u64())
            .map_err(Error::Plugin)?
        {
            SamplerChoice::Token(t) => Ok(Some(t)),
            SamplerChoice::Stop => Ok(None),
        }
    }
}
