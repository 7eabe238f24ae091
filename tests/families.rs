//! Every model family and file format against transformers: tiny random Llama 3 (llama3
//! RoPE scaling, untied), tied Llama, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm,
//! head_dim ≠ hidden / heads), each loaded from its Hugging Face directory and from its GGUF
//! (plus sharded, bf16, f16 and `rope_parameters` variants), must give transformers'
//! log-probabilities, LoRA gradients and greedy continuations (tests/reference/families/,
//! made by make_families.py, float64) to 1e-4 relative, on the host kernels and on the candle
//! reference path. Then: every config key, tensor type and architecture we do not implement
//! is refused naming it, and the GGUF quantized types dequantize as gguf-py does.

mod common;

use candle_core::{DType, Device, Tensor};
use common::flat;
use loraplex::lora::{LoraConfig, LoraWeights, Target};
use loraplex::model::weights::GgufFile;
use loraplex::model::{BaseModel, TrainRow};
use loraplex::sample::{generate, GenerateRequest, SamplingParams};
use loraplex::store::peft::peft_tensor_name;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The committed references, or `LORAPLEX_FAMILIES_DIR` (a `make_families.py --out` run).
fn dir() -> PathBuf {
    std::env::var_os("LORAPLEX_FAMILIES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/families")
        })
}

fn expected() -> &'static Value {
    static E: OnceLock<Value> = OnceLock::new();
    E.get_or_init(|| {
        let p = dir().join("expected.json");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).expect("expected.json parses")
    })
}

