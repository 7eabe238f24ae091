//! The sampling engine: one lane (a blocking thread) that decodes for every sampling
//! session at once with continuous batching. Each step is one `forward_infer` over all live
//! sequences (new ones prefill their prompt in the same pass as the others' decode step),
//! whatever their adapter snapshot; sequences join between steps and leave as they finish.
//!
//! Why a lane of its own rather than the training lanes' loop: a decode step is short and a
//! training pass long, so sharing one loop would hold every decoding sequence behind the
//! longest training batch. On one device the two lanes share the cores; the OS interleaves
//! them at step granularity.
//!
//! Per request: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, stop
//! token ids and stop strings (a matched stop token is the last token returned; a stop
//! string ends the sequence at the token that completes it), seed (same seed, same output),
//! num_samples, max_tokens, prompt logprobs, top-k logprobs of each sampled token, and an
//! optional [`TokenSampler`] (a tenant's plugin) in place of the built-in choice.

use super::future::{Futures, JobFailure, JobOutput};
use super::ids::{FutureId, TenantId};
use super::metrics::Metrics;
use super::registry::Session;
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::{BaseModel, InferRow, KvCache};
use crate::sample::{choose_with_lse, SamplingParams, StopReason};
use crate::util::SplitMix64;
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Most sequences one request may ask for.
pub const MAX_NUM_SAMPLES: usize = 128;
/// Most top logprobs per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most stop strings and stop tokens of one request together.
pub const MAX_STOPS: usize = 64;

/// Longest stop string.
pub const MAX_STOP_BYTES: usize = 1024;

/// A tenant's sampling policy (a sampler plugin): starts one [`SequenceSampler`] per
/// sequence, which holds that sequence's state. The engine computes each chosen token's
/// logprob itself and checks the id.
pub trait TokenSampler: Send + Sync {
    fn start(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        vocab_size: usize,
    ) -> Result<Box<dyn SequenceSampler>>;
}

/// Told of a request's sequences when it succeeds, before its future completes, so what
/// it keeps is there by the time anyone reads the result (the Tinker layer records
/// sequences sampled with `record_stability_info`).
pub trait SampleRecorder: Send + Sync {
    fn record(&self, future: &FutureId, prompt: &[u32], out: &SampleOutput);
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

#[derive(Clone, Default)]
pub struct SampleRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Sequences to draw; sequence `i` uses seed `seed + i`.
    pub num_samples: usize,
    pub stop_strings: Vec<String>,
    /// Log-probability of each prompt token after the first.
    pub prompt_logprobs: bool,
    /// How many of the most likely tokens (with logprobs) to return per sampled token.
    pub top_logprobs: usize,
    /// With `prompt_logprobs`: how many of the most likely tokens to return per prompt
    /// position after the first.
    pub prompt_top_logprobs: usize,
    /// Tinker's `prompt_logprobs_last_n`: only the last n prompt logprobs are wanted. Not
    /// applied here; carried into [`SampleOutput`] so the result renders the same whenever
    /// it is read, a restart included.
    pub prompt_logprobs_last_n: Option<usize>,
    pub sampler: Option<Arc<dyn TokenSampler>>,
    pub recorder: Option<Arc<dyn SampleRecorder>>,
}

impl std::fmt::Debug for SampleRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleRequest")
            .field("prompt", &self.prompt.len())
            .field("params", &self.params)
            .field("num_samples", &self.num_samples)
            .field("stop_strings", &self.stop_strings)
            .field("plugin", &self.sampler.is_some())
            .field("recorded", &self.recorder.is_some())
            .finish()
    }
}

