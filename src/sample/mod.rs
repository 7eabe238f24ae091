//! Decoding: sampling parameters, choosing a token from a logits row, the decode step that
//! the sampling engine and [`generate`] share ([`decode`]), and [`generate`], which runs
//! that step in a loop of its own for many sequences and adapters at once (no queue, no
//! prefix cache). What a request asks of its prompt's logits lives in [`prompt`]; prompt KV
//! kept between requests in [`prefix_cache`].

pub mod decode;
pub mod prefix_cache;
pub mod prompt;

pub use decode::{SampledSeq, SequenceSampler, TokenSampler};

use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::BaseModel;
use crate::util::SplitMix64;
use decode::{Decoding, SeqAsk, Sequence};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// ≤ 0 disables.
    pub top_k: i64,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    /// Token ids that end a sequence; a matched one is the last token returned.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 64,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            stop_tokens: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: &str| Err(Error::invalid(format!("sampling_params.{f}"), m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "must be ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be > 0");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    Stop,
    Length,
}

/// One sequence for [`generate`].
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub adapter: Option<usize>,
    pub params: SamplingParams,
    /// Text that ends the sequence at the token that completes it (needs the model's
    /// tokenizer).
    pub stop_strings: Vec<String>,
}

/// `ln Σ exp(x)` of a logits row.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln()
}

/// Pick the next token from one logits row. Returns (token, its model logprob).
pub fn choose(
    logits: &[f32],
    p: &SamplingParams,
    history: &[u32],
    rng: &mut SplitMix64,
) -> (u32, f32) {
    choose_with_lse(logits, log_sum_exp(logits), p, history, rng)
}

/// [`choose`] given the row's [`log_sum_exp`].
pub fn choose_with_lse(
    logits: &[f32],
    lse: f32,
    p: &SamplingParams,
    history: &[u32],
    rng: &mut SplitMix64,
) -> (u32, f32) {
    let mut l = std::borrow::Cow::Borrowed(logits);
    if p.repetition_penalty != 1.0 {
        let l = l.to_mut();
        for &t in history {
            if let Some(x) = l.get_mut(t as usize) {
                *x = if *x > 0.0 {
                    *x / p.repetition_penalty
                } else {
                    *x * p.repetition_penalty
                };
            }
        }
    }
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                if x > b.1 {
                    (i, x)
                } else {
                    b
                }
            })
            .0
    };
    let tok = if p.temperature == 0.0 {
        argmax(&l)
    } else {
        let mut idx: Vec<usize> = (0..l.len()).collect();
        let by_logit = |a: &usize, b: &usize| l[*b].total_cmp(&l[*a]).then(a.cmp(b));
        let k = if p.top_k > 0 {
            (p.top_k as usize).min(idx.len())
        } else {
            idx.len()
        };
        if k < idx.len() {
            // Only the k best need an order.
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        }
        if p.top_p < 1.0 || p.min_p > 0.0 || k < l.len() {
            idx.sort_unstable_by(by_logit);
        } else {
            // No filter reads the order: draw over the ids as they are, after the best
            // (the scale of the weights), without sorting the vocabulary every token.
            let best = argmax(&l);
            idx.swap(0, best);
        }
        let m = l[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i] - m) / p.temperature) as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= z);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let z: f64 = probs[..keep].iter().sum();
        let mut u = rng.uniform() * z;
        let mut pick = idx[keep - 1];
        for (i, q) in probs[..keep].iter().enumerate() {
            if u < *q {
                pick = idx[i];
                break;
            }
            u -= q;
        }
        pick
    };
    (tok as u32, logits[tok] - lse)
}

/// Generate for many requests at once with the engine's decode step ([`decode::step`]):
/// the first step prefills every prompt, each later step decodes one token of every
/// sequence still running; sequences leave as they stop. Request `i` draws from seed
/// `params.seed` (or a fixed one of `i`), so for the same prompt, weights and seed it
/// produces what the engine's first sequence of a request does.
pub fn generate(
    model: &BaseModel,
    adapters: &[&LoraWeights],
    reqs: &[GenerateRequest],
) -> Result<Vec<SampledSeq>> {
    let _span = tracing::info_span!("generate", sequences = reqs.len()).entered();
    for (i, r) in reqs.iter().enumerate() {
        check_request(model, adapters, i, r)?;
    }
    let mut live: Vec<Generating> = reqs
        .iter()
        .enumerate()
        .map(|(index, req)| Generating {
            index,
            req,
            seq: Sequence::new(SplitMix64::new(
                req.params.seed.unwrap_or(0x5EED ^ index as u64),
            )),
        })
        .collect();
    let mut out: Vec<Option<SampledSeq>> = vec![None; reqs.len()];
    loop {
        // Finished sequences leave the batch (those asked for no tokens before any step).
        let (done, running): (Vec<Generating>, Vec<Generating>) = live
            .into_iter()
            .partition(|g| g.seq.finished(&g.req.params));
        for g in done {
            out[g.index] = Some(g.seq.out);
        }
        live = running;
        if live.is_empty() {
            break;
        }
        let slots: Vec<Option<usize>> = live.iter().map(|g| g.req.adapter).collect();
        let from = vec![None; live.len()];
        let stepped = decode::step(model, &mut live, &slots, adapters, &from, &mut |_, _, _| {
            Ok(())
        })?;
        for chosen in stepped.chosen.into_iter().flatten() {
            chosen?;
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| Error::Unavailable("a sequence was lost".into())))
        .collect()
}

/// A sequence of [`generate`]: its request and decoding state.
struct Generating<'r, 'a> {
    index: usize,
    req: &'r GenerateRequest<'a>,
    seq: Sequence,
}

impl Decoding for Generating<'_, '_> {
    fn parts(&mut self) -> (SeqAsk<'_>, &mut Sequence) {
        let ask = SeqAsk {
            prompt: self.req.prompt,
            params: &self.req.params,
            stop_strings: &self.req.stop_strings,
            top_logprobs: 0,
            sampler: None,
        };
        (ask, &mut self.seq)
    }
}

/// What [`generate`] accepts of request `i`: valid parameters, a prompt and its tokens
/// inside the context, an adapter slot that exists, stop strings only with a tokenizer.
fn check_request(
    model: &BaseModel,
    adapters: &[&LoraWeights],
    i: usize,
    r: &GenerateRequest,
) -> Result<()> {
    r.params.validate()?;
    model.check_tokens(&format!("requests[{i}].prompt"), r.prompt, 0)?;
    if r.prompt.len().saturating_add(r.params.max_tokens) > model.config.max_position_embeddings {
        return Err(Error::invalid(
            format!("requests[{i}].max_tokens"),
            format!(
                "prompt + max_tokens exceeds the context length {}",
                model.config.max_position_embeddings
            ),
        ));
    }
    if r.adapter.is_some_and(|a| a >= adapters.len()) {
        return Err(Error::invalid(
            format!("requests[{i}].adapter"),
            format!("no adapter slot {:?} of {}", r.adapter, adapters.len()),
        ));
    }
    if r.stop_strings.iter().any(|s| s.is_empty()) {
        return Err(Error::invalid(
            format!("requests[{i}].stop_strings"),
            "empty stop string",
        ));
    }
    if !r.stop_strings.is_empty() && model.tokenizer.is_none() {
        return Err(Error::invalid(
            format!("requests[{i}].stop_strings"),
            "stop strings need a model with a tokenizer",
        ));
    }
    Ok(())
}