fn load(path: &Path) -> BaseModel {
    BaseModel::load(path, "tiny", &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn load_err(path: &Path) -> String {
    match BaseModel::load(path, "tiny", &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded, but should be refused", path.display()),
        Err(e) => e.to_string(),
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The family's LoRA, from PEFT-named safetensors (rank and alpha from expected.json).
fn lora(model: &BaseModel, family: &str) -> LoraWeights {
    let e = &expected()["lora"];
    let cfg = LoraConfig {
        rank: e["rank"].as_u64().expect("rank") as usize,
        alpha: e["alpha"].as_f64().expect("alpha") as f32,
        seed: 0,
        targets: Target::ALL.to_vec(),
        train_unembed: true,
    };
    let mut w = LoraWeights::init(&cfg, &model.config, &Device::Cpu).expect("init");
    let file = candle_core::safetensors::load(
        dir().join(format!("{family}.lora.safetensors")),
        &Device::Cpu,
    )
    .expect("lora file");
    assert_eq!(file.len(), 2 * w.pairs.len(), "one A and one B per site");
    for (site, pair) in w.pairs.iter_mut() {
        let a = &file[&peft_tensor_name(*site, false)];
        let b = &file[&peft_tensor_name(*site, true)];
        assert_eq!(a.dims(), pair.a.dims(), "{site:?} A");
        assert_eq!(b.dims(), pair.b.dims(), "{site:?} B");
        pair.a = a.clone();
        pair.b = b.clone();
    }
    w
}

/// `|got - want| <= tol * (1 + |want|)` everywhere; returns the worst relative error.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        assert!(
            err <= tol,
            "{what}[{i}]: loraplex {g} vs transformers {w} (error {err:e})"
        );
        worst = worst.max(err);
    }
    worst
}

const TOL: f32 = 1e-4;

/// Logprobs (with and without the LoRA, at the targets and at the probe ids), LoRA
/// gradients and greedy continuations of `model` against the family's references.
fn check(model: &BaseModel, family: &str, label: &str) {
    let e = &expected()["families"][family];
    let rows: Vec<Vec<u32>> = e["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(u32s)
        .collect();
    let probes = u32s(&expected()["probe_ids"]);
    let ad = lora(model, family);
    let inputs: Vec<&[u32]> = rows.iter().map(|r| &r[..r.len() - 1]).collect();
    let targets: Vec<&[u32]> = rows.iter().map(|r| &r[1..]).collect();
    let probe_targets: Vec<Vec<u32>> = inputs
        .iter()
        .map(|t| t.iter().flat_map(|_| probes.iter().copied()).collect())
        .collect();

    for (adapter, key) in [(None, ""), (Some(0), "_lora")] {
        let ads: Vec<&LoraWeights> = adapter.map(|_| &ad).into_iter().collect();
        let train_rows: Vec<TrainRow> = inputs
            .iter()
            .zip(&targets)
            .map(|(t, g)| TrainRow {
                tokens: t,
                targets: g,
                k: 1,
                adapter,
            })
            .collect();
        let (lp, tape) = model
            .forward_train(
                &model.train_batch(&train_rows).expect("rows"),
                &ads,
                adapter.is_some(),
            )
            .expect("forward_train");
        for (i, got) in lp.iter().enumerate() {
            close(
                &format!("{label}: logprobs{key} row {i}"),
                got,
                &f32s(&e[format!("logprobs{key}")][i]),
                TOL,
            );
        }
        let probe_rows: Vec<TrainRow> = inputs
            .iter()
            .zip(&probe_targets)
            .map(|(t, g)| TrainRow {
                tokens: t,
                targets: g,
                k: probes.len(),
                adapter,
            })
            .collect();
        let (plp, _) = model
            .forward_train(&model.train_batch(&probe_rows).expect("rows"), &ads, false)
            .expect("forward_train at probes");
        for (i, got) in plp.iter().enumerate() {
            close(
                &format!("{label}: probe logprobs{key} row {i}"),
                got,
                &f32s(&e[format!("probe_logprobs{key}")][i]),
                TOL,
            );
        }

        if let Some(tape) = tape {
            let seeds: Vec<Vec<f32>> = e["loss_weights"]
                .as_array()
                .expect("weights")
                .iter()
                .map(f32s)
                .collect();
            let grads = model.backward(tape, &seeds, &ads).expect("backward");
            let g = &grads[0];
            assert_eq!(
                g.pairs.len(),
                ad.pairs.len(),
                "{label}: every site gets a gradient"
            );
            for (site, (da, db)) in &g.pairs {
                for (is_b, got) in [(false, da), (true, db)] {
                    let name = peft_tensor_name(*site, is_b);
                    let want = f32s(&e["lora_grads"][&name]);
                    let got = flat(got);
                    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                    assert!(scale > 0.0, "{label}: {name} has a zero reference gradient");
                    let err = common::max_abs_diff(&got, &want) / scale;
                    assert!(
                        err <= TOL,
                        "{label}: gradient {name} off by {err:e} of its largest entry"
                    );
                }
            }
        }

        let params = SamplingParams {
            max_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        };
        let reqs: Vec<GenerateRequest> = inputs
            .iter()
            .map(|p| GenerateRequest {
                prompt: p,
                adapter,
                params: params.clone(),
                ..Default::default()
            })
            .collect();
        let out = generate(model, &ads, &reqs).expect("generate");
        for (i, o) in out.iter().enumerate() {
            assert_eq!(
                o.tokens,
                u32s(&e[format!("greedy{key}")][i]["tokens"]),
                "{label}: greedy{key} row {i}"
            );
        }
    }
}

/// Both backends: the host kernels and candle's general ops.
fn check_both(path: &Path, family: &str) {
    let model = load(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = name.unwrap_or_default();
    check(&model, family, &format!("{name} (host)"));
    check(
        &model.with_candle_backend(),
        family,
        &format!("{name} (candle)"),
    );
}

#[test]
fn llama3_hf_dir_matches_transformers() {
    check_both(&dir().join("llama3"), "llama3");
}

#[test]
fn llama3_gguf_with_rope_freqs_matches_transformers() {
    check_both(&dir().join("llama3.gguf"), "llama3");
}

#[test]
fn llama3_sharded_dir_matches_transformers() {
    check_both(&dir().join("llama3-sharded"), "llama3");
}

/// transformers 5 writes `rope_parameters` instead of `rope_theta` + `rope_scaling`: the
/// same weights under that config give the same numbers (they once ran with θ = 10000).
#[test]
fn rope_parameters_layout_equals_classic_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("llama3-rope-parameters");
    std::fs::create_dir_all(&d).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir().join("llama3").join(f), d.join(f)).unwrap();
    }
    std::fs::copy(
        dir().join("llama3-rope-parameters/config.json"),
        d.join("config.json"),
    )
    .unwrap();
    let classic = load(&dir().join("llama3"));
    let modern = load(&d);
    assert_eq!(modern.config, classic.config);
    assert_eq!(modern.config.rope_theta, 500000.0);
    assert!(modern.config.rope_llama3.is_some());
    check_both(&d, "llama3");
}

