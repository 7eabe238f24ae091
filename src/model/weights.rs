//! The frozen base weights and where they come from: GGUF files (architectures llama, qwen2,
//! qwen3; tensors F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K dequantized at load),
//! Hugging Face safetensors directories (one file or an index of shards; f32, bf16, f16), or
//! a seeded random tiny model. Owns tensor naming and layout (fused QKV and gate/up
//! matrices, q/k/v biases stacked the same way, GGUF's llama RoPE row permutation undone)
//! and refuses any tensor or type it would not use. Never computes.

use super::backend::cpu::quant::{Packed, QKind, QMatrix};
use super::config::{Arch, LlamaConfig};
use crate::error::{Error, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// What is told, on the loading thread, as each layer starts loading.
type LayerHook = Box<dyn FnMut(usize, usize)>;

thread_local! {
    static ON_LAYER: std::cell::RefCell<Option<LayerHook>> = const { std::cell::RefCell::new(None) };
}

/// Call `f(layer, layers)` as this thread starts loading each layer of a model (for
/// `loraplex serve`'s progress bar); `None` stops it.
pub fn on_layer_loading(f: Option<LayerHook>) {
    ON_LAYER.with(|h| *h.borrow_mut() = f);
}

fn layer_loading(i: usize, n: usize) {
    ON_LAYER.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(i, n);
        }
    });
}

/// How base weight matrices are kept in memory (`--base-dtype`). Norms, biases and
/// everything trained (LoRA weights, their gradients, optimizer state) stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseDtype {
    /// As the file stores them: GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), bf16 or
    /// f16 read in place by the cpu backend; f32 stays f32. On a GPU: bf16.
    #[default]
    AsStored,
    /// Every matrix in bf16 (quantized blocks are expanded to bf16 at load).
    Bf16,
    /// Every matrix expanded to f32 at load (the reference path).
    F32,
}

impl BaseDtype {
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::AsStored => "as-stored",
            BaseDtype::Bf16 => "bf16",
            BaseDtype::F32 => "f32",
        }
    }
}

impl std::str::FromStr for BaseDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "as-stored" => Ok(BaseDtype::AsStored),
            "bf16" => Ok(BaseDtype::Bf16),
            "f32" => Ok(BaseDtype::F32),
            other => Err(format!(
                "base dtype {other:?}: expected as-stored, bf16 or f32"
            )),
        }
    }
}

/// One frozen weight matrix `[out, in]`: a dense tensor (f32 or bf16, on any device), or
/// packed blocks that only the cpu backend reads ([`Packed`]: GGUF quantized, bf16, f16).
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Packed(Arc<Packed>),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

