//! The frozen base model: configuration, weights, tokenizer, chat template and RoPE tables,
//! loaded once and shared read-only by every adapter, and the front every pass goes through
//! ([`front`]: rows, caches, tapes, packing, LM-head chunking). The layers' math lives in
//! one of two backends behind [`backend::Backend`]: the cpu backend (host f32 kernels, for
//! a CPU model in f32) and the candle backend (f64 reference and CUDA).

pub(crate) mod backend;
pub mod batch;
pub mod chat;
pub mod config;
pub mod front;
pub mod tokenizer;
pub mod train_rows;
pub mod weights;

pub use backend::cpu::quant::{Packed, QKind, QMatrix};
pub use batch::PackedBatch;
pub use chat::{ChatTemplate, Message};
pub use config::{Arch, LlamaConfig};
pub use front::{InferRow, KvCache, Tape};
pub use tokenizer::TextTokenizer;
pub use train_rows::{CheckedRow, TrainBatch, TrainRow};
pub use weights::{BaseDtype, BaseWeights, Weight};

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

#[derive(Clone)]
pub struct BaseModel {
    /// The name clients use, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.
    pub name: String,
    pub config: LlamaConfig,
    pub weights: BaseWeights,
    pub tokenizer: Option<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub device: Device,
    /// Dtype of base weights and activations (f32 on CPU, bf16 on CUDA).
    pub dtype: DType,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) sin_neg: Tensor,
    /// The math of its passes: the cpu backend for a CPU model in f32, candle otherwise.
    pub(crate) backend: std::sync::Arc<dyn backend::Backend>,
    /// Softmax probabilities of a training pass are kept for its backward pass while they
    /// fit in this many bytes; beyond it backward recomputes the logits.
    pub(crate) probs_budget: usize,
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModel")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// The default compute device and dtype: CUDA/bf16 when built with `cuda` and a GPU is
/// present, CPU/f32 otherwise (a `cuda` build without a usable GPU says why, and falls back).
pub fn default_device() -> (Device, DType) {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(d) => return (d, DType::BF16),
        Err(e) => tracing::warn!(error = %e, "built with cuda, but no CUDA device: using the CPU"),
    }
    (Device::Cpu, DType::F32)
}

impl BaseModel {
    /// Load the model `args` name on the default device (see [`default_device`]), its
    /// matrices kept as `--base-dtype` says.
    pub fn open(args: &crate::config::ModelArgs) -> Result<Self> {
        let (dev, dt) = default_device();
        Self::load_as(
            &args.model_path,
            &args.model_name,
            &dev,
            dt,
            args.base_dtype,
        )
    }

    /// Load a `.gguf` file or a Hugging Face directory with every base matrix expanded to
    /// `dtype` (the reference path; [`BaseModel::load_as`] keeps them as stored).
    pub fn load(path: &Path, name: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_as(path, name, device, dtype, BaseDtype::F32)
    }

    /// Load a `.gguf` file or a Hugging Face directory, its base matrices kept as `base`
    /// says (packed formats apply to a CPU model in f32, which the cpu backend runs; on a
    /// GPU the matrices are dense in `dtype`).
    pub fn load_as(
        path: &Path,
        name: &str,
        device: &Device,
        dtype: DType,
        base: BaseDtype,
    ) -> Result<Self> {
        crate::config::init_compute_threads();
        let (cfg, weights, tok_src) = if path.is_dir() {
            weights::load_hf_dir(path, device, dtype, base)?
        } else if path.extension().is_some_and(|e| e == "gguf") {
            weights::load_gguf(path, device, dtype, base)?
        } else {
            return Err(Error::load(
                path,
                "expected a .gguf file or a directory with config.json and *.safetensors",
            ));
        };
        let tokenizer = TextTokenizer::from_source(&tok_src)?;
        let chat_template = tok_src
            .chat_template
            .clone()
            .map(|t| ChatTemplate::new(t, &tokenizer));
        let model = Self::from_parts(
            name,
            cfg,
            weights,
            Some(tokenizer),
            chat_template,
            device,
            dtype,
        );
        crate::util::trim_heap();
        model
    }

    pub fn from_parts(
        name: &str,
        config: LlamaConfig,
        weights: BaseWeights,
        tokenizer: Option<TextTokenizer>,
        chat_template: Option<ChatTemplate>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        crate::config::init_compute_threads();
        config.validate()?;
        let (cos, sin) = rope_tables(&config, device, dtype)?;
        let backend = backend::choose(device, dtype);
        if weights.any_packed() && backend.name() != "cpu" {
            return Err(Error::Unsupported(format!(
                "packed base weights ({}) are read by the cpu backend only: a CPU model in f32",
                weights.layout()
            )));
        }
        Ok(BaseModel {
            name: name.to_owned(),
            sin_neg: sin.neg()?,
            cos,
            sin,
            config,
            weights,
            tokenizer,
            chat_template,
            device: device.clone(),
            dtype,
            backend,
            probs_budget: front::KEEP_PROBS_BYTES,
        })
    }

