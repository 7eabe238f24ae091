//! Sampler plugins (`loraplex:plugin/sampler-plugin`): a `SamplerSession`
//! per decoded sequence. The session owns its own store and instance for the
//! sequence's lifetime, because the plugin's per-sequence state lives in the
//! `sequence` resource inside that instance; each step gets a fresh epoch
//! deadline. It must never return a token the host did not check against the
//! vocabulary, and never re-enter an instance after it failed.

use std::collections::BTreeMap;
use std::time::Duration;

use wasmtime::component::{InstancePre, ResourceAny};
use wasmtime::Store;

use super::error::PluginError;
use super::sandbox::{call_error, PluginState};
use super::types::ConfigValue;

mod wit {
    wasmtime::component::bindgen!({ world: "sampler-plugin", path: "wit" });
}

use wit::exports::loraplex::plugin::sampler as wit_sampler;
use wit::loraplex::plugin::types as wit_types;

pub(crate) use wit::SamplerPluginPre;

/// What a sampler chose for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerChoice {
    /// The next token, checked to be below the vocabulary size.
    Token(u32),
    /// End the sequence.
    Stop,
}

/// One sequence being decoded with a sampler plugin. `Send`, not `Sync`:
/// it belongs to the decoding loop of its sequence.
pub struct SamplerSession {
    store: Store<PluginState>,
    plugin: wit::SamplerPlugin,
    sequence: ResourceAny,
    vocab_size: usize,
    step_ticks: u64,
    /// Set once a step failed or the plugin stopped.
    closed: Option<Closed>,
}

enum Closed {
    Stopped,
    Failed(String),
}

fn wit_config(config: &BTreeMap<String, ConfigValue>) -> Vec<(String, wit_types::ConfigValue)> {
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

impl SamplerSession {
    /// Instantiates the plugin in `store` and creates the sequence resource.
    pub(crate) fn start(
        pre: &SamplerPluginPre<PluginState>,
        mut store: Store<PluginState>,
        prompt: &[u32],
        config: &BTreeMap<String, ConfigValue>,
        vocab_size: usize,
        step_ticks: u64,
    ) -> Result<Self, PluginError> {
        let vocab = u32::try_from(vocab_size)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| PluginError::BadInput {
                what: format!("vocab_size {vocab_size} must be in 1..=u32::MAX"),
            })?;
        if let Some(&t) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(PluginError::BadInput {
                what: format!("prompt token {t} is outside the vocabulary of {vocab_size}"),
            });
        }
        let plugin = pre
            .instantiate(&mut store)
            .map_err(|e| call_error(&store, e))?;
        let sequence = plugin
            .loraplex_plugin_sampler()
            .sequence()
            .call_create(&mut store, prompt, &wit_config(config), vocab)
            .map_err(|e| call_error(&store, e))?
            .map_err(|message| PluginError::PluginFailed { message })?;
        Ok(SamplerSession {
            store,
            plugin,
            sequence,
            vocab_size,
            step_ticks,
            closed: None,
        })
    }

    /// Asks the plugin for the next token. `logits` must have `vocab_size`
    /// entries; `generated` holds the tokens chosen so far (prompt excluded);
    /// `random` is this step's 64 random bits (derive them from the request's
    /// seed for reproducible output).
    ///
    /// After `Stop` every later step returns `Stop` without calling the
    /// plugin; after a failure every later step returns `SessionClosed`.
    pub fn step(
        &mut self,
        logits: &[f32],
        generated: &[u32],
        random: u64,
    ) -> Result<SamplerChoice, PluginError> {
        match &self.closed {
            Some(Closed::Stopped) => return Ok(SamplerChoice::Stop),
            Some(Closed::Failed(reason)) => {
                return Err(PluginError::SessionClosed {
                    reason: reason.clone(),
                })
            }
            None => {}
        }
        if logits.len() != self.vocab_size {
            return Err(PluginError::BadInput {
                what: format!(
                    "{} logits for a vocabulary of {}",
                    logits.len(),
                    self.vocab_size
                ),
            });
        }
        let result = self.call_step(logits, generated, random);
        match &result {
            Ok(SamplerChoice::Stop) => self.closed = Some(Closed::Stopped),
            Ok(SamplerChoice::Token(_)) => {}
            Err(e) => self.closed = Some(Closed::Failed(e.to_string())),
        }
        result
    }

    fn call_step(
        &mut self,
        logits: &[f32],
        generated: &[u32],
        random: u64,
    ) -> Result<SamplerChoice, PluginError> {
        self.store.set_epoch_deadline(self.step_ticks);
        let choice = self
            .plugin
            .loraplex_plugin_sampler()
            .sequence()
            .call_step(&mut self.store, self.sequence, logits, generated, random)
            .map_err(|e| call_error(&self.store, e))?
            .map_err(|message| PluginError::PluginFailed { message })?;
        match choice {
            wit_sampler::Choice::Stop => Ok(SamplerChoice::Stop),
            wit_sampler::Choice::Token(t) if (t as usize) < self.vocab_size => {
                Ok(SamplerChoice::Token(t))
            }
            wit_sampler::Choice::Token(t) => Err(PluginError::BadOutput {
                what: format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            }),
        }
    }

    /// The deadline of one step.
    pub fn step_deadline(&self) -> Duration {
        self.store.data().deadline()
    }
}

/// Checks a component's sampler export against the world.
pub(crate) fn prepare(
    pre: InstancePre<PluginState>,
) -> wasmtime::Result<SamplerPluginPre<PluginState>> {
    SamplerPluginPre::new(pre)
}