impl Weight {
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => Ok(t.dims2()?),
            Weight::Packed(p) => Ok((p.rows(), p.cols())),
        }
    }

    /// The dense tensor; packed weights are refused (the candle backend reads only dense
    /// ones: [`BaseWeights::to_dense`] makes a dense copy).
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Weight::Dense(t) => Ok(t),
            Weight::Packed(p) => Err(Error::Unsupported(format!(
                "a packed {} base weight on a backend that reads only dense ones",
                p.layout()
            ))),
        }
    }

    /// Bytes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Packed(p) => p.bytes(),
        }
    }

    /// How it is kept: `f32`, `bf16`, `Q4_1`, ...
    pub fn layout(&self) -> String {
        match self {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Weight::Packed(p) => p.layout(),
        }
    }

    /// Whether both are the same storage (a tied LM head).
    pub fn same(&self, other: &Weight) -> bool {
        match (self, other) {
            (Weight::Dense(a), Weight::Dense(b)) => a.id() == b.id(),
            (Weight::Packed(a), Weight::Packed(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// A dense copy (packed blocks expanded), on `device` in `dtype`.
    pub fn to_dense(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.to_dtype(dtype)?.to_device(device)?),
            Weight::Packed(p) => {
                Ok(
                    Tensor::from_vec(p.to_f32(), (p.rows(), p.cols()), &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                )
            }
        }
    }

    /// Rows `start..start + len` as a dense f32 tensor on the CPU (exports).
    fn rows_f32(&self, start: usize, len: usize) -> Result<Tensor> {
        Ok(self
            .to_dense(&Device::Cpu, DType::F32)?
            .narrow(0, start, len)?
            .contiguous()?)
    }
}

/// One transformer block's frozen weights. Matrices are `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    /// q, k and v stacked along the output dimension: `[q_dim + 2 kv_dim, hidden]`.
    pub wqkv: Weight,
    pub wo: Weight,
    pub mlp_norm: Tensor,
    /// gate and up stacked: `[2 intermediate, hidden]`.
    pub wgate_up: Weight,
    pub wdown: Weight,
    /// Biases of q, k and v stacked like `wqkv`: `[q_dim + 2 kv_dim]` (Qwen2).
    pub bqkv: Option<Tensor>,
    /// Per-head RMSNorm weights of queries and keys, `[head_dim]` each (Qwen3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct BaseWeights {
    pub embed: Weight,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    /// `[vocab, hidden]`; the same storage as `embed` when embeddings are tied.
    pub lm_head: Weight,
}

impl BaseWeights {
    /// Bytes the weights take in memory: every tensor's elements times its dtype's size,
    /// packed blocks as stored, a tied LM head (the embedding's own storage) counted once.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(0, size);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                size(&l.attn_norm)
                    + l.wqkv.bytes()
                    + l.wo.bytes()
                    + size(&l.mlp_norm)
                    + l.wgate_up.bytes()
                    + l.wdown.bytes()
                    + opt(&l.bqkv)
                    + opt(&l.q_norm)
                    + opt(&l.k_norm)
            })
            .sum();
        let head = if self.lm_head.same(&self.embed) {
            0
        } else {
            self.lm_head.bytes()
        };
        self.embed.bytes() + layers + size(&self.final_norm) + head
    }

    /// Whether any matrix is packed (then only the cpu backend can run it).
    pub fn any_packed(&self) -> bool {
        let p = |w: &Weight| matches!(w, Weight::Packed(_));
        p(&self.embed)
            || p(&self.lm_head)
            || self
                .layers
                .iter()
                .any(|l| p(&l.wqkv) || p(&l.wo) || p(&l.wgate_up) || p(&l.wdown))
    }

    /// How the matrices are kept, e.g. `q4_1` or `Q4_1, f32` when mixed.
    pub fn layout(&self) -> String {
        let mut seen: Vec<String> = Vec::new();
        let mut add = |w: &Weight| {
            let l = w.layout();
            if !seen.contains(&l) {
                seen.push(l);
            }
        };
        add(&self.embed);
        for l in &self.layers {
            for w in [&l.wqkv, &l.wo, &l.wgate_up, &l.wdown] {
                add(w);
            }
        }
        add(&self.lm_head);
        seen.join(", ")
    }

    /// A copy with every matrix dense on `device` in `dtype` (what the candle backend
    /// reads), a tied LM head kept tied.
    pub fn to_dense(&self, device: &Device, dtype: DType) -> Result<BaseWeights> {
        let d = |w: &Weight| -> Result<Weight> { Ok(Weight::Dense(w.to_dense(device, dtype)?)) };
        let embed = d(&self.embed)?;
        let lm_head = if self.lm_head.same(&self.embed) {
            embed.clone()
        } else {
            d(&self.lm_head)?
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    wqkv: d(&l.wqkv)?,
                    wo: d(&l.wo)?,
                    wgate_up: d(&l.wgate_up)?,
                    wdown: d(&l.wdown)?,
                    ..l.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BaseWeights {
            embed,
            layers,
            final_norm: self.final_norm.clone(),
            lm_head,
        })
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

/// GGUF tensor types dequantized at load, with llama.cpp's names. Anything else is refused.
const GGUF_DTYPES: [(GgmlDType, &str); 9] = [
    (GgmlDType::F32, "F32"),
    (GgmlDType::F16, "F16"),
    (GgmlDType::BF16, "BF16"),
    (GgmlDType::Q8_0, "Q8_0"),
    (GgmlDType::Q4_0, "Q4_0"),
    (GgmlDType::Q4_1, "Q4_1"),
    (GgmlDType::Q4K, "Q4_K"),
    (GgmlDType::Q5K, "Q5_K"),
    (GgmlDType::Q6K, "Q6_K"),
];

/// llama.cpp's name of a GGUF tensor type.
fn ggml_name(d: GgmlDType) -> String {
    let other = match d {
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q8K => "Q8_K",
        _ => "",
    };
    GGUF_DTYPES
        .iter()
        .find(|(t, _)| *t == d)
        .map(|(_, n)| *n)
        .unwrap_or(other)
        .to_owned()
}

/// An open GGUF file: its metadata, and its tensors read one at a time, dequantized.
pub struct GgufFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    content: gguf_file::Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::load(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            // candle refuses tensor types it cannot even parse (IQ*, ...) here.
            Error::load(
                path,
                format!("unreadable GGUF (or a tensor type not supported): {e}"),
            )
        })?;
        Ok(GgufFile {
            path: path.to_owned(),
            file,
            content,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Names of every tensor in the file.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    /// One tensor, dequantized to `dtype`: refused unless its type is one of F32, F16, BF16,
    /// Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K.
    pub fn tensor(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name}")))?;
        if !GGUF_DTYPES.iter().any(|(t, _)| *t == info.ggml_dtype) {
            return Err(Error::Unsupported(format!(
                "GGUF tensor {name} has type {}: only {} are implemented",
                ggml_name(info.ggml_dtype),
                GGUF_DTYPES.map(|(_, n)| n).join(", ")
            )));
        }
        // Dequantize on the CPU (every type has a CPU kernel), then move.
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| Error::load(&self.path, format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// One 2-D tensor's blocks as stored, without dequantizing: `None` when its type is not
    /// a layout the cpu backend reads in place (F32 and the rest).
    pub(crate) fn quantized(
        &mut self,
        name: &str,
    ) -> Result<Option<crate::model::backend::cpu::quant::QMatrix>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name}")))?;
        let Some(kind) = QKind::from_ggml(info.ggml_dtype) else {
            return Ok(None);
        };
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| Error::load(&self.path, format!("tensor {name}: {e}")))?;
        let (rows, cols) = q
            .shape()
            .dims2()
            .map_err(|_| Error::load(&self.path, format!("tensor {name} is not 2-D")))?;
        let bytes = q.data()?.into_owned();
        QMatrix::new(kind, rows, cols, bytes).map(Some)
    }

    fn meta(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::load(&self.path, format!("missing GGUF metadata {key}")))
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
            .map_err(|e| Error::load(&self.path, format!("{key}: {e}")))
    }

    fn meta_opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.content.metadata.contains_key(key) {
            self.meta_usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn meta_f32(&self, key: &str) -> Option<f32> {
        self.content.metadata.get(key).and_then(|v| v.to_f32().ok())
    }

    fn meta_string(&self, key: &str) -> Option<String> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    }

    fn meta_strings(&self, key: &str) -> Option<Vec<String>> {
        let arr = self.content.metadata.get(key)?.to_vec().ok()?;
        arr.iter().map(|v| v.to_string().ok().cloned()).collect()
    }
}

