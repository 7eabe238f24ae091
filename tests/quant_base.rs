//! Base weights kept packed (`--base-dtype as-stored` or `bf16`: GGUF blocks, bf16, f16)
//! against the same values expanded to f32 (the path every other test checks against
//! transformers and finite differences).
//!
//! - Every layout (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, BF16, F16), on a tiny random model
//!   whose matrices are quantized by candle (an independent implementation): logprobs and
//!   every LoRA gradient match the dequantized f32 model to accumulation order, and greedy
//!   decoding with the KV cache gives the same tokens and logits. Qwen2 (q/k/v biases) and
//!   Qwen3 (q/k norms) run through the same check in Q4_1.
//! - The shipped SmolLM2 GGUF loaded as stored (Q4_1 layers, Q8_0 embeddings) against the
//!   same file expanded to f32: the same logprobs and gradients, the same greedy tokens,
//!   and memory at most the file's size.

mod common;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use common::passes::{compare, Case};
use common::*;
use loraplex::lora::LoraWeights;
use loraplex::model::{
    Arch, BaseDtype, BaseModel, BaseWeights, InferRow, KvCache, LlamaConfig, Packed, QKind,
    QMatrix, Weight,
};
use std::sync::Arc;

/// A tiny model whose every matrix dimension holds whole 256-value blocks (the K layouts').
fn config(arch: Arch) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 96,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        max_position_embeddings: 64,
        arch,
        attention_bias: arch == Arch::Qwen2,
        qk_norm: arch == Arch::Qwen3,
        ..LlamaConfig::tiny()
    }
}

/// One matrix in `kind`, packed, and its dequantized values as a dense f32 weight.
fn pack(w: &Weight, kind: QKind) -> (Weight, Weight) {
    let t = w.dense().expect("dense source");
    let (r, c) = t.dims2().unwrap();
    let bytes = QTensor::quantize(t, kind.ggml())
        .unwrap()
        .data()
        .unwrap()
        .to_vec();
    let q = QMatrix::new(kind, r, c, bytes).unwrap();
    let dense = Tensor::from_vec(q.to_f32(), (r, c), &Device::Cpu).unwrap();
    (
        Weight::Packed(Arc::new(Packed::new(vec![q]).unwrap())),
        Weight::Dense(dense),
    )
}

/// `model` with every matrix in `kind`: packed, and expanded to f32 (the reference).
fn packed_pair(model: &BaseModel, kind: QKind) -> (BaseModel, BaseModel) {
    let w = &model.weights;
    let mut packed = w.clone();
    let mut dense = w.clone();
    (packed.embed, dense.embed) = pack(&w.embed, kind);
    (packed.lm_head, dense.lm_head) = pack(&w.lm_head, kind);
    for (l, lw) in w.layers.iter().enumerate() {
        (packed.layers[l].wqkv, dense.layers[l].wqkv) = pack(&lw.wqkv, kind);
        (packed.layers[l].wo, dense.layers[l].wo) = pack(&lw.wo, kind);
        (packed.layers[l].wgate_up, dense.layers[l].wgate_up) = pack(&lw.wgate_up, kind);
        (packed.layers[l].wdown, dense.layers[l].wdown) = pack(&lw.wdown, kind);
    }
    let build = |weights: BaseWeights| {
        BaseModel::from_parts(
            "packed",
            model.config.clone(),
            weights,
            None,
            None,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    };
    (build(packed), build(dense))
}

/// Greedy decoding of `steps` tokens after `prompt` (with adapter 0 when given): the
/// tokens and each step's logits.
fn greedy(
    model: &BaseModel,
    prompt: &[u32],
    steps: usize,
    ads: &[&LoraWeights],
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let adapter = (!ads.is_empty()).then_some(0);
    let mut cache = KvCache::default();
    let mut toks = Vec::new();
    let mut all = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..steps {
        let rows = [InferRow {
            tokens: &next,
            adapter,
        }];
        let (logits, _) = model
            .forward_infer(&rows, &mut [&mut cache], ads, false)
            .unwrap();
        let l = flat(&logits);
        let t = l
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        toks.push(t);
        all.push(l);
        next = vec![t];
    }
    (toks, all)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0f32, f32::max)
}