    /// The same model (sharing its weights) on the candle backend: the reference the cpu
    /// backend is tested and benchmarked against. Packed weights get a dense copy (the
    /// candle backend reads only dense ones).
    pub fn with_candle_backend(&self) -> BaseModel {
        BaseModel {
            backend: std::sync::Arc::new(backend::Candle::default()),
            weights: self.dense_weights(),
            ..self.clone()
        }
    }

    /// Its weights, with a dense copy of any packed matrix.
    fn dense_weights(&self) -> BaseWeights {
        if !self.weights.any_packed() {
            return self.weights.clone();
        }
        // Packed weights were read from a file already; expanding them only allocates.
        self.weights
            .to_dense(&self.device, self.dtype)
            .expect("expanding packed base weights for the candle backend")
    }

    /// The same model on the candle backend with at most `bytes` of attention scores per
    /// group of rows (default 256 MiB): a smaller budget runs a batch's rows in more,
    /// smaller groups, down to one row per group at 0. For tests and benchmarks.
    pub fn with_candle_scores_budget(&self, bytes: usize) -> BaseModel {
        BaseModel {
            backend: std::sync::Arc::new(backend::Candle {
                scores_budget: bytes,
            }),
            weights: self.dense_weights(),
            ..self.clone()
        }
    }

    /// Which backend runs its passes: `cpu` or `candle`.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The same model with another budget for kept softmax probabilities (0: backward
    /// always recomputes the logits).
    pub fn with_probs_budget(&self, bytes: usize) -> BaseModel {
        BaseModel {
            probs_budget: bytes,
            ..self.clone()
        }
    }

    /// A seeded random model (no tokenizer), for tests and tools.
    pub fn random(config: LlamaConfig, seed: u64, dtype: DType) -> Result<Self> {
        crate::config::init_compute_threads();
        let w = weights::random(&config, seed, &Device::Cpu, dtype)?;
        Self::from_parts("tiny-random", config, w, None, None, &Device::Cpu, dtype)
    }

    /// Write this model as a Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template).
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        weights::save_hf_dir(&self.config, &self.weights, dir)?;
        self.save_tokenizer_files(dir)
    }

    /// Write a Hugging Face directory without weights: config.json, tokenizer.json and
    /// tokenizer_config.json with the chat template, which is what `AutoTokenizer` reads,
    /// for clients that tokenize locally without the Hub.
    pub fn save_tokenizer_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        weights::save_hf_config(&self.config, dir)?;
        if let Some(t) = &self.tokenizer {
            t.save(&dir.join("tokenizer.json"))?;
            let name = |id: Option<u32>| id.and_then(|i| t.id_to_token(i));
            let cfg = serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": name(t.bos_token_id),
                "eos_token": name(t.eos_token_id),
                "chat_template": self.chat_template.as_ref().map(|c| c.source()),
                "model_max_length": self.config.max_position_embeddings,
            });
            std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string())?;
        }
        Ok(())
    }

    /// Bytes its frozen weights take in memory (see [`BaseWeights::bytes`]).
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this model has no tokenizer".into()))
    }

    /// Check a row of token ids against the vocabulary and context length.
    pub fn check_tokens(&self, field: &str, tokens: &[u32], pos0: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid(field, "empty token sequence"));
        }
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(
                field,
                format!(
                    "token id {t} at position {i} is outside the vocabulary (size {})",
                    self.config.vocab_size
                ),
            ));
        }
        let end = pos0 + tokens.len();
        if end > self.config.max_position_embeddings {
            return Err(Error::invalid(
                field,
                format!(
                    "sequence reaches position {end}, beyond the context length {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }
}

fn rope_tables(c: &LlamaConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    let mut inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (c.rope_theta as f64).powf(2.0 * i as f64 / c.head_dim as f64))
        .collect();
    if let Some(s) = c.rope_llama3 {
        let old = s.original_max_position_embeddings as f64;
        let low_wl = old / s.low_freq_factor as f64;
        let high_wl = old / s.high_freq_factor as f64;
        for f in inv.iter_mut() {
            let wl = 2.0 * std::f64::consts::PI / *f;
            if wl > low_wl {
                *f /= s.factor as f64;
            } else if wl >= high_wl {
                let smooth = (old / wl - s.low_freq_factor as f64)
                    / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                *f = (1.0 - smooth) * *f / s.factor as f64 + smooth * *f;
            }
        }
    }
    if let Some(f) = &c.rope_freq_factors {
        for (x, d) in inv.iter_mut().zip(f) {
            *x /= *d as f64;
        }
    }
    let n = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
    ))
}
