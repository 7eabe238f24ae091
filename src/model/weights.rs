//! The frozen base weights and where they come from: GGUF files (dequantized), Hugging Face
//! safetensors directories, or a seeded random tiny model. Owns tensor naming and layout
//! (fused QKV and gate/up matrices, GGUF's RoPE row permutation undone). Never computes.

use super::config::LlamaConfig;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// One transformer block's frozen weights. Matrices are `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    /// q, k and v stacked along the output dimension: `[q_dim + 2 kv_dim, hidden]`.
    pub wqkv: Tensor,
    pub wo: Tensor,
    pub mlp_norm: Tensor,
    /// gate and up stacked: `[2 intermediate, hidden]`.
    pub wgate_up: Tensor,
    pub wdown: Tensor,
    /// Biases of q, k and v stacked like `wqkv`: `[q_dim + 2 kv_dim]` (Qwen2).
    pub bqkv: Option<Tensor>,
    /// Per-head RMSNorm weights of queries and keys, `[head_dim]` each (Qwen3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct BaseWeights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    /// `[vocab, hidden]`; the same storage as `embed` when embeddings are tied.
    pub lm_head: Tensor,
}

impl BaseWeights {
    /// Bytes the weights take in memory: every tensor's elements times its dtype's size,
    /// a tied LM head (the embedding's own tensor) counted once.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(0, size);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                size(&l.attn_norm)
                    + size(&l.wqkv)
                    + size(&l.wo)
                    + size(&l.mlp_norm)
                    + size(&l.wgate_up)
                    + size(&l.wdown)
                    + opt(&l.bqkv)
                    + opt(&l.q_norm)
                    + opt(&l.k_norm)
            })
            .sum();
        let head = if self.lm_head.id() == self.embed.id() {
            0
        } else {
            size(&self.lm_head)
        };
        size(&self.embed) + layers + size(&self.final_norm) + head
    }
}

/// Metadata that travels with the weights: tokenizer material and the chat template.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSource {
    pub gguf_tokens: Option<Vec<String>>,
    pub gguf_merges: Option<Vec<String>>,
    pub gguf_token_types: Option<Vec<i32>>,
    pub tokenizer_json: Option<std::path::PathBuf>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub chat_template: Option<String>,
    /// BOS/EOS token strings named by `tokenizer_config.json`.
    pub special_names: (Option<String>, Option<String>),
}

/// Reverse llama.cpp's `permute` of Q/K rows (made for interleaved RoPE) so that the
/// half-split RoPE of Hugging Face Llama applies, whatever the file format.
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str, path: &Path) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::load(path, format!("missing GGUF metadata {key}")))
}

fn meta_usize(c: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| Error::load(path, format!("{key}: {e}")))
}

fn meta_f32(c: &gguf_file::Content, key: &str) -> Option<f32> {
    c.metadata.get(key).and_then(|v| v.to_f32().ok())
}

fn meta_strings(c: &gguf_file::Content, key: &str) -> Option<Vec<String>> {
    let arr = c.metadata.get(key)?.to_vec().ok()?;
    arr.iter().map(|v| v.to_string().ok().cloned()).collect()
}