/// The row order that undoes llama.cpp's Q/K permutation for `n_head` heads of `rows`:
/// row `(h, j, i)` of the result is row `(h, i, j)` of the file (`j < 2`, `i < hd / 2`).
fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head.max(1);
    let half = hd / 2;
    (0..rows)
        .map(|r| {
            let (h, rest) = (r / hd, r % hd);
            let (j, i) = (rest / half.max(1), rest % half.max(1));
            h * hd + i * 2 + j
        })
        .collect()
}

/// One base matrix as read: dense, or packed blocks for the cpu backend.
enum Part {
    Dense(Tensor),
    Packed(QMatrix),
}

/// Stack parts along the rows into one weight: packed when every part is, else dense
/// (packed parts expanded) in `dtype` on `device`.
fn stack(parts: Vec<Part>, device: &Device, dtype: DType) -> Result<Weight> {
    if parts.iter().all(|p| matches!(p, Part::Packed(_))) {
        let qs = parts
            .into_iter()
            .filter_map(|p| match p {
                Part::Packed(q) => Some(q),
                Part::Dense(_) => None,
            })
            .collect();
        return Ok(Weight::Packed(Arc::new(Packed::new(qs)?)));
    }
    let dense = parts
        .into_iter()
        .map(|p| match p {
            Part::Dense(t) => Ok(t),
            Part::Packed(q) => {
                Ok(
                    Tensor::from_vec(q.to_f32(), (q.rows(), q.cols()), &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                )
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if dense.len() == 1 {
        return Ok(Weight::Dense(dense.into_iter().next().expect("one part")));
    }
    Ok(Weight::Dense(Tensor::cat(
        &dense.iter().collect::<Vec<_>>(),
        0,
    )?))
}

/// Whether base matrices may be kept packed: only for the cpu backend (a CPU model in
/// f32), and not when f32 is asked for.
fn packs(device: &Device, dtype: DType, base: BaseDtype) -> bool {
    device.is_cpu() && dtype == DType::F32 && base != BaseDtype::F32
}

/// Load a GGUF file of architecture llama, qwen2 or qwen3, dequantizing every tensor to
/// `dtype`. Llama's Q/K rows are un-permuted (llama.cpp permutes them for its interleaved
/// RoPE); qwen2/qwen3 are converted with NEOX RoPE, which is Hugging Face's, so their rows
/// are kept. Every tensor in the file must be used: one we do not know would change the math.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    dtype: DType,
    base: BaseDtype,
) -> Result<(LlamaConfig, BaseWeights, TokenizerSource)> {
    let mut g = GgufFile::open(path)?;
    let arch_name = g
        .meta_string("general.architecture")
        .ok_or_else(|| Error::load(path, "missing GGUF metadata general.architecture"))?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF architecture {other:?}: llama, qwen2 and qwen3 are implemented"
            )))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let hidden = g.meta_usize(&key("embedding_length"))?;
    let heads = g.meta_usize(&key("attention.head_count"))?;
    let tokens = g.meta_strings("tokenizer.ggml.tokens");
    let vocab = match g.meta_opt_usize(&key("vocab_size"))? {
        Some(v) => v,
        None => tokens.as_ref().map(|t| t.len()).unwrap_or(0),
    };
    let head_dim = match g.meta_opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None => g
            .meta_opt_usize(&key("rope.dimension_count"))?
            .unwrap_or(hidden / heads.max(1)),
    };
    for k in ["attention.value_length", "rope.dimension_count"] {
        if let Some(d) = g.meta_opt_usize(&key(k))? {
            if d != head_dim {
                return Err(Error::Unsupported(format!(
                    "GGUF {} = {d} differs from the head size {head_dim} (partial RoPE or \
                     distinct value heads are not implemented)",
                    key(k)
                )));
            }
        }
    }
    if let Some(t) = g.meta_string(&key("rope.scaling.type")) {
        if t != "none" {
            return Err(Error::Unsupported(format!(
                "GGUF {} = {t:?}: only unscaled RoPE and llama3's rope_freqs are implemented",
                key("rope.scaling.type")
            )));
        }
    }
    if let Some(n) = g.meta_opt_usize(&key("attention.sliding_window"))? {
        return Err(Error::Unsupported(format!(
            "GGUF {} = {n}: sliding-window attention is not implemented",
            key("attention.sliding_window")
        )));
    }
    let has_output = g.has("output.weight");
    let mut used: std::collections::HashSet<String> = Default::default();
    let rope_freq_factors = if g.has("rope_freqs.weight") {
        used.insert("rope_freqs.weight".into());
        let f = g.tensor("rope_freqs.weight", &Device::Cpu, DType::F32)?;
        let f: Vec<f32> = f.flatten_all()?.to_vec1()?;
        if f.len() != head_dim / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(Error::load(
                path,
                format!(
                    "rope_freqs.weight has {} entries, expected {} positive ones",
                    f.len(),
                    head_dim / 2
                ),
            ));
        }
        Some(f)
    } else {
        None
    };
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: g.meta_usize(&key("feed_forward_length"))?,
        num_layers: g.meta_usize(&key("block_count"))?,
        num_heads: heads,
        num_kv_heads: g
            .meta_opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(heads),
        head_dim,
        rope_theta: g.meta_f32(&key("rope.freq_base")).unwrap_or(10000.0),
        // GGUF stores the config's decimal as f32: read back that decimal, not the f32.
        rms_norm_eps: g
            .meta_f32(&key("attention.layer_norm_rms_epsilon"))
            .map_or(1e-5, |x| x.to_string().parse().unwrap_or(x as f64)),
        max_position_embeddings: g.meta_opt_usize(&key("context_length"))?.unwrap_or(2048),
        tie_word_embeddings: !has_output,
        rope_llama3: None,
        rope_freq_factors,
        arch,
        attention_bias: arch == Arch::Qwen2,
        qk_norm: arch == Arch::Qwen3,
    };
    cfg.validate()?;

    let packing = packs(device, dtype, base);
    let used = std::cell::RefCell::new(used);
    let g = std::cell::RefCell::new(g);
    let get = |name: &str| -> Result<Tensor> {
        used.borrow_mut().insert(name.to_owned());
        g.borrow_mut().tensor(name, device, dtype)
    };
    // A base matrix, its Q/K rows un-permuted for `heads` heads: packed as stored (or as
    // bf16) when the cpu backend will read it and its rows hold whole blocks, else dense.
    let matrix = |name: &str, heads: Option<usize>| -> Result<Part> {
        if packing {
            let q = match base {
                BaseDtype::AsStored => g.borrow_mut().quantized(name)?,
                _ => {
                    let t = g.borrow_mut().tensor(name, &Device::Cpu, DType::F32)?;
                    let (r, c) = t.dims2()?;
                    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                    QMatrix::from_f32(QKind::BF16, r, c, &v).ok()
                }
            };
            if let Some(q) = q {
                used.borrow_mut().insert(name.to_owned());
                return Ok(Part::Packed(match heads {
                    Some(h) => q.permute_rows(&unpermute_order(q.rows(), h))?,
                    None => q,
                }));
            }
        }
        let t = get(name)?;
        Ok(Part::Dense(match heads {
            Some(h) => unpermute_rows(&t, h)?,
            None => t,
        }))
    };
    let llama = arch == Arch::Llama;
    let one = |name: &str| -> Result<Weight> { stack(vec![matrix(name, None)?], device, dtype) };
    let embed = one("token_embd.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        layer_loading(i, cfg.num_layers);
        let p = |s: &str| format!("blk.{i}.{s}");
        let q = matrix(&p("attn_q.weight"), llama.then_some(cfg.num_heads))?;
        let k = matrix(&p("attn_k.weight"), llama.then_some(cfg.num_kv_heads))?;
        let v = matrix(&p("attn_v.weight"), None)?;
        let gate = matrix(&p("ffn_gate.weight"), None)?;
        let up = matrix(&p("ffn_up.weight"), None)?;
        let bqkv = if cfg.attention_bias {
            let (bq, bk, bv) = (
                get(&p("attn_q.bias"))?,
                get(&p("attn_k.bias"))?,
                get(&p("attn_v.bias"))?,
            );
            Some(Tensor::cat(&[&bq, &bk, &bv], 0)?)
        } else {
            None
        };
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(get(&p("attn_q_norm.weight"))?),
                Some(get(&p("attn_k_norm.weight"))?),
            )
        } else {
            (None, None)
        };
        layers.push(LayerWeights {
            attn_norm: get(&p("attn_norm.weight"))?,
            wqkv: stack(vec![q, k, v], device, dtype)?,
            wo: one(&p("attn_output.weight"))?,
            mlp_norm: get(&p("ffn_norm.weight"))?,
            wgate_up: stack(vec![gate, up], device, dtype)?,
            wdown: one(&p("ffn_down.weight"))?,
            bqkv,
            q_norm,
            k_norm,
        });
    }
    let final_norm = get("output_norm.weight")?;
    let lm_head = if has_output {
        one("output.weight")?
    } else {
        embed.clone()
    };
    let (g, used) = (g.into_inner(), used.into_inner());
    if let Some(extra) = g.names().into_iter().find(|n| !used.contains(n)) {
        return Err(Error::Unsupported(format!(
            "GGUF tensor {extra} is not part of the {arch_name} architecture as implemented \
             (biases other than qwen2's q/k/v, extra norms, ...)"
        )));
    }
    let weights = BaseWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    };
    check_shapes(&cfg, &weights).map_err(|e| Error::load(path, e))?;

    let id = |k: &str| g.content.metadata.get(k).and_then(|v| v.to_u32().ok());
    let token_types = g
        .content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|a| a.iter().map(|x| x.to_i32().unwrap_or(1)).collect());
    let tok = TokenizerSource {
        gguf_tokens: tokens,
        gguf_merges: g.meta_strings("tokenizer.ggml.merges"),
        gguf_token_types: token_types,
        tokenizer_json: None,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        chat_template: g.meta_string("tokenizer.chat_template"),
        special_names: (None, None),
    };
    Ok((cfg, weights, tok))
}

