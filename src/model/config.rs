//! Shape of a Llama-family model: the numbers read from GGUF metadata or a Hugging Face
//! `config.json`. Owns validation of those numbers; knows nothing of weights.

use crate::error::{Error, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Llama 3.x frequency scaling of RoPE (`rope_scaling.rope_type = "llama3"`).
    pub rope_llama3: Option<Llama3Rope>,
    /// Per-frequency divisors of RoPE's inverse frequencies, `head_dim / 2` of them: GGUF's
    /// `rope_freqs` tensor (how llama.cpp stores Llama 3.1 scaling).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The family: which optional pieces of math a layer has.
    pub arch: Arch,
    /// Biases on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm over each query and key head before RoPE, weights `[head_dim]` (Qwen3).
    pub qk_norm: bool,
}

/// Model families this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arch {
    #[default]
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    /// The name used by GGUF `general.architecture` and Hugging Face `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3Rope {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

impl LlamaConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Query heads that share one key/value head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Unsupported(format!("model config: {m}")));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return bad("num_heads must be a positive multiple of num_kv_heads");
        }
        if self.head_dim % 2 != 0 {
            return bad("head_dim must be even for RoPE");
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and num_layers must be positive");
        }
        Ok(())
    }

    /// A tiny random model's shape, for tests and the `tiny` CLI tool.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            rope_llama3: None,
            rope_freq_factors: None,
            arch: Arch::Llama,
            attention_bias: false,
            qk_norm: false,
        }
    }
}

/// The subset of a Hugging Face `config.json` we read.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f32>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_scaling: Option<serde_json::Value>,
    pub model_type: Option<String>,
}

impl HfConfig {
    pub fn into_config(self) -> Result<LlamaConfig> {
        if let Some(t) = &self.model_type {
            if t != "llama" {
                return Err(Error::Unsupported(format!(
                    "model_type {t:?}: only the llama architecture is implemented"
                )));
            }
        }
        let rope_llama3 = match &self.rope_scaling {
            Some(v) if v.get("rope_type").and_then(|t| t.as_str()) == Some("llama3") => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| Error::Unsupported(format!("rope_scaling: {e}")))?,
            ),
            Some(serde_json::Value::Null) | None => None,
            Some(v) => {
                return Err(Error::Unsupported(format!("rope_scaling {v}")));
            }
        };
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            rope_llama3,
            rope_freq_factors: None,
            arch: Arch::Llama,
            attention_bias: false,
            qk_norm: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
