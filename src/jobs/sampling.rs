//! The sampling engine: one lane (a blocking thread) that decodes for every sampling
//! session at once with continuous batching. Each step is one `forward_infer` over all live
//! sequences (new ones prefill their prompt in the same pass as the others' decode step),
//! whatever their adapter snapshot; sequences join between steps and leave as they finish.
//! The step itself (the forward, each sequence's choice and stop tests) is
//! [`crate::sample::decode::step`], which `sample::generate` runs too; this module owns
//! the loop around it: admission, fairness, shared prompt KV, the prefix cache, futures.
//!
//! Why a lane of its own rather than the training lanes' loop: a decode step is short and a
//! training pass long, so sharing one loop would hold every decoding sequence behind the
//! longest training batch. On one device the two lanes share the cores; the OS interleaves
//! them at step granularity.
//!
//! Per request: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, stop
//! token ids and stop strings (a matched stop token is the last token returned; a stop
//! string ends the sequence at the token that completes it), seed (same seed, same output),
//! num_samples, max_tokens, top-k logprobs of each sampled token, an optional
//! [`TokenSampler`] (a tenant's plugin) in place of the built-in choice, and what it asks
//! of its prompt ([`crate::sample::prompt`]: prompt logprobs, their top-k, target ids'
//! logprobs, alternative draws).
//!
//! Prompt KV is computed once where it can be: a request's first sequence prefills the
//! prompt and the other `num_samples - 1` start from copies of its KV and its last logits
//! (each with its own random stream), and a prompt that starts like an earlier one of the
//! same sampling session takes the shared prefix's KV from the [`PrefixCache`] and prefills
//! the rest. A prefix is never taken where the request needs the prefix's logits (prompt
//! logprobs before `prompt_logprobs_last_n`, target rows, alternative draws), and never
//! across sampling sessions, so never across tenants or weights.

use super::future::Futures;
use super::ids::{FutureId, TenantId};
use super::metrics::Metrics;
use super::output::{JobFailure, JobOutput};
pub use super::output::{SampleOutput, SampledSeq};
use super::registry::Session;
use crate::error::{Error, Result};
use crate::lora::LoraWeights;
use crate::model::{BaseModel, KvCache};
use crate::sample::decode::{self, Decoding, SeqAsk, Sequence};
pub use crate::sample::decode::{SequenceSampler, TokenSampler};
use crate::sample::prefix_cache::{common_prefix, Owner, PrefixCache};
use crate::sample::prompt::{
    PromptAsk, PromptScores, PromptTargets, MAX_PROMPT_ALT_TOKENS, MAX_PROMPT_CELLS,
};
use crate::sample::SamplingParams;
use crate::util::SplitMix64;
use std::collections::{HashMap, HashSet, VecDeque};
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