/// The safetensors files of a Hugging Face directory: exactly the shards that
/// `model.safetensors.index.json` names, else `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::load(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::load(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::load(&index, "no weight_map object"))?;
        let mut files = std::collections::BTreeSet::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::load(&index, format!("weight_map.{name} is not a file name"))
            })?;
            // Shards are plain names in the directory, never paths out of it.
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(Error::load(
                    &index,
                    format!("weight_map.{name}: shard {f:?} is not a file name"),
                ));
            }
            files.insert(f.to_owned());
        }
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(Error::load(
                    dir,
                    format!("missing shard {f} named by model.safetensors.index.json"),
                ));
            }
            out.push(p);
        }
        if out.is_empty() {
            return Err(Error::load(&index, "weight_map names no shard"));
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::load(
        dir,
        "neither model.safetensors nor model.safetensors.index.json",
    ))
}

/// Read safetensors files, converting f32, bf16 and f16 tensors to `dtype`; any other
/// stored dtype is refused naming it and the tensor.
/// Every tensor of `files` in `dtype` on `device`; with `keep_half`, bf16 and f16 ones stay
/// as stored, on the CPU (for packing).
fn read_safetensors(
    files: &[std::path::PathBuf],
    device: &Device,
    dtype: DType,
    keep_half: bool,
) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    use safetensors::Dtype;
    let mut tensors = HashMap::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::load(f, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::load(f, e))?;
        for (name, view) in st.iter() {
            match view.dtype() {
                Dtype::F32 | Dtype::BF16 | Dtype::F16 => {}
                other => {
                    return Err(Error::Unsupported(format!(
                        "safetensors tensor {name} in {} has dtype {other:?}: only F32, BF16 \
                         and F16 are implemented",
                        f.display()
                    )))
                }
            }
            let t = view
                .load(&Device::Cpu)
                .map_err(|e| Error::load(f, format!("tensor {name}: {e}")))?;
            let t = if keep_half && matches!(t.dtype(), DType::BF16 | DType::F16) {
                t
            } else {
                t.to_dtype(dtype)?.to_device(device)?
            };
            tensors.insert(name.to_owned(), t);
        }
    }
    Ok(tensors)
}