/// The packed model against its dequantized twin: a training pass, and greedy decoding.
fn packed_matches_dequantized(model: &BaseModel, kind: QKind, label: &str) {
    let (packed, dense) = packed_pair(model, kind);
    let v = model.config.vocab_size;
    let ads = [
        random_adapter(model, 1, 4, true),
        random_adapter(model, 2, 2, false),
    ];
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    // Rows that take the streaming kernel (few tokens) and the tiled GEMM (many).
    let case = Case::new(&[(3, 1, Some(0)), (40, 2, Some(1)), (7, 1, None)], v, 11);
    let (lp_err, g_err) = compare(&case.run(&packed, &refs), &case.run(&dense, &refs));
    eprintln!(
        "{label} {}: logprobs {lp_err:.2e}, gradients {g_err:.2e}",
        kind.name()
    );
    assert!(
        lp_err < 1e-4,
        "{label} {}: logprobs differ by {lp_err}",
        kind.name()
    );
    assert!(
        g_err < 1e-4,
        "{label} {}: gradients differ by {g_err}",
        kind.name()
    );

    let prompt: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % v as u32).collect();
    let (t_ref, l_ref) = greedy(&dense, &prompt, 6, &refs[..1]);
    let (t_pk, l_pk) = greedy(&packed, &prompt, 6, &refs[..1]);
    let d_exact = max_diff(&l_pk, &l_ref);
    assert_eq!(t_pk, t_ref, "{label} {}: greedy tokens", kind.name());
    assert!(
        d_exact < 1e-4,
        "{label} {}: decode logits differ by {d_exact}",
        kind.name()
    );
}

#[test]
fn every_layout_trains_and_decodes_like_its_dequantized_weights() {
    let model = BaseModel::random(config(Arch::Llama), 3, DType::F32).unwrap();
    for kind in QKind::ALL {
        packed_matches_dequantized(&model, kind, "llama");
    }
}

#[test]
fn qwen_families_run_packed() {
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let model = BaseModel::random(config(arch), 4, DType::F32).unwrap();
        packed_matches_dequantized(&model, QKind::Q4_1, arch.name());
    }
}

#[test]
fn smollm2_as_stored_matches_smollm2_expanded() {
    let f32m = smollm2();
    let path = model_path();
    let stored = BaseModel::load_as(
        &path,
        loraplex::config::DEFAULT_MODEL_NAME,
        &Device::Cpu,
        DType::F32,
        BaseDtype::AsStored,
    )
    .unwrap();
    assert_eq!(stored.weights.layout(), "Q8_0, Q4_1");
    let file = std::fs::metadata(&path).unwrap().len() as usize;
    eprintln!(
        "weights: as stored {} bytes, f32 {} bytes, file {file} bytes",
        stored.weight_bytes(),
        f32m.weight_bytes()
    );
    assert!(
        stored.weight_bytes() <= file,
        "packed weights outgrow their file"
    );
    assert!(f32m.weight_bytes() > 4 * file);

    let ads = [random_adapter(f32m, 5, 8, false)];
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    let case = Case::new(
        &[(5, 1, Some(0)), (60, 1, Some(0))],
        f32m.config.vocab_size,
        2,
    );
    let (lp_err, g_err) = compare(&case.run(&stored, &refs), &case.run(f32m, &refs));
    eprintln!("SmolLM2 as stored vs f32: logprobs {lp_err:.2e}, gradients {g_err:.2e}");
    assert!(lp_err < 1e-3 && g_err < 1e-3, "{lp_err} {g_err}");

    let tok = stored.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is").unwrap();
    let (t_ref, l_ref) = greedy(f32m, &prompt, 12, &[]);
    let (t_stored, l_stored) = greedy(&stored, &prompt, 12, &[]);
    let d = max_diff(&l_stored, &l_ref);
    eprintln!(
        "SmolLM2 greedy: {:?}; decode logits as stored within {d:.2e} of f32",
        tok.decode(&t_ref, false).unwrap_or_default(),
    );
    assert_eq!(t_stored, t_ref, "greedy decoding as stored");
    assert!(d < 1e-3, "decode logits differ by {d}");
}

/// The official SDK against a real `loraplex serve` serving SmolLM2 as stored and in f32
/// side by side (`--model NAME=PATH@DTYPE`): adapters trained on each follow the same loss
/// curve and decode the same tokens (tests/sdk/quant_base.py).
#[test]
fn official_sdk_trains_and_samples_on_smollm2_as_stored_as_on_f32() {
    let python = common::server::sdk_python();
    assert!(
        python.exists(),
        "no Python with the tinker SDK at {}: run ./scripts/setup-sdk.sh or set LORAPLEX_SDK_PYTHON",
        python.display()
    );
    let path = model_path();
    let data = common::http::temp_dir("sdk-quant");
    let stored = format!("smol-stored={}@as-stored", path.display());
    let f32s = format!("smol-f32={}@f32", path.display());
    let (_server, port) =
        common::server::start_server_cmd(&data, &["--model", &stored, "--model", &f32s], &[]);
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/quant_base.py");
    let file = std::fs::metadata(&path).unwrap().len();
    let status = std::process::Command::new(&python)
        .arg(&script)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .env("LORAPLEX_FILE_BYTES", file.to_string())
        .env("TINKER_TELEMETRY", "0")
        .status()
        .expect("run the SDK script");
    let _ = std::fs::remove_dir_all(&data);
    assert!(status.success(), "the SDK script failed: {status}");
}
