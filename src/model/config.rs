//! Shape of a Llama-family model: the numbers read from GGUF metadata or a Hugging Face
//! `config.json`. Owns validation of those numbers; knows nothing of weights.
//!
//! A `config.json` is read for `model_type` `llama`, `qwen2` and `qwen3` (absent: llama).
//! Every key of transformers 5.24's `LlamaConfig`, `Qwen2Config` and `Qwen3Config` is one of:
//!
//! - **implemented**: `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
//!   `num_attention_heads`, `num_key_value_heads` (absent: `num_attention_heads`), `head_dim`
//!   (absent: hidden / heads), `rms_norm_eps`, `max_position_embeddings`,
//!   `tie_word_embeddings`; RoPE in either layout: the classic top-level `rope_theta` with
//!   `rope_scaling`, or transformers 5's `rope_parameters` (`rope_type` `default` or `llama3`
//!   with `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`;
//!   `rope_theta` inside it wins over a top-level one, and a non-null `rope_scaling` wins over
//!   `rope_parameters`, as in transformers); the q/k/v biases of qwen2 (always there:
//!   `Qwen2Attention` ignores `attention_bias`); qwen3's per-head q/k RMSNorm (always there).
//! - **refused** (`Error::Unsupported` naming the key and value), because they change the math
//!   and are not implemented: `model_type` other than the three; `hidden_act` other than
//!   `silu`; `mlp_bias: true`; `attention_bias: true` on llama or qwen3 (it also puts a bias on
//!   `o_proj`); `rope_type` other than `default`/`llama3` (`linear`, `dynamic`, `yarn`,
//!   `longrope`, ...); `partial_rotary_factor` other than 1 (top level or in the RoPE dict);
//!   `rope_parameters` nested per layer type; `layer_types` naming anything but
//!   `full_attention`/`sliding_attention`, and a layer that slides (`sliding_attention`, given
//!   or derived from `use_sliding_window`, `sliding_window` and `max_window_layers` the way
//!   transformers derives it) with a window smaller than `max_position_embeddings` (or none);
//!   `quantization_config` (weights we would misread).
//! - **harmless**: `attention_dropout` (dropout is off in our passes), `initializer_range`,
//!   `use_cache`, `pretraining_tp` (unused by transformers 5.24's Llama), `bos_token_id`,
//!   `eos_token_id`, `pad_token_id`, `architectures`, `dtype`/`torch_dtype`,
//!   `transformers_version`, and keys none of these classes read.

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

impl crate::lora::ModelShape for LlamaConfig {
    fn hidden(&self) -> usize {
        self.hidden_size
    }
    fn intermediate(&self) -> usize {
        self.intermediate_size
    }
    fn vocab(&self) -> usize {
        self.vocab_size
    }
    fn layers(&self) -> usize {
        self.num_layers
    }
    fn q_features(&self) -> usize {
        self.q_dim()
    }
    fn kv_features(&self) -> usize {
        self.kv_dim()
    }
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

/// The subset of a Hugging Face `config.json` we read (see the module doc for every key).
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub partial_rotary_factor: Option<f64>,
    pub model_type: Option<String>,
    pub hidden_act: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub use_sliding_window: Option<bool>,
    pub sliding_window: Option<usize>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub quantization_config: Option<serde_json::Value>,
}

fn refuse<T>(what: impl std::fmt::Display) -> Result<T> {
    Err(Error::Unsupported(format!("model config: {what}")))
}

