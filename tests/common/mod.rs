//! Test fixtures built by code: tiny random models and adapters, the shipped SmolLM2, and
//! the built plugin components. Components come from `plugins/dist/` (or
//! `$LORAPLEX_PLUGIN_DIST`); the first test that needs one runs `plugins/build.sh` once per
//! test binary (about a second when CI already ran it). `LORAPLEX_SKIP_PLUGIN_BUILD=1` only
//! reads what is there.
//!
//! `LORAPLEX_TEST_DEVICE=cuda` (a build with `--features cuda`) puts the tiny models, the
//! shipped SmolLM2 and the adapters made here on the first GPU; unset or `cpu`, on the CPU.
#![allow(dead_code)]

pub mod http;
pub mod passes;
pub mod server;
pub mod wire;

use candle_core::{DType, Device, Tensor};
use loraplex::lora::{LoraConfig, LoraWeights, Target};
use loraplex::model::{BaseModel, LlamaConfig};
use loraplex::util::SplitMix64;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The device the numerics tests run on: `LORAPLEX_TEST_DEVICE` (`cpu`, the default, or
/// `cuda`). Asking for CUDA where there is none fails the test rather than testing the CPU.
pub fn device() -> Device {
    match std::env::var("LORAPLEX_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| {
            panic!(
                "LORAPLEX_TEST_DEVICE=cuda, but no CUDA device (build with --features cuda): {e}"
            )
        }),
        Ok(other) => panic!("LORAPLEX_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

/// The tiny seeded random model (`BaseModel::random`), on [`device`].
pub fn tiny(dtype: DType) -> BaseModel {
    let dev = device();
    if dev.is_cpu() {
        return BaseModel::random(LlamaConfig::tiny(), 7, dtype).expect("tiny model");
    }
    let cfg = LlamaConfig::tiny();
    let w = loraplex::model::weights::random(&cfg, 7, &dev, dtype).expect("tiny weights");
    BaseModel::from_parts("tiny-random", cfg, w, None, None, &dev, dtype).expect("tiny model")
}

/// The tiny shape in each family: Llama, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k
/// norms, a head width that is not hidden / heads).
pub fn tiny_families(dtype: DType) -> Vec<(&'static str, BaseModel)> {
    use loraplex::model::Arch;
    let llama = LlamaConfig::tiny();
    let qwen2 = LlamaConfig {
        arch: Arch::Qwen2,
        attention_bias: true,
        ..LlamaConfig::tiny()
    };
    let qwen3 = LlamaConfig {
        arch: Arch::Qwen3,
        qk_norm: true,
        head_dim: 6,
        ..LlamaConfig::tiny()
    };
    [("llama", llama), ("qwen2", qwen2), ("qwen3", qwen3)]
        .into_iter()
        .map(|(n, c)| (n, BaseModel::random(c, 7, dtype).expect("tiny model")))
        .collect()
}

/// An adapter on every site with random (non-zero) A and B, so every gradient is non-trivial.
pub fn random_adapter(model: &BaseModel, seed: u64, rank: usize, unembed: bool) -> LoraWeights {
    let cfg = LoraConfig {
        rank,
        alpha: rank as f32,
        seed,
        targets: Target::ALL.to_vec(),
        train_unembed: unembed,
    };
    let mut w = LoraWeights::init(&cfg, &model.config, &model.device).expect("init");
    let mut rng = SplitMix64::new(seed ^ 0xB);
    for p in w.pairs.values_mut() {
        let dims = p.b.dims().to_vec();
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
        p.b = Tensor::from_vec(v, dims, &model.device).expect("b");
    }
    w
}

pub fn tokens(rng: &mut SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

pub fn model_path() -> PathBuf {
    std::env::var_os("LORAPLEX_MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(loraplex::config::DEFAULT_MODEL_PATH)
        })
}

/// The shipped SmolLM2 in f32 on [`device`], loaded once per test binary.
pub fn smollm2() -> &'static BaseModel {
    static M: OnceLock<BaseModel> = OnceLock::new();
    M.get_or_init(|| {
        let p = model_path();
        BaseModel::load(
            &p,
            loraplex::config::DEFAULT_MODEL_NAME,
            &device(),
            DType::F32,
        )
        .unwrap_or_else(|e| panic!("load {}: {e} (run scripts/fetch-model.sh)", p.display()))
    })
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

use std::process::Command;

pub fn dist_dir() -> PathBuf {
    std::env::var_os("LORAPLEX_PLUGIN_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist"))
}

fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("LORAPLEX_SKIP_PLUGIN_BUILD").is_some() {
            return;
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("LORAPLEX_PLUGIN_DIST", dist_dir())
            .output()
            .expect("running plugins/build.sh");
        assert!(
            out.status.success(),
            "plugins/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The bytes of a built plugin, by crate name (e.g. "ppo-clip").
pub fn component(name: &str) -> Vec<u8> {
    ensure_built();
    let path = dist_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