impl SampleRequest {
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        SampleRequest {
            prompt,
            params,
            num_samples: 1,
            ..Default::default()
        }
    }

    /// KV-cache positions one sequence of this request can reach.
    pub fn seq_positions(&self) -> usize {
        self.prompt.len().saturating_add(self.params.max_tokens)
    }

    /// Positions all its sequences can reach: what the request may cost the KV cache.
    pub fn positions(&self) -> usize {
        self.seq_positions().saturating_mul(self.num_samples)
    }

    pub fn validate(&self, model: &BaseModel) -> Result<()> {
        self.params.validate()?;
        model.check_tokens("prompt", &self.prompt, 0)?;
        if self.seq_positions() > model.config.max_position_embeddings {
            return Err(Error::invalid(
                "sampling_params.max_tokens",
                format!(
                    "prompt + max_tokens exceeds the context length {}",
                    model.config.max_position_embeddings
                ),
            ));
        }
        if self.num_samples == 0 || self.num_samples > MAX_NUM_SAMPLES {
            return Err(Error::invalid(
                "num_samples",
                format!("must be in 1..={MAX_NUM_SAMPLES}"),
            ));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS || self.prompt_top_logprobs > MAX_TOP_LOGPROBS {
            return Err(Error::invalid(
                "top_logprobs",
                format!("at most {MAX_TOP_LOGPROBS}"),
            ));
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(Error::invalid("stop", "empty stop string"));
        }
        // Every step compares the generated text's tail with each stop string.
        let stops = self.stop_strings.len() + self.params.stop_tokens.len();
        if stops > MAX_STOPS {
            return Err(Error::invalid(
                "stop",
                format!("{stops} stop strings and tokens; at most {MAX_STOPS}"),
            ));
        }
        if let Some(s) = self.stop_strings.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(Error::invalid(
                "stop",
                format!(
                    "a stop string of {} bytes; at most {MAX_STOP_BYTES}",
                    s.len()
                ),
            ));
        }
        if !self.stop_strings.is_empty() && model.tokenizer.is_none() {
            return Err(Error::invalid(
                "stop",
                "stop strings need a model with a tokenizer",
            ));
        }
        if let Some(t) = self
            .params
            .stop_tokens
            .iter()
            .find(|t| **t as usize >= model.config.vocab_size)
        {
            return Err(Error::invalid(
                "stop",
                format!("stop token {t} is outside the vocabulary"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampledSeq {
    pub tokens: Vec<u32>,
    /// log p(token) under the model (temperature 1, before filtering).
    pub logprobs: Vec<f32>,
    /// Per sampled token, the `top_logprobs` most likely (token, logprob), best first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub stop_reason: StopReason,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleOutput {
    pub sequences: Vec<SampledSeq>,
    /// With `prompt_logprobs`: for prompt tokens 1.., log p(token | earlier tokens).
    pub prompt_logprobs: Option<Vec<f32>>,
    /// With `prompt_top_logprobs`: per prompt position after the first, the most likely
    /// (token, logprob), best first.
    pub prompt_top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
    /// The request's `prompt_logprobs_last_n`, for rendering (see [`SampleRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs_last_n: Option<usize>,
}

pub(crate) struct SampleJob {
    pub future: FutureId,
    pub tenant: TenantId,
    pub session: Arc<Session>,
    pub req: Arc<SampleRequest>,
    pub span: tracing::Span,
}

pub(crate) struct SamplerCtx {
    pub model: Arc<BaseModel>,
    pub futures: Arc<Futures>,
    pub metrics: Arc<Metrics>,
    /// Requests accepted and not finished; admission control reads it.
    pub outstanding: Arc<AtomicUsize>,
    pub max_decode_batch: usize,
    /// KV positions the live sequences may reserve together (see [`SampleRequest::positions`]).
    pub max_kv_tokens: usize,
}

struct JobAcc {
    job: SampleJob,
    seqs: Vec<Option<SampledSeq>>,
    left: usize,
    prompt_logprobs: Option<Vec<f32>>,
    prompt_top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
    failed: bool,
}

struct Live {
    future: FutureId,
    tenant: TenantId,
    index: usize,
    req: Arc<SampleRequest>,
    weights: Option<Arc<LoraWeights>>,
    cache: KvCache,
    rng: SplitMix64,
    out: SampledSeq,
    /// The request's sampler plugin state for this sequence, once started.
    plugin: Option<Box<dyn SequenceSampler>>,
}

pub(crate) fn spawn_sampler(
    ctx: SamplerCtx,
    rx: std::sync::mpsc::Receiver<SampleJob>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("loraplex-sampler".into())
        .spawn(move || Sampler::new(ctx).run(rx))
}

struct Sampler {
    ctx: SamplerCtx,
    jobs: HashMap<FutureId, JobAcc>,
    waiting: VecDeque<Live>,
    live: Vec<Live>,
}

impl Sampler {
    fn new(ctx: SamplerCtx) -> Self {
        Sampler {
            ctx,
            jobs: HashMap::new(),
            waiting: VecDeque::new(),
            live: Vec::new(),
        }
    }

    fn run(mut self, rx: std::sync::mpsc::Receiver<SampleJob>) {
        loop {
            if self.live.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(j) => self.admit(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                self.admit(j);
            }
            // Admit waiting sequences while the batch has room and their KV reservations fit
            // (at least one always runs, so no request waits forever).
            let mut reserved: usize = self.live.iter().map(|l| l.req.seq_positions()).sum();
            while self.live.len() < self.ctx.max_decode_batch {
                let Some(i) = self.next_waiting() else { break };
                let need = self.waiting[i].req.seq_positions();
                if !self.live.is_empty() && reserved + need > self.ctx.max_kv_tokens {
                    break;
                }
                if let Some(l) = self.waiting.remove(i) {
                    reserved += need;
                    self.live.push(l);
                }
            }
            if self.live.is_empty() {
                continue;
            }
            let r = catch_unwind(AssertUnwindSafe(|| self.step()));
            let err = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(p) => {
                    tracing::error!(panic = %crate::util::panic_message(&*p), "decoding step panicked");
                    Some(Error::Panic("the decoding step failed".into()))
                }
            };
            if let Some(e) = err {
                // The whole step failed: fail every request that had a sequence in it.
                let live = std::mem::take(&mut self.live);
                for l in live {
                    self.fail_job(&l.future, &e);
                }
            }
        }
    }

    /// The next sequence to join the batch: the oldest waiting one of the tenant with the
    /// fewest live sequences, so one tenant's 100-sample request cannot hold a full batch
    /// while another tenant's single sample waits behind it.
    /// Which waiting sequence joins next: the oldest of the tenant with the fewest live.
    fn next_waiting(&self) -> Option<usize> {
        let mut live: HashMap<&TenantId, usize> = HashMap::new();
        for l in &self.live {
            *live.entry(&l.tenant).or_default() += 1;
        }
        let mut best: Option<(usize, usize)> = None;
        let mut seen: HashMap<&TenantId, ()> = HashMap::new();
        for (i, w) in self.waiting.iter().enumerate() {
            if seen.insert(&w.tenant, ()).is_some() {
                continue;
            }
            let n = live.get(&w.tenant).copied().unwrap_or(0);
            if best.is_none_or(|(bn, _)| n < bn) {
                best = Some((n, i));
                if n == 0 {
                    break;
                }
            }
        }
        best.map(|b| b.1)
    }

    fn admit(&mut self, job: SampleJob) {
        let n = job.req.num_samples;
        let base_seed = job.req.params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        self.ctx.futures.set_running(&job.future);
        self.ctx.metrics.started(&job.tenant);
        for index in 0..n {
            self.waiting.push_back(Live {
                future: job.future.clone(),
                tenant: job.tenant.clone(),
                index,
                req: job.req.clone(),
                weights: job.session.weights.clone(),
                cache: KvCache::default(),
                rng: SplitMix64::new(base_seed.wrapping_add(index as u64)),
                plugin: None,
                out: SampledSeq {
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    top_logprobs: Vec::new(),
                    stop_reason: StopReason::Length,
                },
            });
        }
        self.jobs.insert(
            job.future.clone(),
            JobAcc {
                seqs: vec![None; n],
                left: n,
                prompt_logprobs: None,
                prompt_top_logprobs: None,
                failed: false,
                job,
            },
        );
    }

    fn fail_job(&mut self, fut: &FutureId, e: &Error) {
        let Some(mut acc) = self.jobs.remove(fut) else {
            return;
        };
        acc.failed = true;
        tracing::info!(parent: &acc.job.span, error = %e, "sample failed");
        // Counters first: whoever the future wakes may read them.
        self.ctx.metrics.finished(&acc.job.tenant, false, true);
        self.ctx.futures.finish(fut, Err(JobFailure::from(e)));
        self.ctx.outstanding.fetch_sub(1, Ordering::SeqCst);
        self.live.retain(|l| &l.future != fut);
        self.waiting.retain(|l| &l.future != fut);
    }

    /// One batched forward over every live sequence, then one token for each.
    fn step(&mut self) -> Result<()> {
        crate::failpoint::hit("job.sample_step");
        let model = self.ctx.model.clone();
        // Distinct snapshots, by identity.
        let mut snaps: Vec<Arc<LoraWeights>> = Vec::new();
        let slot: Vec<Option<usize>> = self
            .live
            .iter()
            .map(|l| {
                l.weights
                    .as_ref()
                    .map(|w| match snaps.iter().position(|s| Arc::ptr_eq(s, w)) {
                        Some(i) => i,
                        None => {
                            snaps.push(w.clone());
                            snaps.len() - 1
                        }
                    })
            })
            .collect();
        let inputs: Vec<Vec<u32>> = self
            .live
            .iter()
            .map(|l| match l.out.tokens.last() {
                Some(&t) if l.cache.len > 0 => vec![t],
                _ => l.req.prompt.clone(),
            })
            .collect();
        let want_plp = self
            .live
            .iter()
            .any(|l| l.cache.len == 0 && l.index == 0 && l.req.prompt_logprobs);
        let top_k = self
            .live
            .iter()
            .filter(|l| l.cache.len == 0 && l.index == 0 && l.req.prompt_logprobs)
            .map(|l| l.req.prompt_top_logprobs)
            .max()
            .unwrap_or(0);
        let logits = {
            let refs: Vec<&LoraWeights> = snaps.iter().map(|s| &**s).collect();
            let rows: Vec<InferRow> = inputs
                .iter()
                .zip(&slot)
                .map(|(t, a)| InferRow {
                    tokens: t,
                    adapter: *a,
                })
                .collect();
            let mut caches: Vec<&mut KvCache> =
                self.live.iter_mut().map(|l| &mut l.cache).collect();
            let (logits, plp, ptop) =
                model.forward_infer_top(&rows, &mut caches, &refs, want_plp, top_k)?;
            if let Some(plp) = plp {
                let mut ptop = ptop.map(|v| v.into_iter());
                for (l, lp) in self.live.iter().zip(plp) {
                    let top = ptop.as_mut().and_then(|t| t.next());
                    if l.index == 0 && l.req.prompt_logprobs && l.out.tokens.is_empty() {
                        if let Some(acc) = self.jobs.get_mut(&l.future) {
                            if acc.prompt_logprobs.is_none() {
                                acc.prompt_logprobs = Some(lp);
                                if l.req.prompt_top_logprobs > 0 {
                                    acc.prompt_top_logprobs = top.map(|t| {
                                        t.into_iter()
                                            .map(|mut p| {
                                                p.truncate(l.req.prompt_top_logprobs);
                                                p
                                            })
                                            .collect()
                                    });
                                }
                            }
                        }
                    }
                }
            }
            logits.to_vec2::<f32>()?
        };
        // Every sequence's choice at once: each reads only its own logits row and state.
        let prefilled: Vec<bool> = self.live.iter().map(|l| l.out.tokens.is_empty()).collect();
        let chosen: Vec<Option<Result<()>>> = self
            .live
            .par_iter_mut()
            .zip(logits.par_iter())
            .map(|(l, row)| (l.req.params.max_tokens > 0).then(|| next_token(&model, l, row)))
            .collect();
        let mut failed: Vec<(FutureId, Error)> = Vec::new();
        let mut done: Vec<usize> = Vec::new();
        for (i, (l, chosen)) in self.live.iter().zip(chosen).enumerate() {
            let tenant = self.jobs.get(&l.future).map(|a| &a.job.tenant);
            if let (true, Some(t)) = (prefilled[i], tenant) {
                self.ctx
                    .metrics
                    .sampled_tokens(t, l.req.prompt.len() as u64);
            }
            match chosen {
                None => {
                    done.push(i);
                    continue;
                }
                Some(Err(e)) => {
                    failed.push((l.future.clone(), e));
                    continue;
                }
                Some(Ok(())) => {}
            }
            if let Some(t) = tenant {
                self.ctx.metrics.sampled_tokens(t, 1);
            }
            if l.out.stop_reason == StopReason::Stop
                || l.out.tokens.len() >= l.req.params.max_tokens
            {
                done.push(i);
            }
        }
        // Finished sequences leave the batch (highest index first keeps indices valid).
        for i in done.into_iter().rev() {
            let l = self.live.swap_remove(i);
            self.seq_done(l);
        }
        for (f, e) in failed {
            self.fail_job(&f, &e);
        }
        Ok(())
    }

    fn seq_done(&mut self, l: Live) {
        let Some(acc) = self.jobs.get_mut(&l.future) else {
            return;
        };
        if let Some(s) = acc.seqs.get_mut(l.index) {
            *s = Some(l.out);
        }
        acc.left -= 1;
        if acc.left > 0 {
            return;
        }
        let Some(acc) = self.jobs.remove(&l.future) else {
            return;
        };
        tracing::info!(parent: &acc.job.span, "sample done");
        let out = SampleOutput {
            sequences: acc.seqs.into_iter().flatten().collect(),
            prompt_logprobs: acc.prompt_logprobs,
            prompt_top_logprobs: acc.prompt_top_logprobs,
            prompt_logprobs_last_n: acc.job.req.prompt_logprobs_last_n,
        };
        if let Some(r) = &acc.job.req.recorder {
            r.record(&acc.job.future, &acc.job.req.prompt, &out);
        }
        self.ctx.metrics.finished(&acc.job.tenant, true, true);
        self.ctx
            .futures
            .finish(&acc.job.future, Ok(JobOutput::Sample(out)));
        self.ctx.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Choose and record the next token of one sequence; mark it stopped if it should stop.
fn next_token(model: &BaseModel, l: &mut Live, row: &[f32]) -> Result<()> {
    let p = &l.req.params;
    let lse = crate::sample::log_sum_exp(row);
    let (tok, lp) = match &l.req.sampler {
        Some(s) => {
            let (prompt, generated, rng) = (&l.req.prompt, &l.out.tokens, &mut l.rng);
            let plugin = &mut l.plugin;
            let t = catch_unwind(AssertUnwindSafe(|| {
                if plugin.is_none() {
                    *plugin = Some(s.start(prompt, p, row.len())?);
                }
                match plugin.as_mut() {
                    Some(seq) => seq.step(row, generated, rng),
                    None => Ok(None),
                }
            }))
            .unwrap_or_else(|_| Err(Error::invalid("sampler", "the sampler panicked")))?;
            let Some(t) = t else {
                l.out.stop_reason = StopReason::Stop;
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
            let mut history = Vec::with_capacity(l.req.prompt.len() + l.out.tokens.len());
            history.extend(&l.req.prompt);
            history.extend(&l.out.tokens);
            choose_with_lse(row, lse, p, &history, &mut l.rng)
        }
    };
    l.out.tokens.push(tok);
    l.out.logprobs.push(lp);
    if l.req.top_logprobs > 0 {
        l.out
            .top_logprobs
            .push(crate::model::llama::top_k_of(row, l.req.top_logprobs, lse));
    }
    if p.stop_tokens.contains(&tok) {
        l.out.stop_reason = StopReason::Stop;
    } else if !l.req.stop_strings.is_empty() {
        let tk = model.tokenizer()?;
        let text = tk.decode(&l.out.tokens, false)?;
        if l.req.stop_strings.iter().any(|s| text.contains(s.as_str())) {
            l.out.stop_reason = StopReason::Stop;
        }
    }
    Ok(())
}
