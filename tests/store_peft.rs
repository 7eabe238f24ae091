//! PEFT export: the files carry PEFT's names, shapes and config; the `.tar` holds the same
//! bytes; and an adapter trained by loraplex, loaded by Python `peft` onto transformers'
//! model from the same GGUF, gives the same logits.
//!
//! The interop test needs Python with torch, transformers, peft and gguf: set
//! `LORAPLEX_REF_PYTHON` to that interpreter (e.g. `/work/venv-ref/bin/python`). When it is
//! unset the test prints that it skipped and passes. It also needs the shipped SmolLM2
//! GGUF (`scripts/fetch-model.sh`).

mod common;

use candle_core::{DType, Device};
use common::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::{LoraConfig, LoraWeights, Site, Target};
use loraplex::model::{BaseModel, InferRow, KvCache};
use loraplex::store::checkpoint::{self, CheckpointKind};
use loraplex::store::peft::{self, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE};
use loraplex::train::loss::{BuiltinLoss, LossConfig};
use loraplex::train::{check_data, forward_backward, Datum, TrainableAdapter, Work};
use loraplex::util::SplitMix64;
use std::io::Read;

#[test]
fn export_has_peft_names_shapes_and_config() {
    let model = tiny(DType::F32);
    let mut w = random_adapter(&model, 4, 3, true);
    w.config.alpha = 6.0;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("export");
    let files = peft::export_peft_dir(&w, "org/tiny", &dir).unwrap();
    assert_eq!(
        files,
        [dir.join(PEFT_CONFIG_FILE), dir.join(PEFT_WEIGHTS_FILE)]
    );

    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(PEFT_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 3);
    assert_eq!(cfg["lora_alpha"], 6);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["base_model_name_or_path"], "org/tiny");
    let mut targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "lm_head",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );

    let st = candle_core::safetensors::load(dir.join(PEFT_WEIGHTS_FILE), &Device::Cpu).unwrap();
    assert_eq!(st.len(), w.pairs.len() * 2);
    let q = &st["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"];
    assert_eq!(q.dims(), [model.config.q_dim(), 3]);
    let g = &st["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"];
    assert_eq!(g.dims(), [3, model.config.hidden_size]);
    let head = &st["base_model.model.lm_head.lora_B.weight"];
    assert_eq!(head.dims(), [model.config.vocab_size, 3]);
    for (site, p) in &w.pairs {
        let b = &st[&peft::peft_tensor_name(*site, true)];
        assert_eq!(flat(b), flat(&p.b), "{site:?}");
    }
    assert_eq!(
        peft::peft_tensor_name(Site::Layer(3, Target::Down), false),
        "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"
    );

    // The archive holds the same two files, byte for byte, whether made from the weights
    // or from a checkpoint of them.
    let ckpt = tmp.path().join("ckpt");
    checkpoint::write_checkpoint(&ckpt, CheckpointKind::Sampler, &w, None).unwrap();
    for from_checkpoint in [false, true] {
        let mut tar_bytes = Vec::new();
        if from_checkpoint {
            peft::export_checkpoint_tar(&ckpt, "org/tiny", &mut tar_bytes).unwrap();
        } else {
            peft::export_peft_tar(&w, "org/tiny", &mut tar_bytes).unwrap();
        }
        let mut ar = tar::Archive::new(tar_bytes.as_slice());
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut got = Vec::new();
            e.read_to_end(&mut got).unwrap();
            let on_disk = std::fs::read(dir.join(&name)).unwrap();
            assert_eq!(got, on_disk, "{name}");
            seen.push(name);
        }
        assert_eq!(seen, [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]);
    }
    // An export never overwrites.
    assert!(peft::export_peft_dir(&w, "org/tiny", &dir).is_err());
}

/// Logits at every position of `tokens`, one token at a time through the KV cache.
fn logits(model: &BaseModel, tokens: &[u32], adapter: Option<&LoraWeights>) -> Vec<f32> {
    let refs: Vec<&LoraWeights> = adapter.into_iter().collect();
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    for t in tokens {
        let row = InferRow {
            tokens: std::slice::from_ref(t),
            adapter: adapter.map(|_| 0),
        };
        let (last, _) = model
            .forward_infer(&[row], &mut [&mut cache], &refs, false)
            .unwrap();
        out.extend(flat(&last));
    }
    out
}