/// Load a Llama-architecture GGUF file, dequantizing every tensor to `dtype`.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(LlamaConfig, BaseWeights, TokenizerSource)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::load(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| Error::load(path, e))?;
    let arch = meta(&content, "general.architecture", path)?
        .to_string()
        .map_err(|e| Error::load(path, e))?
        .clone();
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "GGUF architecture {arch:?}: only llama is implemented"
        )));
    }
    let m = |k: &str| meta_usize(&content, &format!("llama.{k}"), path);
    let hidden = m("embedding_length")?;
    let heads = m("attention.head_count")?;
    let tokens = meta_strings(&content, "tokenizer.ggml.tokens");
    let vocab = match m("vocab_size") {
        Ok(v) => v,
        Err(_) => tokens.as_ref().map(|t| t.len()).unwrap_or(0),
    };
    let has_output = content.tensor_infos.contains_key("output.weight");
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: m("feed_forward_length")?,
        num_layers: m("block_count")?,
        num_heads: heads,
        num_kv_heads: m("attention.head_count_kv").unwrap_or(heads),
        head_dim: m("rope.dimension_count").unwrap_or(hidden / heads.max(1)),
        rope_theta: meta_f32(&content, "llama.rope.freq_base").unwrap_or(10000.0),
        rms_norm_eps: meta_f32(&content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5)
            as f64,
        max_position_embeddings: m("context_length").unwrap_or(2048),
        tie_word_embeddings: !has_output,
        rope_llama3: None,
        rope_freq_factors: None,
        arch: super::config::Arch::Llama,
        attention_bias: false,
        qk_norm: false,
    };
    cfg.validate()?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::Unsupported(
            "GGUF with rope_freqs (Llama 3.1 RoPE scaling): load the Hugging Face directory instead"
                .into(),
        ));
    }

    let mut get = |name: &str| -> Result<Tensor> {
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| Error::load(path, format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?.to_dtype(dtype)?)
    };
    let embed = get("token_embd.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let q = unpermute_rows(&get(&p("attn_q.weight"))?, cfg.num_heads)?;
        let k = unpermute_rows(&get(&p("attn_k.weight"))?, cfg.num_kv_heads)?;
        let v = get(&p("attn_v.weight"))?;
        let gate = get(&p("ffn_gate.weight"))?;
        let up = get(&p("ffn_up.weight"))?;
        layers.push(LayerWeights {
            attn_norm: get(&p("attn_norm.weight"))?,
            wqkv: Tensor::cat(&[&q, &k, &v], 0)?,
            wo: get(&p("attn_output.weight"))?,
            mlp_norm: get(&p("ffn_norm.weight"))?,
            wgate_up: Tensor::cat(&[&gate, &up], 0)?,
            wdown: get(&p("ffn_down.weight"))?,
            bqkv: None,
            q_norm: None,
            k_norm: None,
        });
    }
    let final_norm = get("output_norm.weight")?;
    let lm_head = if has_output {
        get("output.weight")?
    } else {
        embed.clone()
    };
    let weights = BaseWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    };
    check_shapes(&cfg, &weights).map_err(|e| Error::load(path, e))?;

    let id = |k: &str| content.metadata.get(k).and_then(|v| v.to_u32().ok());
    let token_types = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|a| a.iter().map(|x| x.to_i32().unwrap_or(1)).collect());
    let tok = TokenizerSource {
        gguf_tokens: tokens,
        gguf_merges: meta_strings(&content, "tokenizer.ggml.merges"),
        gguf_token_types: token_types,
        tokenizer_json: None,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        chat_template: content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()),
        special_names: (None, None),
    };
    Ok((cfg, weights, tok))
}

/// Load a Hugging Face Llama directory: `config.json`, `*.safetensors`, `tokenizer.json`.
pub fn load_hf_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(LlamaConfig, BaseWeights, TokenizerSource)> {
    let cfg_text =
        std::fs::read_to_string(dir.join("config.json")).map_err(|e| Error::load(dir, e))?;
    let hf: super::config::HfConfig =
        serde_json::from_str(&cfg_text).map_err(|e| Error::load(dir, e))?;
    let cfg = hf.into_config()?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::load(dir, "no *.safetensors files"));
    }
    for f in files {
        let part = candle_core::safetensors::load(&f, device).map_err(|e| Error::load(&f, e))?;
        tensors.extend(part);
    }
    let mut get = |name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| Error::load(dir, format!("missing tensor {name}")))?;
        Ok(t.to_dtype(dtype)?)
    };
    let embed = get("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let q = get(&p("self_attn.q_proj.weight"))?;
        let k = get(&p("self_attn.k_proj.weight"))?;
        let v = get(&p("self_attn.v_proj.weight"))?;
        let gate = get(&p("mlp.gate_proj.weight"))?;
        let up = get(&p("mlp.up_proj.weight"))?;
        layers.push(LayerWeights {
            attn_norm: get(&p("input_layernorm.weight"))?,
            wqkv: Tensor::cat(&[&q, &k, &v], 0)?,
            wo: get(&p("self_attn.o_proj.weight"))?,
            mlp_norm: get(&p("post_attention_layernorm.weight"))?,
            wgate_up: Tensor::cat(&[&gate, &up], 0)?,
            wdown: get(&p("mlp.down_proj.weight"))?,
            bqkv: None,
            q_norm: None,
            k_norm: None,
        });
    }
    let final_norm = get("model.norm.weight")?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        get("lm_head.weight")?
    };
    let weights = BaseWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    };
    check_shapes(&cfg, &weights).map_err(|e| Error::load(dir, e))?;
    let tcfg: Option<serde_json::Value> =
        std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
    let chat_template = tcfg
        .as_ref()
        .and_then(|v| v.get("chat_template"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let special = |key: &str| -> Option<String> {
        let v = tcfg.as_ref()?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(|c| c.as_str()))
            .map(str::to_owned)
    };
    let tok = TokenizerSource {
        tokenizer_json: Some(dir.join("tokenizer.json")),
        chat_template,
        special_names: (special("bos_token"), special("eos_token")),
        ..Default::default()
    };
    Ok((cfg, weights, tok))
}

