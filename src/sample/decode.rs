//! The decode step, written once: the sampling engine's lane (`jobs::sampling`) and
//! [`super::generate`] both run it. A step is one batched forward over every live sequence
//! (new ones prefill their prompt in the same pass as the others' next token), then the
//! next token of each: the built-in choice or a tenant's [`TokenSampler`], its logprob and
//! top logprobs, and the stop tests (stop tokens, stop strings, a sampler that ends the
//! sequence). The loop around the step is its caller's: who joins and leaves, prompt KV
//! shared or cached, where results go. This module never queues, waits or caches.

use super::{choose_with_lse, log_sum_exp, SamplingParams, StopReason};
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::front::LogitsVisitor;
use crate::model::{BaseModel, InferRow, KvCache};
use crate::util::SplitMix64;
use rayon::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A tenant's sampling policy (a sampler plugin): starts one [`SequenceSampler`] per
/// sequence, which holds that sequence's state. The decode step computes each chosen
/// token's logprob itself and checks the id.
pub trait TokenSampler: Send + Sync {
    fn start(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        vocab_size: usize,
    ) -> Result<Box<dyn SequenceSampler>>;
}

/// One sequence's sampler state.
pub trait SequenceSampler: Send {
    /// The next token, or `None` to end the sequence (reported as a stop).
    fn step(
        &mut self,
        logits: &[f32],
        generated: &[u32],
        rng: &mut SplitMix64,
    ) -> Result<Option<u32>>;
}

/// A generated sequence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampledSeq {
    pub tokens: Vec<u32>,
    /// log p(token) under the model (temperature 1, before filtering).
    pub logprobs: Vec<f32>,
    /// Per sampled token, the `top_logprobs` most likely (token, logprob), best first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub stop_reason: StopReason,
}

/// What one sequence was asked for, borrowed from its request.
#[derive(Clone, Copy)]
pub struct SeqAsk<'a> {
    pub prompt: &'a [u32],
    pub params: &'a SamplingParams,
    /// A stop string ends the sequence at the token that completes it (needs the model's
    /// tokenizer).
    pub stop_strings: &'a [String],
    /// How many of the most likely tokens (with logprobs) to keep per sampled token.
    pub top_logprobs: usize,
    pub sampler: Option<&'a dyn TokenSampler>,
}

/// A sequence being decoded: its KV cache, random stream, sampler plugin state and what it
/// has produced so far.
pub struct Sequence {
    pub cache: KvCache,
    pub rng: SplitMix64,
    pub out: SampledSeq,
    /// Its request's sampler plugin state, once started.
    plugin: Option<Box<dyn SequenceSampler>>,
}

impl Sequence {
    pub fn new(rng: SplitMix64) -> Self {
        Sequence {
            cache: KvCache::default(),
            rng,
            out: SampledSeq {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                top_logprobs: Vec::new(),
                stop_reason: StopReason::Length,
            },
            plugin: None,
        }
    }

    /// Whether it has not produced a token yet (its next step prefills).
    pub fn prefilling(&self) -> bool {
        self.out.tokens.is_empty()
    }

    /// What its next forward feeds: the prompt after the prefix its cache holds, then its
    /// last token.
    pub fn input<'a>(&'a self, prompt: &'a [u32]) -> &'a [u32] {
        match self.out.tokens.last() {
            Some(t) => std::slice::from_ref(t),
            None => &prompt[self.cache.len.min(prompt.len())..],
        }
    }

    /// Whether it is over: stopped, or at `max_tokens`.
    pub fn finished(&self, params: &SamplingParams) -> bool {
        self.out.stop_reason == StopReason::Stop || self.out.tokens.len() >= params.max_tokens
    }