fn write_f32(path: &std::path::Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn peft_loads_the_export_and_matches_loraplex_logits() {
    let Some(python) = std::env::var_os("LORAPLEX_REF_PYTHON") else {
        println!(
            "SKIPPED peft_loads_the_export_and_matches_loraplex_logits: set LORAPLEX_REF_PYTHON \
             to a Python with torch, transformers, peft and gguf to run it"
        );
        return;
    };
    let model = smollm2();
    let v = model.config.vocab_size;
    let cfg = LoraConfig::from_tinker(8, 11, true, true, true).unwrap();
    let mut a =
        TrainableAdapter::new(LoraWeights::init(&cfg, &model.config, &Device::Cpu).unwrap());
    let text = "The quick brown fox jumps over the lazy dog. Tinker with adapters!";
    let tok = model.tokenizer().unwrap().encode(text).unwrap();
    let lc = LossConfig::new();
    let adam = AdamParams {
        learning_rate: 5e-3,
        ..Default::default()
    };
    // A few steps, so every B is far from zero.
    let mut rng = SplitMix64::new(2);
    for _ in 0..3 {
        let data = vec![
            Datum::next_token(&tok, 1),
            Datum::next_token(&tokens(&mut rng, 12, v), 1),
        ];
        let data = check_data(model, data).unwrap();
        let (r, g) = forward_backward(
            model,
            &[&a.weights],
            &[Work {
                adapter: Some(0),
                data: &data,
                loss: &BuiltinLoss::CrossEntropy,
                config: &lc,
            }],
            false,
        )
        .unwrap();
        r.into_iter().next().unwrap().unwrap();
        a.accumulate(g.into_iter().next().unwrap()).unwrap();
        a.optim_step(&adam).unwrap();
    }
    let min_b = a
        .weights
        .pairs
        .values()
        .map(|p| flat(&p.b).iter().fold(0f32, |m, x| m.max(x.abs())))
        .fold(f32::INFINITY, f32::min);
    assert!(min_b > 1e-3, "every B moved (smallest max |B| {min_b})");

    let probe: Vec<u32> = tok[..12].to_vec();
    let base = logits(model, &probe, None);
    let lora = logits(model, &probe, Some(&a.weights));

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    peft::export_peft_dir(&a.weights, loraplex::config::DEFAULT_MODEL_NAME, &dir).unwrap();
    std::fs::write(
        tmp.path().join("tokens.json"),
        serde_json::to_vec(&probe).unwrap(),
    )
    .unwrap();
    write_f32(&tmp.path().join("base.bin"), &base);
    write_f32(&tmp.path().join("lora.bin"), &lora);
    let out = tmp.path().join("out.json");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/peft_interop.py");
    let status = std::process::Command::new(python)
        .arg(script)
        .arg("--gguf")
        .arg(model_path())
        .arg("--adapter")
        .arg(&dir)
        .arg("--tokens")
        .arg(tmp.path().join("tokens.json"))
        .arg("--base-logits")
        .arg(tmp.path().join("base.bin"))
        .arg("--lora-logits")
        .arg(tmp.path().join("lora.bin"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "peft_interop.py failed: {status}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let num = |k: &str| r[k].as_f64().unwrap();
    println!("PEFT interop: {r:#}");
    assert_eq!(r["tensors_checked"], (a.weights.pairs.len() * 2) as u64);
    assert_eq!(r["lora_parameters_in_model"], r["tensors_checked"]);
    assert!(
        num("adapter_effect") > 0.1,
        "the adapter changes the logits"
    );
    assert!(num("max_abs_diff_base") < 1e-3, "base logits agree");
    assert!(
        num("max_abs_diff_lora") < 1e-3,
        "logits with the adapter agree"
    );
    assert!(
        num("max_abs_diff_if_qk_permuted") > 10.0 * num("max_abs_diff_lora"),
        "the q/k row order matters, so the match above checks it"
    );
}