/// Load a Hugging Face directory of a llama, qwen2 or qwen3 model: `config.json`, the
/// safetensors (one file or the shards of an index), `tokenizer.json`. Every tensor must be
/// used, as for GGUF.
pub fn load_hf_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
    base: BaseDtype,
) -> Result<(LlamaConfig, BaseWeights, TokenizerSource)> {
    let cfg_text =
        std::fs::read_to_string(dir.join("config.json")).map_err(|e| Error::load(dir, e))?;
    let hf: super::config::HfConfig =
        serde_json::from_str(&cfg_text).map_err(|e| Error::load(dir, e))?;
    let cfg = hf.into_config()?;
    let files = safetensors_files(dir)?;
    let packing = packs(device, dtype, base);
    let tensors = std::cell::RefCell::new(read_safetensors(&files, device, dtype, packing)?);
    let raw = |name: &str| -> Result<Tensor> {
        tensors
            .borrow_mut()
            .remove(name)
            .ok_or_else(|| Error::load(dir, format!("missing tensor {name}")))
    };
    let get = |name: &str| -> Result<Tensor> { Ok(raw(name)?.to_dtype(dtype)?.to_device(device)?) };
    // A base matrix: bf16/f16 kept packed as stored (or everything as bf16) when the cpu
    // backend will read it and its rows hold whole 32-value blocks, else dense.
    let matrix = |name: &str| -> Result<Part> {
        let t = raw(name)?;
        let kind = match (base, t.dtype()) {
            _ if !packing => None,
            (BaseDtype::Bf16, _) | (_, DType::BF16) => Some(QKind::BF16),
            (_, DType::F16) => Some(QKind::F16),
            _ => None,
        };
        if let Some(kind) = kind {
            let (r, c) = t.dims2()?;
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if let Ok(q) = QMatrix::from_f32(kind, r, c, &v) {
                return Ok(Part::Packed(q));
            }
        }
        Ok(Part::Dense(t.to_dtype(dtype)?.to_device(device)?))
    };
    let one = |name: &str| -> Result<Weight> { stack(vec![matrix(name)?], device, dtype) };
    let embed = one("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        layer_loading(i, cfg.num_layers);
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let q = matrix(&p("self_attn.q_proj.weight"))?;
        let k = matrix(&p("self_attn.k_proj.weight"))?;
        let v = matrix(&p("self_attn.v_proj.weight"))?;
        let gate = matrix(&p("mlp.gate_proj.weight"))?;
        let up = matrix(&p("mlp.up_proj.weight"))?;
        let bqkv = if cfg.attention_bias {
            let (bq, bk, bv) = (
                get(&p("self_attn.q_proj.bias"))?,
                get(&p("self_attn.k_proj.bias"))?,
                get(&p("self_attn.v_proj.bias"))?,
            );
            Some(Tensor::cat(&[&bq, &bk, &bv], 0)?)
        } else {
            None
        };
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(get(&p("self_attn.q_norm.weight"))?),
                Some(get(&p("self_attn.k_norm.weight"))?),
            )
        } else {
            (None, None)
        };
        layers.push(LayerWeights {
            attn_norm: get(&p("input_layernorm.weight"))?,
            wqkv: stack(vec![q, k, v], device, dtype)?,
            wo: one(&p("self_attn.o_proj.weight"))?,
            mlp_norm: get(&p("post_attention_layernorm.weight"))?,
            wgate_up: stack(vec![gate, up], device, dtype)?,
            wdown: one(&p("mlp.down_proj.weight"))?,
            bqkv,
            q_norm,
            k_norm,
        });
    }
    let final_norm = get("model.norm.weight")?;
    let lm_head = if cfg.tie_word_embeddings {
        // transformers ties a stored lm_head to the embeddings anyway.
        tensors.borrow_mut().remove("lm_head.weight");
        embed.clone()
    } else {
        one("lm_head.weight")?
    };
    let mut tensors = tensors.into_inner();
    // Old checkpoints store RoPE's inverse frequencies; they are recomputed from the config.
    tensors.retain(|n, _| !n.ends_with("rotary_emb.inv_freq"));
    if let Some(extra) = tensors.keys().min() {
        return Err(Error::Unsupported(format!(
            "tensor {extra} is not part of the {} architecture as implemented",
            cfg.arch.name()
        )));
    }
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
    if cfg.rope_freq_factors.is_some() {
        // config.json has no key for free-form per-frequency factors.
        return Err(Error::Unsupported(
            "saving a model with GGUF rope_freqs as a Hugging Face directory".into(),
        ));
    }
    std::fs::create_dir_all(dir)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let all = |x: &Weight| -> Result<Tensor> { x.rows_f32(0, x.dims2()?.0) };
    out.insert("model.embed_tokens.weight".into(), all(&w.embed)?);
    let (q, kv, i) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    for (l, lw) in w.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.insert(p("input_layernorm.weight"), f32c(&lw.attn_norm)?);
        for (name, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
            out.insert(
                p(&format!("self_attn.{name}_proj.weight")),
                lw.wqkv.rows_f32(start, len)?,
            );
            if let Some(b) = &lw.bqkv {
                out.insert(
                    p(&format!("self_attn.{name}_proj.bias")),
                    f32c(&b.narrow(0, start, len)?)?,
                );
            }
        }
        if let Some(n) = &lw.q_norm {
            out.insert(p("self_attn.q_norm.weight"), f32c(n)?);
        }
        if let Some(n) = &lw.k_norm {
            out.insert(p("self_attn.k_norm.weight"), f32c(n)?);
        }
        out.insert(p("self_attn.o_proj.weight"), all(&lw.wo)?);
        out.insert(p("post_attention_layernorm.weight"), f32c(&lw.mlp_norm)?);
        out.insert(p("mlp.gate_proj.weight"), lw.wgate_up.rows_f32(0, i)?);
        out.insert(p("mlp.up_proj.weight"), lw.wgate_up.rows_f32(i, i)?);
        out.insert(p("mlp.down_proj.weight"), all(&lw.wdown)?);
    }
    out.insert("model.norm.weight".into(), f32c(&w.final_norm)?);
    if !cfg.tie_word_embeddings {
        out.insert("lm_head.weight".into(), all(&w.lm_head)?);
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors"))?;
    save_hf_config(cfg, dir)
}