/// Write weights in Hugging Face layout (`config.json` + `model.safetensors`), the inverse of
/// [`load_hf_dir`]. Used to convert a GGUF into a directory and by tests.
pub fn save_hf_dir(cfg: &LlamaConfig, w: &BaseWeights, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    out.insert("model.embed_tokens.weight".into(), f32c(&w.embed)?);
    let (q, kv, i) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    for (l, lw) in w.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.insert(p("input_layernorm.weight"), f32c(&lw.attn_norm)?);
        out.insert(
            p("self_attn.q_proj.weight"),
            f32c(&lw.wqkv.narrow(0, 0, q)?)?,
        );
        out.insert(
            p("self_attn.k_proj.weight"),
            f32c(&lw.wqkv.narrow(0, q, kv)?)?,
        );
        out.insert(
            p("self_attn.v_proj.weight"),
            f32c(&lw.wqkv.narrow(0, q + kv, kv)?)?,
        );
        out.insert(p("self_attn.o_proj.weight"), f32c(&lw.wo)?);
        out.insert(p("post_attention_layernorm.weight"), f32c(&lw.mlp_norm)?);
        out.insert(
            p("mlp.gate_proj.weight"),
            f32c(&lw.wgate_up.narrow(0, 0, i)?)?,
        );
        out.insert(
            p("mlp.up_proj.weight"),
            f32c(&lw.wgate_up.narrow(0, i, i)?)?,
        );
        out.insert(p("mlp.down_proj.weight"), f32c(&lw.wdown)?);
    }
    out.insert("model.norm.weight".into(), f32c(&w.final_norm)?);
    if !cfg.tie_word_embeddings {
        out.insert("lm_head.weight".into(), f32c(&w.lm_head)?);
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors"))?;
    save_hf_config(cfg, dir)
}

/// Write `config.json` for these shapes (what `AutoConfig` and `AutoTokenizer` read).
pub fn save_hf_config(cfg: &LlamaConfig, dir: &Path) -> Result<()> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).map_err(|e| Error::load(dir, e))?,
    )?;
    Ok(())
}

/// A seeded random model of the given shape (weights ~ N(0, 0.02)-ish, norms near 1).
pub fn random(cfg: &LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<BaseWeights> {
    let mut rng = crate::util::SplitMix64::new(seed);
    let mut mat = |rows: usize, cols: usize, std: f32| -> Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * std).collect();
        Ok(Tensor::from_vec(data, (rows, cols), device)?.to_dtype(dtype)?)
    };
    let h = cfg.hidden_size;
    let embed = mat(cfg.vocab_size, h, 0.5)?;
    let mut layers = Vec::new();
    for _ in 0..cfg.num_layers {
        let s = 1.0 / (h as f32).sqrt();
        layers.push(LayerWeights {
            attn_norm: (mat(1, h, 0.1)? + 1.0)?.reshape(h)?,
            wqkv: mat(cfg.q_dim() + 2 * cfg.kv_dim(), h, s)?,
            wo: mat(h, cfg.q_dim(), s)?,
            mlp_norm: (mat(1, h, 0.1)? + 1.0)?.reshape(h)?,
            wgate_up: mat(2 * cfg.intermediate_size, h, s)?,
            wdown: mat(
                h,
                cfg.intermediate_size,
                1.0 / (cfg.intermediate_size as f32).sqrt(),
            )?,
            bqkv: cfg
                .attention_bias
                .then(|| {
                    Ok::<_, Error>(
                        mat(1, cfg.q_dim() + 2 * cfg.kv_dim(), 0.1)?
                            .reshape(cfg.q_dim() + 2 * cfg.kv_dim())?,
                    )
                })
                .transpose()?,
            q_norm: cfg
                .qk_norm
                .then(|| Ok::<_, Error>((mat(1, cfg.head_dim, 0.1)? + 1.0)?.reshape(cfg.head_dim)?))
                .transpose()?,
            k_norm: cfg
                .qk_norm
                .then(|| Ok::<_, Error>((mat(1, cfg.head_dim, 0.1)? + 1.0)?.reshape(cfg.head_dim)?))
                .transpose()?,
        });
    }
    let final_norm = (mat(1, h, 0.1)? + 1.0)?.reshape(h)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        mat(cfg.vocab_size, h, 1.0 / (h as f32).sqrt())?
    };
    Ok(BaseWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

fn check_shapes(cfg: &LlamaConfig, w: &BaseWeights) -> std::result::Result<(), String> {
    let want = |name: &str, t: &Tensor, dims: &[usize]| {
        if t.dims() != dims {
            Err(format!(
                "{name} has shape {:?}, expected {dims:?}",
                t.dims()
            ))
        } else {
            Ok(())
        }
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    want("embeddings", &w.embed, &[v, h])?;
    want("lm_head", &w.lm_head, &[v, h])?;
    want("final norm", &w.final_norm, &[h])?;
    for (i, l) in w.layers.iter().enumerate() {
        want(
            &format!("layer {i} qkv"),
            &l.wqkv,
            &[cfg.q_dim() + 2 * cfg.kv_dim(), h],
        )?;
        want(&format!("layer {i} o"), &l.wo, &[h, cfg.q_dim()])?;
        want(
            &format!("layer {i} gate/up"),
            &l.wgate_up,
            &[2 * cfg.intermediate_size, h],
        )?;
        want(
            &format!("layer {i} down"),
            &l.wdown,
            &[h, cfg.intermediate_size],
        )?;
    }
    Ok(())
}