#[test]
fn llama_tied_hf_dir_matches_transformers() {
    check_both(&dir().join("llama-tied"), "llama-tied");
}

#[test]
fn llama_tied_gguf_matches_transformers() {
    check_both(&dir().join("llama-tied.gguf"), "llama-tied");
}

#[test]
fn llama_tied_f16_dir_matches_transformers() {
    check_both(&dir().join("llama-tied-f16"), "llama-tied");
}

#[test]
fn qwen2_hf_dir_matches_transformers() {
    check_both(&dir().join("qwen2"), "qwen2");
}

#[test]
fn qwen2_gguf_matches_transformers() {
    check_both(&dir().join("qwen2.gguf"), "qwen2");
}

#[test]
fn qwen3_hf_dir_matches_transformers() {
    check_both(&dir().join("qwen3"), "qwen3");
}

#[test]
fn qwen3_gguf_matches_transformers() {
    check_both(&dir().join("qwen3.gguf"), "qwen3");
}

#[test]
fn qwen3_bf16_dir_matches_transformers() {
    check_both(&dir().join("qwen3-bf16"), "qwen3");
}

fn assert_same_weights(a: &BaseModel, b: &BaseModel, what: &str) {
    assert_eq!(a.config, b.config, "{what}: config");
    let (wa, wb) = (&a.weights, &b.weights);
    let eq = |name: &str, x: &Tensor, y: &Tensor| {
        assert_eq!(x.dims(), y.dims(), "{what}: {name} shape");
        assert_eq!(flat(x), flat(y), "{what}: {name}");
    };
    eq(
        "embed",
        wa.embed.dense().unwrap(),
        wb.embed.dense().unwrap(),
    );
    eq(
        "lm_head",
        wa.lm_head.dense().unwrap(),
        wb.lm_head.dense().unwrap(),
    );
    eq("final_norm", &wa.final_norm, &wb.final_norm);
    for (i, (la, lb)) in wa.layers.iter().zip(&wb.layers).enumerate() {
        eq(&format!("{i}.attn_norm"), &la.attn_norm, &lb.attn_norm);
        eq(
            &format!("{i}.wqkv"),
            la.wqkv.dense().unwrap(),
            lb.wqkv.dense().unwrap(),
        );
        eq(
            &format!("{i}.wo"),
            la.wo.dense().unwrap(),
            lb.wo.dense().unwrap(),
        );
        eq(&format!("{i}.mlp_norm"), &la.mlp_norm, &lb.mlp_norm);
        eq(
            &format!("{i}.wgate_up"),
            la.wgate_up.dense().unwrap(),
            lb.wgate_up.dense().unwrap(),
        );
        eq(
            &format!("{i}.wdown"),
            la.wdown.dense().unwrap(),
            lb.wdown.dense().unwrap(),
        );
        for (name, x, y) in [
            ("bqkv", &la.bqkv, &lb.bqkv),
            ("q_norm", &la.q_norm, &lb.q_norm),
            ("k_norm", &la.k_norm, &lb.k_norm),
        ] {
            match (x, y) {
                (Some(x), Some(y)) => eq(&format!("{i}.{name}"), x, y),
                (None, None) => {}
                _ => panic!("{what}: layer {i} {name} present in one only"),
            }
        }
    }
}