/// Write `config.json` for these shapes (what `AutoConfig` and `AutoTokenizer` read), in
/// the classic layout (`rope_theta` and `rope_scaling` at the top level, as on the Hub).
/// GGUF `rope_freqs` factors have no key there and are left out.
pub fn save_hf_config(cfg: &LlamaConfig, dir: &Path) -> Result<()> {
    let class = match cfg.arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
        Arch::Qwen3 => "Qwen3ForCausalLM",
    };
    let rope_scaling = cfg.rope_llama3.map(|r| {
        serde_json::json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        })
    });
    let mut config = serde_json::json!({
        "architectures": [class],
        "model_type": cfg.arch.name(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    if cfg.arch != Arch::Qwen2 {
        // Qwen2 always has q/k/v biases; the others have none (ours never have o biases).
        config["attention_bias"] = serde_json::Value::Bool(false);
    }
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
            wqkv: mat(cfg.q_dim() + 2 * cfg.kv_dim(), h, s)?.into(),
            wo: mat(h, cfg.q_dim(), s)?.into(),
            mlp_norm: (mat(1, h, 0.1)? + 1.0)?.reshape(h)?,
            wgate_up: mat(2 * cfg.intermediate_size, h, s)?.into(),
            wdown: mat(
                h,
                cfg.intermediate_size,
                1.0 / (cfg.intermediate_size as f32).sqrt(),
            )?
            .into(),
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
    let embed = Weight::from(embed);
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        mat(cfg.vocab_size, h, 1.0 / (h as f32).sqrt())?.into()
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
    let want_w = |name: &str, t: &Weight, dims: &[usize]| match t.dims2() {
        Ok((r, c)) if [r, c] == dims => Ok(()),
        Ok((r, c)) => Err(format!("{name} has shape [{r}, {c}], expected {dims:?}")),
        Err(e) => Err(format!("{name}: {e}")),
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    want_w("embeddings", &w.embed, &[v, h])?;
    want_w("lm_head", &w.lm_head, &[v, h])?;
    want("final norm", &w.final_norm, &[h])?;
    for (i, l) in w.layers.iter().enumerate() {
        want_w(
            &format!("layer {i} qkv"),
            &l.wqkv,
            &[cfg.q_dim() + 2 * cfg.kv_dim(), h],
        )?;
        want_w(&format!("layer {i} o"), &l.wo, &[h, cfg.q_dim()])?;
        want_w(
            &format!("layer {i} gate/up"),
            &l.wgate_up,
            &[2 * cfg.intermediate_size, h],
        )?;
        want_w(
            &format!("layer {i} down"),
            &l.wdown,
            &[h, cfg.intermediate_size],
        )?;
        if let Some(b) = &l.bqkv {
            want(
                &format!("layer {i} q/k/v bias"),
                b,
                &[cfg.q_dim() + 2 * cfg.kv_dim()],
            )?;
        }
        for (name, n) in [("q norm", &l.q_norm), ("k norm", &l.k_norm)] {
            if let Some(n) = n {
                want(&format!("layer {i} {name}"), n, &[cfg.head_dim])?;
            }
        }
    }
    Ok(())
}