/// Told of a request's sequences when it succeeds, before its future completes, so what
/// it keeps is there by the time anyone reads the result (the Tinker layer records
/// sequences sampled with `record_stability_info`).
pub trait SampleRecorder: Send + Sync {
    fn record(&self, future: &FutureId, prompt: &[u32], out: &SampleOutput);
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
    /// Tinker's `prompt_logprobs_last_n`: only the last n prompt tokens are scored (plain
    /// and top-k), and the prefix before them may come from the prefix cache. Carried into
    /// [`SampleOutput`] so the result renders the same whenever it is read.
    pub prompt_logprobs_last_n: Option<usize>,
    /// Tinker's `target_prompt_logprobs`: token ids to score at prompt positions.
    pub target_prompt_logprobs: Option<Arc<PromptTargets>>,
    /// Tinker's `prompt_alt_tokens_k`: draws from the model's distribution (at the
    /// request's temperature) at every prompt position after the first.
    pub prompt_alt_tokens_k: usize,
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
        let rows = self.prompt.len().saturating_sub(1);
        if let Some(n) = self.prompt_logprobs_last_n {
            if n == 0 || n > rows {
                return Err(Error::invalid(
                    "prompt_logprobs_last_n",
                    format!("{n}: must be between 1 and len(prompt) - 1 = {rows}"),
                ));
            }
        }
        if let Some(t) = &self.target_prompt_logprobs {
            t.validate(self.prompt.len(), model.config.vocab_size)?;
        }
        let k = self.prompt_alt_tokens_k;
        if k > MAX_PROMPT_ALT_TOKENS || rows.saturating_mul(k) > MAX_PROMPT_CELLS {
            return Err(Error::invalid(
                "prompt_alt_tokens_k",
                format!(
                    "{k} draws at {rows} positions; at most {MAX_PROMPT_ALT_TOKENS} per position and {MAX_PROMPT_CELLS} in all"
                ),
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

pub(crate) struct SampleJob {
    pub future: FutureId,
    pub tenant: TenantId,
    pub session: Arc<Session>,
    /// Its snapshot's weights, pinned in memory until the job is dropped.
    pub pin: Option<super::snapshot::SnapshotPin>,
    pub req: Arc<SampleRequest>,
    pub span: tracing::Span,
}

pub(crate) struct SamplerCtx {
    /// The served base this lane samples from, by name, and the model.
    pub base: String,
    pub model: Arc<BaseModel>,
    pub futures: Arc<Futures>,
    pub metrics: Arc<Metrics>,
    /// Requests accepted and not finished; admission control reads it.
    pub outstanding: Arc<AtomicUsize>,
    pub max_decode_batch: usize,
    /// KV positions the live sequences may reserve together (see [`SampleRequest::positions`]).
    pub max_kv_tokens: usize,
    /// Bytes of prompt KV kept between requests ([`PrefixCache`]).
    pub prefix_cache_bytes: usize,
    /// A request's sequences start from one prefill of its prompt.
    pub share_prompt_kv: bool,
}

/// A request whose prompt another being prefilled shares at least this many more tokens
/// than the cache holds now waits one step for it: a step costs about as much as
/// prefilling this many tokens.
const MIN_DEFER_TOKENS: usize = 32;

/// Mixed into a request's seed for its prompt's alternative draws, so they do not
/// consume its sequences' random streams.
const ALT_SEED: u64 = 0xA17_70C3_5EED;

/// A request's prefilled prompt, from which its other sequences start.
struct Fork {
    cache: KvCache,
    /// The last prompt position's logits: each sequence draws its first token from them.
    logits: Arc<Vec<f32>>,
}

struct JobAcc {
    job: SampleJob,
    seqs: Vec<Option<SampledSeq>>,
    left: usize,
    /// The request's seed (or the time's), for the prompt's draws.
    seed: u64,
    /// What the prompt's logits gave so far: made at the first logits, so requests still
    /// queued hold no room for answers.
    scores: Option<PromptScores>,
    /// Prompt tokens of the first sequence served by the prefix cache.
    cache_hit: usize,
    /// Set once the first sequence has prefilled; dropped when the last one has forked.
    fork: Option<Fork>,
    /// Sequences still to start from `fork`.
    forks_left: usize,
    failed: bool,
}

/// What a request asks of its prompt.
fn ask_of(req: &SampleRequest, seed: u64) -> PromptAsk<'_> {
    PromptAsk {
        prompt: &req.prompt,
        logprobs: req.prompt_logprobs,
        top_k: req.prompt_top_logprobs,
        last_n: req.prompt_logprobs_last_n,
        targets: req.target_prompt_logprobs.as_deref(),
        alt_k: req.prompt_alt_tokens_k,
        temperature: req.params.temperature,
        seed: seed ^ ALT_SEED,
    }
}

struct Live {
    future: FutureId,
    tenant: TenantId,
    index: usize,
    req: Arc<SampleRequest>,
    weights: Option<Arc<LoraWeights>>,
    /// Its sampling session, whose prefix-cache entries it may use.
    owner: Owner,
    /// Its KV cache, random stream and output so far.
    seq: Sequence,
    /// It waited a step once for a shared prompt to reach the prefix cache.
    deferred: bool,
}

impl Decoding for Live {
    fn parts(&mut self) -> (SeqAsk<'_>, &mut Sequence) {
        let r = &*self.req;
        let ask = SeqAsk {
            prompt: &r.prompt,
            params: &r.params,
            stop_strings: &r.stop_strings,
            top_logprobs: r.top_logprobs,
            sampler: r.sampler.as_deref(),
        };
        (ask, &mut self.seq)
    }
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
    cache: PrefixCache,
    /// KV bytes of one position (all layers, keys and values).
    kv_bytes_per_token: usize,
}

impl Sampler {
    fn new(ctx: SamplerCtx) -> Self {
        let c = &ctx.model.config;
        let kv_bytes_per_token = 2 * c.num_layers * c.kv_dim() * ctx.model.dtype.size_in_bytes();
        Sampler {
            cache: PrefixCache::new(ctx.prefix_cache_bytes),
            kv_bytes_per_token,
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
            self.join_waiting();
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

    /// Admit waiting sequences while the batch has room and their KV reservations fit (at
    /// least one always runs, so no request waits forever). A request's later sequences
    /// join once its first has prefilled, starting from copies of that KV.
    fn join_waiting(&mut self) {
        let forks: usize = self
            .jobs
            .values()
            .filter(|a| a.fork.is_some())
            .map(|a| a.job.req.prompt.len())
            .sum();
        let mut reserved: usize = self
            .live
            .iter()
            .map(|l| l.req.seq_positions())
            .sum::<usize>()
            + forks;
        let mut skip: HashSet<(FutureId, usize)> = HashSet::new();
        let mut prefilling: Vec<(Owner, Arc<SampleRequest>)> = Vec::new();
        while self.live.len() < self.ctx.max_decode_batch {
            let Some(i) = self.next_waiting(&skip) else {
                break;
            };
            let need = self.waiting[i].req.seq_positions();
            if !self.live.is_empty() && reserved + need > self.ctx.max_kv_tokens {
                break;
            }
            if self.forks(&self.waiting[i]) {
                let Some(mut l) = self.waiting.remove(i) else {
                    break;
                };
                match self.fork(&mut l) {
                    Ok(true) => {
                        reserved += need;
                        self.live.push(l);
                    }
                    Ok(false) => self.seq_done(l),
                    Err(e) => {
                        let f = l.future.clone();
                        self.fail_job(&f, &e);
                    }
                }
                continue;
            }
            if self.should_wait(&self.waiting[i], &prefilling) {
                let w = &mut self.waiting[i];
                w.deferred = true;
                skip.insert((w.future.clone(), w.index));
                continue;
            }
            let Some(mut l) = self.waiting.remove(i) else {
                break;
            };
            if let Err(e) = self.take_cached_prefix(&mut l) {
                tracing::warn!(error = %e, "prefix cache lookup failed; prefilling the whole prompt");
                l.seq.cache = KvCache::default();
            }
            prefilling.push((l.owner.clone(), l.req.clone()));
            reserved += need;
            self.live.push(l);
        }
    }

    /// Whether this sequence starts from its request's first sequence's prefill.
    fn forks(&self, l: &Live) -> bool {
        self.ctx.share_prompt_kv && l.index > 0
    }

    /// Prompt tokens this sequence may take from the prefix cache: never the last (its
    /// logits pick the first token), nor any whose logits the request reads.
    fn max_cached(&self, l: &Live) -> usize {
        let n = l.req.prompt.len().saturating_sub(1);
        let first = (l.index == 0)
            .then(|| self.jobs.get(&l.future))
            .flatten()
            .and_then(|a| ask_of(&a.job.req, a.seed).first_position());
        first.map_or(n, |p| p.min(n))
    }

    /// Wait a step when a prompt being prefilled now shares more with this one than the
    /// cache does: the next step finds it in the cache. Once per sequence.
    fn should_wait(&self, w: &Live, prefilling: &[(Owner, Arc<SampleRequest>)]) -> bool {
        if !self.cache.enabled() || w.deferred {
            return false;
        }
        let max = self.max_cached(w);
        let have = self.cache.peek(&w.owner, &w.req.prompt, max);
        prefilling.iter().any(|(o, r)| {
            let bytes = r.prompt.len() * (self.kv_bytes_per_token + 4);
            o.same(&w.owner)
                && self.cache.fits(bytes)
                && common_prefix(&r.prompt, &w.req.prompt).min(max) >= have + MIN_DEFER_TOKENS
        })
    }

    /// Start a sequence's prefill from the longest prefix of its prompt the cache holds.
    fn take_cached_prefix(&mut self, l: &mut Live) -> Result<()> {
        let max = self.max_cached(l);
        if !self.cache.enabled() || max == 0 {
            return Ok(());
        }
        if let Some(kv) = self.cache.lookup(&l.owner, &l.req.prompt, max)? {
            if l.index == 0 {
                if let Some(acc) = self.jobs.get_mut(&l.future) {
                    acc.cache_hit = kv.len;
                }
            }
            l.seq.cache = kv;
        }
        Ok(())
    }

    /// Start a sequence from its request's prefilled prompt: a copy of the prompt's KV and
    /// its first token drawn from the prompt's last logits. False: it is already done.
    fn fork(&mut self, l: &mut Live) -> Result<bool> {
        let model = self.ctx.model.clone();
        let gone = || Error::Unavailable("a sequence's prefilled prompt is missing".into());
        let acc = self.jobs.get_mut(&l.future).ok_or_else(gone)?;
        acc.forks_left = acc.forks_left.saturating_sub(1);
        let (cache, logits) = if acc.forks_left == 0 {
            let f = acc.fork.take().ok_or_else(gone)?;
            (f.cache, f.logits)
        } else {
            let f = acc.fork.as_ref().ok_or_else(gone)?;
            (f.cache.clone(), f.logits.clone())
        };
        l.seq.cache = cache;
        if l.req.params.max_tokens == 0 {
            return Ok(false);
        }
        let (ask, seq) = l.parts();
        seq.next_token(&model, &ask, &logits)?;
        if !seq.prefilling() {
            self.ctx.metrics.sampled_tokens(&l.tenant, 1);
        }
        Ok(!l.seq.finished(&l.req.params))
    }

    /// Which waiting sequence joins next: the oldest of the tenant with the fewest live, so
    /// one tenant's 100-sample request cannot hold a full batch while another tenant's
    /// single sample waits behind it. Sequences waiting for their request's prefill, or
    /// in `skip`, are passed over.
    fn next_waiting(&self, skip: &HashSet<(FutureId, usize)>) -> Option<usize> {
        let mut live: HashMap<&TenantId, usize> = HashMap::new();
        for l in &self.live {
            *live.entry(&l.tenant).or_default() += 1;
        }
        let mut best: Option<(usize, usize)> = None;
        let mut seen: HashSet<&TenantId> = HashSet::new();
        for (i, w) in self.waiting.iter().enumerate() {
            let ready = if self.forks(w) {
                self.jobs.get(&w.future).is_some_and(|a| a.fork.is_some())
            } else {
                skip.is_empty() || !skip.contains(&(w.future.clone(), w.index))
            };
            if !ready || !seen.insert(&w.tenant) {
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
        let owner = Owner::of(&job.session);
        for index in 0..n {
            self.waiting.push_back(Live {
                future: job.future.clone(),
                tenant: job.tenant.clone(),
                index,
                req: job.req.clone(),
                weights: job.pin.as_ref().map(|p| p.weights.clone()),
                owner: owner.clone(),
                seq: Sequence::new(SplitMix64::new(base_seed.wrapping_add(index as u64))),
                deferred: false,
            });
        }
        self.jobs.insert(
            job.future.clone(),
            JobAcc {
                seqs: vec![None; n],
                left: n,
                seed: base_seed,
                scores: None,
                cache_hit: 0,
                fork: None,
                forks_left: if self.ctx.share_prompt_kv {
                    n.saturating_sub(1)
                } else {
                    0
                },
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
        let prefilled: Vec<bool> = self.live.iter().map(|l| l.seq.prefilling()).collect();
        // Tokens each row feeds: the prompt after its cached prefix, or its last token.
        let fed: Vec<usize> = self
            .live
            .iter()
            .map(|l| l.seq.input(&l.req.prompt).len())
            .collect();
        let pos0: Vec<usize> = self.live.iter().map(|l| l.seq.cache.len).collect();
        // Which rows' prompt logits the request reads, from where (counted from the row's
        // first new token).
        let from: Vec<Option<usize>> = self
            .live
            .iter()
            .map(|l| {
                if !(l.seq.prefilling() && l.index == 0) {
                    return None;
                }
                let a = self.jobs.get(&l.future)?;
                let p = ask_of(&a.job.req, a.seed).first_position()?;
                Some(p.saturating_sub(l.seq.cache.len))
            })
            .collect();
        let row_job: Vec<Option<FutureId>> = self
            .live
            .iter()
            .zip(&from)
            .map(|(l, f)| f.map(|_| l.future.clone()))
            .collect();
        // One forward over every live sequence and a token for each (the decode step that
        // `sample::generate` runs too).
        let decode::Stepped { logits, chosen } = {
            let refs: Vec<&LoraWeights> = snaps.iter().map(|s| &**s).collect();
            let vocab = model.config.vocab_size;
            let jobs = &mut self.jobs;
            let mut visit = |row: usize, first: usize, logits: &[f32]| -> Result<()> {
                let Some(f) = row_job.get(row).and_then(Option::as_ref) else {
                    return Ok(());
                };
                let Some(acc) = jobs.get_mut(f) else {
                    return Ok(());
                };
                let req = acc.job.req.clone();
                let ask = ask_of(&req, acc.seed);
                acc.scores
                    .get_or_insert_with(|| PromptScores::new(&ask))
                    .visit(&ask, pos0[row] + first, logits, vocab)
            };
            decode::step(&model, &mut self.live, &slot, &refs, &from, &mut visit)?
        };
        // A prefilled prompt: the request's other sequences start from it, and later
        // requests of its sampling session may start from its prefix.
        for (i, l) in self.live.iter().enumerate() {
            if !prefilled[i] || l.seq.cache.len != l.req.prompt.len() {
                continue;
            }
            if self.ctx.share_prompt_kv && l.index == 0 && l.req.num_samples > 1 {
                if let Some(acc) = self.jobs.get_mut(&l.future) {
                    acc.fork = Some(Fork {
                        cache: l.seq.cache.clone(),
                        logits: Arc::new(logits[i].clone()),
                    });
                }
            }
            if self.cache.enabled() {
                let kv = &l.seq.cache;
                if let Err(e) = self
                    .cache
                    .insert_with(&l.owner, &l.req.prompt, kv.bytes(), || Ok(kv.clone()))
                {
                    tracing::warn!(error = %e, "prompt KV not cached");
                }
            }
        }
        let mut failed: Vec<(FutureId, Error)> = Vec::new();
        let mut done: Vec<usize> = Vec::new();
        for (i, (l, chosen)) in self.live.iter().zip(chosen).enumerate() {
            let tenant = self.jobs.get(&l.future).map(|a| &a.job.tenant);
            if let (true, Some(t)) = (prefilled[i], tenant) {
                self.ctx.metrics.sampled_tokens(t, fed[i] as u64);
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
            if let (Some(t), false) = (tenant, l.seq.prefilling()) {
                self.ctx.metrics.sampled_tokens(t, 1);
            }
            if l.seq.finished(&l.req.params) {
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

    fn seq_done(&mut self, mut l: Live) {
        // A single sequence's whole KV (prompt and what it generated) may start the next
        // turn of its conversation.
        if self.cache.enabled() && l.req.num_samples == 1 && self.jobs.contains_key(&l.future) {
            let mut kv = std::mem::take(&mut l.seq.cache);
            kv.shrink_to_fit();
            let mut tokens = Vec::with_capacity(kv.len);
            tokens.extend(l.req.prompt.iter().chain(&l.seq.out.tokens).take(kv.len));
            if let Err(e) = self
                .cache
                .insert_with(&l.owner, &tokens, kv.bytes(), || Ok(kv))
            {
                tracing::warn!(error = %e, "sequence KV not cached");
            }
        }
        let Some(acc) = self.jobs.get_mut(&l.future) else {
            return;
        };
        if let Some(s) = acc.seqs.get_mut(l.index) {
            *s = Some(l.seq.out);
        }
        acc.left -= 1;
        if acc.left > 0 {
            return;
        }
        let Some(acc) = self.jobs.remove(&l.future) else {
            return;
        };
        tracing::info!(parent: &acc.job.span, cache_hit = acc.cache_hit, "sample done");
        let PromptScores {
            logprobs,
            top,
            targets,
            alt,
        } = match acc.scores {
            Some(s) => s,
            None => PromptScores::new(&ask_of(&acc.job.req, acc.seed)),
        };
        let out = SampleOutput {
            sequences: acc.seqs.into_iter().flatten().collect(),
            prompt_logprobs: logprobs,
            prompt_top_logprobs: top,
            prompt_logprobs_last_n: acc.job.req.prompt_logprobs_last_n,
            target_prompt_logprobs: targets,
            prompt_alt_tokens: alt,
            prompt_cache_hit_tokens: acc.cache_hit,
            base_model: Some(self.ctx.base.clone()),
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