/// Every format of a family holds the same weights bit for bit: the GGUF (llama's Q/K rows
/// un-permuted, qwen's kept), the shards, bf16 and f16. Checks the loaders without the math.
#[test]
fn every_format_loads_the_same_weights() {
    let d = dir();
    for (a, b) in [
        ("llama3", "llama3-sharded"),
        ("llama-tied", "llama-tied.gguf"),
        ("llama-tied", "llama-tied-f16"),
        ("qwen2", "qwen2.gguf"),
        ("qwen3", "qwen3.gguf"),
        ("qwen3", "qwen3-bf16"),
    ] {
        assert_same_weights(&load(&d.join(a)), &load(&d.join(b)), &format!("{a} vs {b}"));
    }
    // The llama3 GGUF carries the scaling as rope_freqs factors instead of llama3
    // parameters, so only its weights (not its config) equal the directory's.
    let hf = load(&d.join("llama3"));
    let gguf = load(&d.join("llama3.gguf"));
    let mut cfg = gguf.config.clone();
    assert_eq!(
        cfg.rope_freq_factors.as_ref().map(Vec::len),
        Some(cfg.head_dim / 2)
    );
    cfg.rope_freq_factors = None;
    cfg.rope_llama3 = hf.config.rope_llama3;
    let gguf = BaseModel::from_parts(
        "x",
        cfg,
        gguf.weights.clone(),
        None,
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_same_weights(&hf, &gguf, "llama3 vs llama3.gguf");
    // The GGUF's byte-level BPE (tokens, merges, control tokens) encodes as tokenizer.json.
    let text = "Hello, world! <|im_start|>def f(x): return 42 * x<|im_end|> naïve";
    for fam in ["llama3", "qwen2"] {
        let (a, b) = (load(&d.join(fam)), load(&d.join(format!("{fam}.gguf"))));
        let ids = a.tokenizer().unwrap().encode(text).unwrap();
        assert_eq!(ids, b.tokenizer().unwrap().encode(text).unwrap(), "{fam}");
        assert!(ids.contains(&a.tokenizer().unwrap().token_to_id("<|im_start|>").unwrap()));
    }

    // The families' distinguishing parts are really there.
    let q2 = load(&d.join("qwen2"));
    assert!(q2.weights.layers.iter().all(|l| l.bqkv.is_some()));
    let q3 = load(&d.join("qwen3"));
    assert_eq!(q3.config.head_dim, 24);
    assert_ne!(
        q3.config.head_dim,
        q3.config.hidden_size / q3.config.num_heads
    );
    assert!(q3
        .weights
        .layers
        .iter()
        .all(|l| l.q_norm.is_some() && l.k_norm.is_some()));
}

/// `save_hf_dir` writes model_type, biases and norms: a saved directory loads back the same.
#[test]
fn saved_directories_load_back_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for fam in ["llama3", "llama-tied", "qwen2", "qwen3"] {
        let m = load(&dir().join(fam));
        let out = tmp.path().join(fam);
        m.save_hf_dir(&out).unwrap();
        assert_same_weights(&m, &load(&out), &format!("{fam} saved and loaded"));
    }
    // GGUF rope_freqs have no config.json key: refused rather than silently dropped.
    let err = load(&dir().join("llama3.gguf"))
        .save_hf_dir(&tmp.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_freqs"), "{err}");
}

/// A directory with llama3's files and its config.json edited by `edit`.
fn edited_dir(tmp: &Path, name: &str, base: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let d = tmp.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(dir().join(base)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    d
}

#[test]
fn config_fields_that_change_the_math_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, &str, Edit, &[&str])> = vec![
        (
            "llama3",
            "model_type",
            Box::new(|c| c["model_type"] = "mistral".into()),
            &["model_type", "mistral"],
        ),
        (
            "llama3",
            "hidden_act",
            Box::new(|c| c["hidden_act"] = "gelu".into()),
            &["hidden_act", "gelu"],
        ),
        (
            "llama3",
            "mlp_bias",
            Box::new(|c| c["mlp_bias"] = true.into()),
            &["mlp_bias"],
        ),
        (
            "llama3",
            "attention_bias",
            Box::new(|c| c["attention_bias"] = true.into()),
            &["attention_bias", "llama"],
        ),
        (
            "qwen3",
            "attention_bias_qwen3",
            Box::new(|c| c["attention_bias"] = true.into()),
            &["attention_bias", "qwen3"],
        ),
        (
            "llama3",
            "rope_yarn",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
            }),
            &["rope_type", "yarn"],
        ),
        (
            "llama3",
            "rope_linear_old_key",
            Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})),
            &["rope_type", "linear"],
        ),
        (
            "qwen3",
            "rope_parameters_dynamic",
            Box::new(|c| {
                c["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
            }),
            &["rope_parameters", "dynamic"],
        ),
        (
            "llama3",
            "partial_rotary_factor",
            Box::new(|c| c["partial_rotary_factor"] = 0.5.into()),
            &["partial_rotary_factor", "0.5"],
        ),
        (
            "qwen3",
            "partial_rotary_factor_in_rope_parameters",
            Box::new(|c| c["rope_parameters"]["partial_rotary_factor"] = 0.25.into()),
            &["partial_rotary_factor", "0.25"],
        ),
        (
            "qwen2",
            "sliding_window",
            Box::new(|c| {
                c["use_sliding_window"] = true.into();
                c["sliding_window"] = 16.into();
                c["max_window_layers"] = 1.into();
                c.as_object_mut().unwrap().remove("layer_types");
            }),
            &["sliding_window", "Some(16)", "layer_types[1]"],
        ),
        (
            "qwen3",
            "layer_types",
            Box::new(|c| {
                c["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"])
            }),
            &["layer_types[1]", "chunked_attention"],
        ),
        (
            "qwen3",
            "nested_rope_parameters",
            Box::new(|c| {
                c["rope_parameters"] = serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}})
            }),
            &["rope_parameters", "nested"],
        ),
        (
            "llama3",
            "quantization_config",
            Box::new(|c| c["quantization_config"] = serde_json::json!({"quant_method": "gptq"})),
            &["quantization_config"],
        ),
    ];
    for (base, name, edit, needles) in cases {
        let d = edited_dir(tmp.path(), name, base, edit);
        let err = load_err(&d);
        for n in needles {
            assert!(err.contains(n), "{name}: {err:?} should name {n:?}");
        }
    }
    // Harmless or implemented variants still load: a sliding window that covers the whole
    // context, sliding declared but off, attention_bias false on Qwen2 (transformers
    // ignores it there), Hub-style configs without head_dim.
    let ok: Vec<(&str, &str, Edit)> = vec![
        (
            "qwen2",
            "window_covers_context",
            Box::new(|c| {
                c["use_sliding_window"] = true.into();
                c["sliding_window"] = 4096.into();
                c["max_window_layers"] = 0.into();
                c.as_object_mut().unwrap().remove("layer_types");
            }),
        ),
        (
            "qwen2",
            "window_off",
            Box::new(|c| {
                c["use_sliding_window"] = false.into();
                c["sliding_window"] = 16.into();
                c.as_object_mut().unwrap().remove("layer_types");
            }),
        ),
        (
            "qwen2",
            "qwen2_attention_bias_false",
            Box::new(|c| c["attention_bias"] = false.into()),
        ),
        (
            "llama3",
            "no_head_dim",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("head_dim");
                c["attention_dropout"] = 0.1.into();
                c["pretraining_tp"] = 2.into();
            }),
        ),
    ];
    for (base, name, edit) in ok {
        let d = edited_dir(tmp.path(), name, base, edit);
        let m = load(&d);
        assert_eq!(m.config, load(&dir().join(base)).config, "{name}");
    }
}

