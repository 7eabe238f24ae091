//! Decoding: sampling parameters, choosing a token from a logits row, and a batched
//! generation loop over many sequences and adapters (prefill together, then one decode
//! step for every live sequence at a time, sharing the base-weight matmuls). What a request
//! asks of its prompt's logits lives in [`prompt`]; prompt KV kept between requests in
//! [`prefix_cache`].

pub mod prefix_cache;
pub mod prompt;

use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::{BaseModel, InferRow, KvCache};
use crate::util::SplitMix64;
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

#[derive(Debug, Clone, PartialEq)]
pub struct SampledSequence {
    pub tokens: Vec<u32>,
    /// log p(token) under the model (temperature 1, before any filtering).
    pub logprobs: Vec<f32>,
    pub stop_reason: StopReason,
}

#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub adapter: Option<usize>,
    pub params: SamplingParams,
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

/// Generate for many requests at once: one batched prefill, then batched decode steps over
/// the sequences still running. Sequences leave the batch as they stop.
pub fn generate(
    model: &BaseModel,
    adapters: &[&LoraWeights],
    reqs: &[GenerateRequest],
) -> Result<Vec<SampledSequence>> {
    let _span = tracing::info_span!("generate", sequences = reqs.len()).entered();
    for (i, r) in reqs.iter().enumerate() {
        r.params.validate()?;
        model.check_tokens(&format!("requests[{i}].prompt"), r.prompt, 0)?;
        if r.prompt.len().saturating_add(r.params.max_tokens) > model.config.max_position_embeddings
        {
            return Err(Error::invalid(
                format!("requests[{i}].max_tokens"),
                format!(
                    "prompt + max_tokens exceeds the context length {}",
                    model.config.max_position_embeddings
                ),
            ));
        }
    }
    let mut caches: Vec<KvCache> = vec![KvCache::default(); reqs.len()];
    let mut rngs: Vec<SplitMix64> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| SplitMix64::new(r.params.seed.unwrap_or(0x5EED ^ i as u64)))
        .collect();
    let mut out: Vec<SampledSequence> = reqs
        .iter()
        .map(|_| SampledSequence {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            stop_reason: StopReason::Length,
        })
        .collect();
    let mut live: Vec<usize> = (0..reqs.len())
        .filter(|&i| reqs[i].params.max_tokens > 0)
        .collect();
    let mut first = true;
    while !live.is_empty() {
        let toks: Vec<Vec<u32>> = live
            .iter()
            .map(|&i| {
                if first {
                    reqs[i].prompt.to_vec()
                } else {
                    vec![*out[i].tokens.last().unwrap_or(&0)]
                }
            })
            .collect();
        let rows: Vec<InferRow> = live
            .iter()
            .zip(&toks)
            .map(|(&i, t)| InferRow {
                tokens: t,
                adapter: reqs[i].adapter,
            })
            .collect();
        let mut cache_refs: Vec<&mut KvCache> = Vec::with_capacity(live.len());
        {
            let mut it = caches.iter_mut().enumerate();
            for &i in &live {
                for (j, c) in it.by_ref() {
                    if j == i {
                        cache_refs.push(c);
                        break;
                    }
                }
            }
        }
        let (logits, _) = model.forward_infer(&rows, &mut cache_refs, adapters, false)?;
        let logits = logits.to_vec2::<f32>()?;
        first = false;
        let mut still = Vec::with_capacity(live.len());
        for (row, &i) in logits.iter().zip(&live) {
            let p = &reqs[i].params;
            let mut history = reqs[i].prompt.to_vec();
            history.extend(&out[i].tokens);
            let (t, lp) = choose(row, p, &history, &mut rngs[i]);
            out[i].tokens.push(t);
            out[i].logprobs.push(lp);
            if p.stop_tokens.contains(&t) {
                out[i].stop_reason = StopReason::Stop;
            } else if out[i].tokens.len() < p.max_tokens {
                still.push(i);
            }
        }
        live = still;
    }
    Ok(out)
}