    /// Choose and record the next token from its logits `row`; mark it stopped if it
    /// should stop.
    pub fn next_token(&mut self, model: &BaseModel, ask: &SeqAsk, row: &[f32]) -> Result<()> {
        let p = ask.params;
        let lse = log_sum_exp(row);
        let (tok, lp) = match ask.sampler {
            Some(s) => {
                let (generated, rng, plugin) = (&self.out.tokens, &mut self.rng, &mut self.plugin);
                let t = catch_unwind(AssertUnwindSafe(|| {
                    if plugin.is_none() {
                        *plugin = Some(s.start(ask.prompt, p, row.len())?);
                    }
                    match plugin.as_mut() {
                        Some(seq) => seq.step(row, generated, rng),
                        None => Ok(None),
                    }
                }))
                .unwrap_or_else(|_| Err(Error::invalid("sampler", "the sampler panicked")))?;
                let Some(t) = t else {
                    self.out.stop_reason = StopReason::Stop;
                    return Ok(());
                };
                let lp = row.get(t as usize).ok_or_else(|| {
                    Error::invalid(
                        "sampler",
                        format!("chose token {t}, outside the vocabulary"),
                    )
                })?;
                (t, lp - lse)
            }
            None => {
                let mut history = Vec::with_capacity(ask.prompt.len() + self.out.tokens.len());
                history.extend(ask.prompt);
                history.extend(&self.out.tokens);
                choose_with_lse(row, lse, p, &history, &mut self.rng)
            }
        };
        self.out.tokens.push(tok);
        self.out.logprobs.push(lp);
        if ask.top_logprobs > 0 {
            self.out
                .top_logprobs
                .push(crate::model::front::top_k_of(row, ask.top_logprobs, lse));
        }
        if p.stop_tokens.contains(&tok) {
            self.out.stop_reason = StopReason::Stop;
        } else if !ask.stop_strings.is_empty() {
            let text = model.tokenizer()?.decode(&self.out.tokens, false)?;
            if ask.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                self.out.stop_reason = StopReason::Stop;
            }
        }
        Ok(())
    }
}

/// A live sequence as its decode loop holds it: its request's ask and its state.
pub trait Decoding: Send {
    fn parts(&mut self) -> (SeqAsk<'_>, &mut Sequence);
}

/// What a step produced: every row's last logits, and per sequence the outcome of its
/// choice (`None` where its request asks for no tokens).
pub struct Stepped {
    pub logits: Vec<Vec<f32>>,
    pub chosen: Vec<Option<Result<()>>>,
}

/// One decode step over `live`: one forward pass, sequence `i` on adapter slot `slots[i]`
/// of `adapters`, then the next token of every sequence, side by side (each reads only its
/// own logits row and state). `from` and `visit` see prompt logits as
/// [`BaseModel::forward_infer_scored`] hands them over. A failed forward fails the step; a
/// failed choice fails only its sequence.
pub fn step<S: Decoding>(
    model: &BaseModel,
    live: &mut [S],
    slots: &[Option<usize>],
    adapters: &[&LoraWeights],
    from: &[Option<usize>],
    visit: LogitsVisitor,
) -> Result<Stepped> {
    if slots.len() != live.len() {
        return Err(Error::invalid("slots", "one entry per sequence"));
    }
    let inputs: Vec<Vec<u32>> = live
        .iter_mut()
        .map(|l| {
            let (ask, seq) = l.parts();
            seq.input(ask.prompt).to_vec()
        })
        .collect();
    let rows: Vec<InferRow> = inputs
        .iter()
        .zip(slots)
        .map(|(t, a)| InferRow {
            tokens: t,
            adapter: *a,
        })
        .collect();
    let logits = {
        let mut caches: Vec<&mut KvCache> =
            live.iter_mut().map(|l| &mut l.parts().1.cache).collect();
        model
            .forward_infer_scored(&rows, &mut caches, adapters, from, visit)?
            .to_vec2::<f32>()?
    };
    let chosen = live
        .par_iter_mut()
        .zip(logits.par_iter())
        .map(|(l, row)| {
            let (ask, seq) = l.parts();
            (ask.params.max_tokens > 0).then(|| seq.next_token(model, &ask, row))
        })
        .collect();
    Ok(Stepped { logits, chosen })
}