#[test]
fn unusable_tensors_files_and_dtypes_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = candle_core::safetensors::load(dir().join("llama3/model.safetensors"), &Device::Cpu)
        .unwrap();
    let with = |name: &str, f: &dyn Fn(&mut std::collections::HashMap<String, Tensor>)| {
        let d = edited_dir(tmp.path(), name, "llama3", |_| {});
        let mut t = src.clone();
        f(&mut t);
        candle_core::safetensors::save(&t, d.join("model.safetensors")).unwrap();
        load_err(&d)
    };
    // A dtype other than f32 / bf16 / f16.
    let err = with("f64", &|t| {
        let x = t["model.norm.weight"].to_dtype(DType::F64).unwrap();
        t.insert("model.norm.weight".into(), x);
    });
    assert!(
        err.contains("model.norm.weight") && err.contains("F64"),
        "{err}"
    );
    // A tensor the architecture does not use (an o_proj bias) changes the math.
    let err = with("o_bias", &|t| {
        let b = Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.self_attn.o_proj.bias".into(), b);
    });
    assert!(
        err.contains("model.layers.0.self_attn.o_proj.bias"),
        "{err}"
    );
    // A missing tensor.
    let err = with("missing", &|t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    // A shard named by the index but absent.
    let d = edited_dir(tmp.path(), "sharded", "llama3-sharded", |_| {});
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(&d);
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    // Only the files the index names are read: a stray adapter file is not.
    let d = edited_dir(tmp.path(), "sharded_stray", "llama3-sharded", |_| {});
    std::fs::copy(
        dir().join("llama3.lora.safetensors"),
        d.join("adapter_model.safetensors"),
    )
    .unwrap();
    load(&d);

    // GGUF: an architecture we do not implement.
    let err = load_err(&dir().join("bad-arch.gguf"));
    assert!(err.contains("mamba"), "{err}");
}