impl HfConfig {
    pub fn into_config(self) -> Result<LlamaConfig> {
        let arch = match self.model_type.as_deref() {
            None | Some("llama") => Arch::Llama,
            Some("qwen2") => Arch::Qwen2,
            Some("qwen3") => Arch::Qwen3,
            Some(t) => {
                return refuse(format!(
                    "model_type {t:?} is not implemented (llama, qwen2 and qwen3 are)"
                ))
            }
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return refuse(format!("hidden_act {act:?} (only \"silu\" is implemented)"));
            }
        }
        if self.mlp_bias == Some(true) {
            return refuse("mlp_bias true (MLP biases are not implemented)");
        }
        if self.attention_bias == Some(true) && arch != Arch::Qwen2 {
            return refuse(format!(
                "attention_bias true on {} (it adds an o_proj bias, which is not implemented)",
                arch.name()
            ));
        }
        if self.quantization_config.is_some() {
            return refuse("quantization_config (quantized safetensors are not implemented)");
        }
        let max_pos = self.max_position_embeddings.unwrap_or(2048);
        self.check_layer_types(max_pos)?;
        let (rope_theta, rope_llama3) = self.rope(max_pos)?;
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
            rope_theta,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: max_pos,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            rope_llama3,
            rope_freq_factors: None,
            arch,
            attention_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every layer must attend to its whole context: sliding-window layers are refused unless
    /// the window covers `max_position_embeddings`.
    fn check_layer_types(&self, max_pos: usize) -> Result<()> {
        // transformers: the window exists only with use_sliding_window; layers from
        // max_window_layers on slide when layer_types is not given.
        let window = if self.use_sliding_window == Some(true) {
            self.sliding_window
        } else {
            None
        };
        let derived: Vec<String>;
        let types = match &self.layer_types {
            Some(t) => t,
            None => {
                let from = self.max_window_layers.unwrap_or(28);
                derived = (0..self.num_hidden_layers)
                    .map(|i| {
                        if window.is_some() && i >= from {
                            "sliding_attention".to_owned()
                        } else {
                            "full_attention".to_owned()
                        }
                    })
                    .collect();
                &derived
            }
        };
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "full_attention" => {}
                "sliding_attention" => match window {
                    Some(w) if w >= max_pos => {}
                    _ => {
                        return refuse(format!(
                            "layer_types[{i}] is sliding_attention with use_sliding_window {:?} \
                             and sliding_window {:?} below max_position_embeddings {max_pos} \
                             (sliding-window attention is not implemented)",
                            self.use_sliding_window, self.sliding_window
                        ))
                    }
                },
                other => {
                    return refuse(format!(
                        "layer_types[{i}] {other:?} (only full_attention is implemented)"
                    ))
                }
            }
        }
        Ok(())
    }

    /// RoPE base and scaling from either layout (see the module doc).
    fn rope(&self, max_pos: usize) -> Result<(f32, Option<Llama3Rope>)> {
        use serde_json::Value;
        let (field, params) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(v @ Value::Object(_)), _) => ("rope_scaling", v.clone()),
            (Some(Value::Null) | None, Some(v @ Value::Object(_))) => {
                ("rope_parameters", v.clone())
            }
            (Some(Value::Null) | None, Some(Value::Null) | None) => {
                ("rope_parameters", Value::Object(Default::default()))
            }
            (Some(v), _) => return refuse(format!("rope_scaling {v}")),
            (_, Some(v)) => return refuse(format!("rope_parameters {v}")),
        };
        let Value::Object(map) = &params else {
            return refuse(format!("{field} {params}"));
        };
        if map.contains_key("full_attention") || map.contains_key("sliding_attention") {
            return refuse(format!(
                "{field} nested per layer type ({params}) is not implemented"
            ));
        }
        let num = |k: &str| -> Result<Option<f64>> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) => Ok(Some(x)),
                    None => refuse(format!("{field}.{k} {v} is not a number")),
                },
            }
        };
        let partial = num("partial_rotary_factor")?.or(self.partial_rotary_factor);
        if let Some(p) = partial {
            if p != 1.0 {
                return refuse(format!(
                    "partial_rotary_factor {p} (only full rotary embeddings are implemented)"
                ));
            }
        }
        let theta = num("rope_theta")?.or(self.rope_theta).unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return refuse(format!("rope_theta {theta}"));
        }
        let rope_type = match map.get("rope_type").or_else(|| map.get("type")) {
            None | Some(Value::Null) => "default".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return refuse(format!("{field}.rope_type {v}")),
        };
        let llama3 = match rope_type.as_str() {
            "default" => None,
            "llama3" => {
                let need = |k: &str| -> Result<f64> {
                    num(k)?.map_or_else(|| refuse(format!("{field}.{k} is missing")), Ok)
                };
                let original = num("original_max_position_embeddings")?
                    .map(|x| x as usize)
                    .unwrap_or(max_pos);
                let r = Llama3Rope {
                    factor: need("factor")? as f32,
                    low_freq_factor: need("low_freq_factor")? as f32,
                    high_freq_factor: need("high_freq_factor")? as f32,
                    original_max_position_embeddings: original,
                };
                if r.high_freq_factor <= r.low_freq_factor || r.factor <= 0.0 || original == 0 {
                    return refuse(format!("{field} {params}: inconsistent llama3 factors"));
                }
                Some(r)
            }
            other => {
                return refuse(format!(
                    "{field}.rope_type {other:?} (default and llama3 are implemented)"
                ))
            }
        };
        Ok((theta as f32, llama3))
    }
}