/// Each GGUF tensor type we read dequantizes to what gguf-py computes; the types we do not
/// are refused naming the type and the tensor.
#[test]
fn gguf_quant_types_dequantize_like_gguf_py() {
    let mut g = GgufFile::open(&dir().join("quant-zoo.gguf")).unwrap();
    let zoo = expected()["quant_zoo"].as_object().expect("quant_zoo");
    let mut seen = Vec::new();
    for (name, e) in zoo {
        let dtype = e["dtype"].as_str().unwrap();
        if dtype == "Q5_0" {
            let err = g
                .tensor(name, &Device::Cpu, DType::F32)
                .unwrap_err()
                .to_string();
            assert!(err.contains("Q5_0") && err.contains(name), "{err}");
            continue;
        }
        let t = g.tensor(name, &Device::Cpu, DType::F32).unwrap();
        let shape: Vec<usize> = u32s(&e["shape"]).into_iter().map(|x| x as usize).collect();
        assert_eq!(t.dims(), shape, "{name}");
        let want = f32s(&e["values"]);
        let got = flat(&t);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: all zero");
        let err = common::max_abs_diff(&got, &want);
        assert!(err <= 1e-6 * scale, "{name} ({dtype}): off by {err}");
        seen.push(dtype.to_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        ["BF16", "F16", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    );
}

/// The LoRA really moves every family's outputs, so the checks above are not vacuous.
#[test]
fn the_reference_lora_moves_the_outputs() {
    for fam in ["llama3", "llama-tied", "qwen2", "qwen3"] {
        let e = &expected()["families"][fam];
        let a = f32s(&e["logprobs"][0]);
        let b = f32s(&e["logprobs_lora"][0]);
        assert!(common::max_abs_diff(&a, &b) > 0.05, "{fam}");
    }
}
