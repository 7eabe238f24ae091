//! Built-in losses against hand-computed values and gradients, the RL losses (gspo and
//! stable_reinforce among them) against an independent numpy reference
//! (tests/reference/losses_reference.py: values, finite-difference gradients, metrics),
//! input validation, and AdamW against a hand-written step of torch's algorithm.

mod common;

use candle_core::{Device, Tensor};
use loraplex::lora::optim::{AdamParams, AdamState};
use loraplex::lora::{LoraConfig, LoraGrads, LoraWeights, Site, Target};
use loraplex::model::LlamaConfig;
use loraplex::train::loss::*;
use loraplex::Error;
use serde_json::Value;
use std::path::PathBuf;

fn inputs(pairs: &[(&str, TensorIn)]) -> LossInputs {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn rl_inputs(q: &[f32], a: &[f32]) -> LossInputs {
    let n = q.len();
    inputs(&[
        ("target_tokens", TensorIn::i64(vec![n], vec![1; n])),
        ("logprobs", TensorIn::f32(vec![n], q.to_vec())),
        ("advantages", TensorIn::f32(vec![n], a.to_vec())),
    ])
}

fn run(loss: BuiltinLoss, lp: &[f32], inp: &LossInputs, cfg: &LossConfig) -> LossOutput {
    let d = [LossDatum {
        logprobs: lp,
        len: lp.len(),
        k: 1,
        inputs: inp,
    }];
    let out = loss.compute(&d, cfg).unwrap();
    validate_output(&out, &d).unwrap();
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

#[test]
fn cross_entropy_is_negative_weighted_sum_with_negative_and_fractional_weights() {
    let lp = [-1.0f32, -2.0, -0.5];
    let inp = inputs(&[
        ("target_tokens", TensorIn::i64(vec![3], vec![4, 5, 6])),
        ("weights", TensorIn::f32(vec![3], vec![1.0, -0.5, 0.25])),
    ]);
    let out = run(BuiltinLoss::CrossEntropy, &lp, &inp, &LossConfig::new());
    // −(1·−1 + −0.5·−2 + 0.25·−0.5) = 1 − 1 + 0.125
    assert!(close(out.loss, 0.125), "{}", out.loss);
    assert_eq!(out.grads[0], vec![-1.0, 0.5, -0.25]);
    assert!(close(out.metrics["loss:sum"], 0.125));
}

#[test]
fn cross_entropy_top_k_targets() {
    let lp = [-1.0f32, -3.0, -2.0, -4.0]; // [2, 2]
    let inp = inputs(&[
        ("target_tokens", TensorIn::i64(vec![2, 2], vec![1, 2, 3, 4])),
        (
            "weights",
            TensorIn::f32(vec![2, 2], vec![0.75, 0.25, 0.5, 0.5]),
        ),
    ]);
    let d = [LossDatum {
        logprobs: &lp,
        len: 2,
        k: 2,
        inputs: &inp,
    }];
    let out = BuiltinLoss::CrossEntropy
        .compute(&d, &LossConfig::new())
        .unwrap();
    assert!(close(out.loss, 0.75 + 0.75 + 1.0 + 2.0));
    assert_eq!(out.grads[0], vec![-0.75, -0.25, -0.5, -0.5]);
    assert_eq!(out.elementwise.unwrap()[0], vec![1.5, 3.0]);
}

#[test]
fn importance_sampling_value_and_gradient() {
    let (lp, q, a) = ([-1.0f32, -2.0], [-1.5f32, -1.0], [2.0f32, -1.0]);
    let out = run(
        BuiltinLoss::ImportanceSampling,
        &lp,
        &rl_inputs(&q, &a),
        &LossConfig::new(),
    );
    let r = [(0.5f64).exp(), (-1.0f64).exp()];
    let want = -(r[0] * 2.0 + r[1] * -1.0);
    assert!(close(out.loss, want));
    assert!(close(out.grads[0][0] as f64, -r[0] * 2.0));
    assert!(close(out.grads[0][1] as f64, r[1]));
}

#[test]
fn ppo_clips_where_the_clipped_objective_is_smaller() {
    // Tokens: ratio 1.5 with A>0 (clipped at 1.2: no grad), ratio 0.5 with A>0 (unclipped is
    // smaller: grad −r·A), ratio 0.5 with A<0 (clipped at 0.8 is smaller: no grad), ratio 1.1.
    let q = [0.0f32; 4];
    let lp = [1.5f32.ln(), 0.5f32.ln(), 0.5f32.ln(), 1.1f32.ln()];
    let a = [1.0f32, 2.0, -1.0, 3.0];
    let out = run(
        BuiltinLoss::Ppo,
        &lp,
        &rl_inputs(&q, &a),
        &LossConfig::new(),
    );
    let want = -(1.2 * 1.0 + 0.5 * 2.0 + 0.8 * -1.0 + 1.1 * 3.0);
    assert!(close(out.loss, want), "{} vs {want}", out.loss);
    let g = &out.grads[0];
    assert_eq!(g[0], 0.0);
    assert!(close(g[1] as f64, -1.0));
    assert_eq!(g[2], 0.0);
    assert!(close(g[3] as f64, -3.3));
    assert_eq!(out.metrics["clipped_tokens:sum"], 2.0);
    // Config thresholds are honoured.
    let mut cfg = LossConfig::new();
    cfg.insert("clip_high_threshold".into(), ConfigValue::Number(2.0));
    let out = run(BuiltinLoss::Ppo, &lp, &rl_inputs(&q, &a), &cfg);
    assert!(close(out.grads[0][0] as f64, -1.5));
}

#[test]
fn cispo_uses_stopped_clipped_ratio_times_logprob() {
    let q = [0.0f32, 0.0];
    let lp = [1.5f32.ln(), 0.9f32.ln()];
    let a = [2.0f32, -1.0];
    let out = run(
        BuiltinLoss::Cispo,
        &lp,
        &rl_inputs(&q, &a),
        &LossConfig::new(),
    );
    let want = -(1.2 * (1.5f64).ln() * 2.0 + 0.9 * (0.9f64).ln() * -1.0);
    assert!(close(out.loss, want));
    assert!(close(out.grads[0][0] as f64, -2.4));
    assert!(close(out.grads[0][1] as f64, 0.9));
}

#[test]
fn dro_quadratic_penalty() {
    let (lp, q, a) = ([-1.0f32, -0.5], [-2.0f32, -0.5], [1.0f32, 3.0]);
    let mut cfg = LossConfig::new();
    cfg.insert("beta".into(), ConfigValue::Number(0.1));
    let out = run(BuiltinLoss::Dro, &lp, &rl_inputs(&q, &a), &cfg);
    let want = -((-1.0 * 1.0 - 0.05 * 1.0) + (-0.5 * 3.0 - 0.0));
    assert!(close(out.loss, want));
    assert!(close(out.grads[0][0] as f64, -1.0 + 0.1 * 1.0));
    assert!(close(out.grads[0][1] as f64, -3.0));
}

#[test]
fn bad_inputs_name_the_field() {
    let lp = [-1.0f32, -2.0];
    let check = |inp: LossInputs, loss: BuiltinLoss, needle: &str| {
        let d = [LossDatum {
            logprobs: &lp,
            len: 2,
            k: 1,
            inputs: &inp,
        }];
        match loss.compute(&d, &LossConfig::new()) {
            Err(Error::InvalidInput { field, message }) => {
                assert!(
                    field.contains(needle) || message.contains(needle),
                    "{field}: {message}"
                )
            }
            other => panic!("expected InvalidInput about {needle}, got {other:?}"),
        }
    };
    check(
        inputs(&[("target_tokens", TensorIn::i64(vec![2], vec![1, 2]))]),
        BuiltinLoss::Ppo,
        "missing",
    );
    let mut bad = rl_inputs(&[0.0, 0.0], &[1.0, 1.0]);
    bad.insert("advantages".into(), TensorIn::f32(vec![3], vec![1.0; 3]));
    check(bad, BuiltinLoss::Ppo, "advantages");
    let mut bad = rl_inputs(&[0.0, 0.0], &[1.0, 1.0]);
    bad.insert("logprobs".into(), TensorIn::i64(vec![2], vec![0, 0]));
    check(bad, BuiltinLoss::Dro, "logprobs");
    let mut bad = rl_inputs(&[0.0, 0.0], &[1.0, 1.0]);
    bad.insert(
        "advantages".into(),
        TensorIn::f32(vec![2], vec![f32::NAN, 1.0]),
    );
    check(bad, BuiltinLoss::ImportanceSampling, "NaN");
    assert!(matches!(
        BuiltinLoss::parse("hinge"),
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(BuiltinLoss::parse("cispo").unwrap(), BuiltinLoss::Cispo);
    let t = inputs(&[("target_tokens", TensorIn::i64(vec![2], vec![1, -3]))]);
    assert!(matches!(
        targets_of(&t, 2, "data[0]"),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        targets_of(&t, 3, "data[0]"),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn adamw_matches_torch_algorithm_by_hand() {
    let mc = LlamaConfig::tiny();
    let cfg = LoraConfig {
        rank: 1,
        alpha: 1.0,
        seed: 0,
        targets: vec![Target::Q],
        train_unembed: false,
    };
    let mut w = LoraWeights::init(&cfg, &mc, &Device::Cpu).unwrap();
    w.pairs.retain(|s, _| *s == Site::Layer(0, Target::Q));
    let site = Site::Layer(0, Target::Q);
    let a0: Vec<f32> = w.pairs[&site].a.flatten_all().unwrap().to_vec1().unwrap();
    let p = AdamParams {
        learning_rate: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.01,
        grad_clip_norm: 0.0,
    };
    let mut st = AdamState::default();
    let (mut m, mut v, mut x) = (
        vec![0f64; a0.len()],
        vec![0f64; a0.len()],
        a0.iter().map(|&t| t as f64).collect::<Vec<_>>(),
    );
    for step in 1..=3 {
        let g: Vec<f32> = (0..a0.len())
            .map(|i| ((i + step) as f32 * 0.37).sin())
            .collect();
        let mut grads = LoraGrads::default();
        let gb = w.pairs[&site].b.zeros_like().unwrap();
        grads
            .add(
                site,
                Tensor::from_vec(g.clone(), (1, a0.len()), &Device::Cpu).unwrap(),
                gb,
            )
            .unwrap();
        st.step(&mut w, &grads, &p).unwrap();
        for i in 0..x.len() {
            let gi = g[i] as f64;
            x[i] *= 1.0 - p.learning_rate * p.weight_decay;
            m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * gi;
            v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * gi * gi;
            let mh = m[i] / (1.0 - p.beta1.powi(step as i32));
            let vh = v[i] / (1.0 - p.beta2.powi(step as i32));
            x[i] -= p.learning_rate * mh / (vh.sqrt() + p.eps);
        }
    }
    let got: Vec<f32> = w.pairs[&site].a.flatten_all().unwrap().to_vec1().unwrap();
    for (g, want) in got.iter().zip(&x) {
        assert!((*g as f64 - want).abs() < 1e-5, "{g} vs {want}");
    }
    assert_eq!(st.step, 3);
    // Clipping: a gradient of norm 5 clipped to 1 moves like a gradient of norm ~1.
    let mut grads = LoraGrads::default();
    let n = a0.len();
    let mut g = vec![0f32; n];
    g[0] = 3.0;
    g[1] = 4.0;
    grads
        .add(
            site,
            Tensor::from_vec(g, (1, n), &Device::Cpu).unwrap(),
            w.pairs[&site].b.zeros_like().unwrap(),
        )
        .unwrap();
    let rep = AdamState::default()
        .step(
            &mut w.clone(),
            &grads,
            &AdamParams {
                grad_clip_norm: 1.0,
                ..p
            },
        )
        .unwrap();
    assert!(rep.clipped && (rep.grad_norm - 5.0).abs() < 1e-5);
}

// --- the numpy reference -------------------------------------------------------------------

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/losses_reference.json")
}

fn floats_of(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Every case of a reference file against loraplex: loss, gradient, per-token loss and
/// every metric. Returns how many cases it checked.
fn check_reference(path: &std::path::Path) -> usize {
    let doc: Value = serde_json::from_slice(&std::fs::read(path).expect("reference file"))
        .expect("reference JSON");
    let cases = doc["cases"].as_array().expect("cases");
    let mut worst = 0f64;
    for case in cases {
        let name = case["name"].as_str().unwrap_or_default();
        let loss = BuiltinLoss::parse(case["loss_fn"].as_str().expect("loss_fn")).unwrap();
        let mut cfg = LossConfig::new();
        for (k, v) in case["config"].as_object().expect("config") {
            cfg.insert(k.clone(), ConfigValue::Number(v.as_f64().expect("number")));
        }
        let lps: Vec<Vec<f32>> = case["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                floats_of(&d["logprobs"])
                    .iter()
                    .map(|&x| x as f32)
                    .collect()
            })
            .collect();
        let ins: Vec<LossInputs> = case["data"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&lps)
            .map(|(d, lp)| {
                let n = lp.len();
                let mut m = inputs(&[("target_tokens", TensorIn::i64(vec![n], vec![1; n]))]);
                for (k, v) in d["inputs"].as_object().unwrap() {
                    let v: Vec<f32> = floats_of(v).iter().map(|&x| x as f32).collect();
                    m.insert(k.clone(), TensorIn::f32(vec![n], v));
                }
                m
            })
            .collect();
        let data: Vec<LossDatum> = lps
            .iter()
            .zip(&ins)
            .map(|(lp, inp)| LossDatum {
                logprobs: lp,
                len: lp.len(),
                k: 1,
                inputs: inp,
            })
            .collect();
        let out = loss
            .compute(&data, &cfg)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        validate_output(&out, &data).unwrap();
        let want = &case["expected"];
        let near = |got: f64, want: f64, what: &str| {
            let err = (got - want).abs();
            assert!(
                err <= 1e-5 + 1e-5 * want.abs(),
                "{name}: {what}: loraplex {got} vs numpy {want}"
            );
            err
        };
        near(out.loss, want["loss"].as_f64().unwrap(), "loss");
        for (i, (g, w)) in out
            .grads
            .iter()
            .zip(want["grads"].as_array().unwrap())
            .enumerate()
        {
            let w = floats_of(w);
            assert_eq!(g.len(), w.len(), "{name}: gradient {i} length");
            for (j, (&a, &b)) in g.iter().zip(&w).enumerate() {
                worst = worst.max(near(a as f64, b, &format!("d loss / d lp[{i}][{j}]")));
            }
        }
        let el = out.elementwise.as_ref().expect("per-token loss");
        for (i, (e, w)) in el
            .iter()
            .zip(want["elementwise"].as_array().unwrap())
            .enumerate()
        {
            for (j, (&a, &b)) in e.iter().zip(&floats_of(w)).enumerate() {
                near(a as f64, b, &format!("elementwise[{i}][{j}]"));
            }
        }
        let wm = want["metrics"].as_object().unwrap();
        let mut keys: Vec<&String> = out.metrics.keys().collect();
        keys.sort();
        let mut wkeys: Vec<&String> = wm.keys().collect();
        wkeys.sort();
        assert_eq!(keys, wkeys, "{name}: metric keys");
        for (k, v) in wm {
            near(out.metrics[k], v.as_f64().unwrap(), k);
        }
    }
    eprintln!(
        "{} reference cases from {}, worst gradient error {worst:.2e}",
        cases.len(),
        path.display()
    );
    cases.len()
}

#[test]
fn rl_losses_match_the_numpy_reference() {
    assert!(check_reference(&reference_path()) >= 12);
}

/// The checked-in reference is what the script computes now (numpy from the SDK's
/// virtualenv, as tests/sdk_e2e.rs uses it): regenerate it and check loraplex against the
/// fresh values too.
#[test]
fn the_numpy_reference_is_current() {
    let python = common::server::sdk_python();
    assert!(
        python.exists(),
        "no Python with numpy at {}: run ./scripts/setup-sdk.sh or set LORAPLEX_SDK_PYTHON",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("losses_reference.json");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/losses_reference.py");
    let st = std::process::Command::new(&python)
        .arg(&script)
        .arg("--out")
        .arg(&fresh)
        .status()
        .expect("run the reference script");
    assert!(st.success(), "{script:?} failed");
    check_reference(&fresh);
    let a: Value = serde_json::from_slice(&std::fs::read(&fresh).unwrap()).unwrap();
    let b: Value = serde_json::from_slice(&std::fs::read(reference_path()).unwrap()).unwrap();
    assert_eq!(
        a["cases"], b["cases"],
        "tests/reference/losses_reference.json is stale: re-run the script"
    );
}

#[test]
fn clipped_tokens_count_only_tokens_that_carry_an_advantage() {
    // A cookbook datum: 3 prompt positions (advantage 0, sampler logprob padded with 0, so
    // their ratio exp(lp) is far below the clip range) and 3 sampled ones, one of them
    // clipped for both losses (ratio 1.5, A > 0).
    let lp = [-2.0f32, -3.0, -1.5, 1.5f32.ln() - 1.0, -1.0, -1.1];
    let q = [0.0f32, 0.0, 0.0, -1.0, -1.0, -1.0];
    let a = [0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
    for loss in [BuiltinLoss::Ppo, BuiltinLoss::Cispo] {
        let out = run(loss, &lp, &rl_inputs(&q, &a), &LossConfig::new());
        assert_eq!(
            out.metrics["clipped_tokens:sum"],
            1.0,
            "{}: prompt positions are not clipped tokens",
            loss.name()
        );
    }
}

fn gspo_inputs(q: &[f32], a: &[f32], mask: &[f32]) -> LossInputs {
    let mut m = rl_inputs(q, a);
    m.insert(
        "sequence_ratio_mask".into(),
        TensorIn::f32(vec![q.len()], mask.to_vec()),
    );
    m
}

#[test]
fn gspo_gives_every_token_the_sequence_ratio() {
    // Masked log-ratios 0.05 and 0.15: s = exp(0.1) for every token, masked or not.
    let lp = [-1.0f32, -0.95, -0.85];
    let q = [-1.0f32, -1.0, -1.0];
    let a = [0.0f32, 1.0, 2.0];
    let s = ((0.05f32 + 0.15f32) as f64 / 2.0).exp();
    let out = run(
        BuiltinLoss::Gspo,
        &lp,
        &gspo_inputs(&q, &a, &[0.0, 1.0, 1.0]),
        &LossConfig::new(),
    );
    assert!((out.loss + s * 3.0).abs() < 1e-6, "{}", out.loss);
    assert_eq!(out.grads[0][0], 0.0);
    assert!((out.grads[0][1] as f64 + s).abs() < 1e-6);
    assert!((out.grads[0][2] as f64 + 2.0 * s).abs() < 1e-6);
    assert!((out.metrics["sequence_ratio:max"] - s).abs() < 1e-6);
    // With A > 0 and s above the clip, every such token is clipped (no gradient).
    let mut cfg = LossConfig::new();
    cfg.insert("clip_high_threshold".into(), ConfigValue::Number(1.1));
    let out = run(
        BuiltinLoss::Gspo,
        &lp,
        &gspo_inputs(&q, &a, &[0.0, 1.0, 1.0]),
        &cfg,
    );
    assert_eq!(out.grads[0], vec![0.0; 3]);
    assert_eq!(out.metrics["clipped_tokens:sum"], 2.0);
    assert!(close(out.loss, -(1.1 * 3.0)));
}

#[test]
fn gspo_needs_its_mask() {
    let lp = [-1.0f32, -0.9];
    let d = |inp: &LossInputs| {
        let d = [LossDatum {
            logprobs: &lp,
            len: 2,
            k: 1,
            inputs: inp,
        }];
        BuiltinLoss::Gspo
            .compute(&d, &LossConfig::new())
            .map(|o| o.loss)
    };
    let e = d(&rl_inputs(&[-1.0, -1.0], &[1.0, 1.0]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequence_ratio_mask") && e.contains("missing"),
        "{e}"
    );
    let e = d(&gspo_inputs(&[-1.0, -1.0], &[1.0, 1.0], &[0.0, 0.0]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("marks no token"), "{e}");
    // No mask and no advantage: nothing to train, loss 0.
    assert_eq!(
        d(&gspo_inputs(&[-1.0, -1.0], &[0.0, 0.0], &[0.0, 0.0])).unwrap(),
        0.0
    );
}

fn sr_inputs(q: &[f32], sampled: &[f32], a: &[f32]) -> LossInputs {
    let n = q.len();
    inputs(&[
        ("target_tokens", TensorIn::i64(vec![n], vec![1; n])),
        ("advantages", TensorIn::f32(vec![n], a.to_vec())),
        (RECORDED_LOGPROBS, TensorIn::f32(vec![n], q.to_vec())),
        (RECORDED_SAMPLED, TensorIn::f32(vec![n], sampled.to_vec())),
    ])
}

#[test]
fn stable_reinforce_truncates_the_ratio_and_adds_the_kl_estimate() {
    // A prompt token (A = 0, not sampled), a token at ratio 1 and one at ratio e (> 2).
    let lp = [-3.0f32, -1.0, -1.0];
    let q = [0.0f32, -1.0, -2.0];
    let a = [0.0f32, 1.0, -1.0];
    let mut cfg = LossConfig::new();
    cfg.insert("kl_coeff".into(), ConfigValue::Number(0.5));
    let out = run(
        BuiltinLoss::StableReinforce,
        &lp,
        &sr_inputs(&q, &[0.0, 1.0, 1.0], &a),
        &cfg,
    );
    let e = std::f64::consts::E;
    let kl = e - 1.0 - 1.0;
    // Loss: −1·1 + 0 (ratio 1, no KL) and −2·(−1) + 0.5·kl (truncated at 2).
    assert!(close(out.loss, -1.0 + 2.0 + 0.5 * kl), "{}", out.loss);
    assert_eq!(out.grads[0][0], 0.0, "prompt tokens carry nothing");
    assert!(close(out.grads[0][1] as f64, -1.0));
    assert!(close(out.grads[0][2] as f64, 2.0 + 0.5 * (e - 1.0)));
    assert_eq!(out.metrics["truncated_tokens:sum"], 1.0);
    assert_eq!(out.metrics["sampled_tokens:sum"], 2.0);
    assert!(close(out.metrics["kl_sample_train:sum"], kl));
    assert!(close(out.metrics["importance_ratio:max"], e));
}

#[test]
fn stable_reinforce_refuses_what_it_cannot_train() {
    let lp = [-1.0f32, -1.0];
    let run_err = |inp: LossInputs, cfg: LossConfig| {
        let d = [LossDatum {
            logprobs: &lp,
            len: 2,
            k: 1,
            inputs: &inp,
        }];
        BuiltinLoss::StableReinforce
            .compute(&d, &cfg)
            .unwrap_err()
            .to_string()
    };
    // No provenance (no recorded inputs): named, with what to do.
    let e = run_err(rl_inputs(&[-1.0, -1.0], &[1.0, 1.0]), LossConfig::new());
    assert!(
        e.contains("loss_fn_input_spans") && e.contains("record_stability_info"),
        "{e}"
    );
    // An advantage on a prompt token.
    let e = run_err(
        sr_inputs(&[0.0, -1.0], &[0.0, 1.0], &[0.5, 1.0]),
        LossConfig::new(),
    );
    assert!(e.contains("advantages") && e.contains("position 0"), "{e}");
    // Bad config.
    let mut cfg = LossConfig::new();
    cfg.insert("kl_coeff".into(), ConfigValue::Number(-1.0));
    let e = run_err(sr_inputs(&[0.0, -1.0], &[0.0, 1.0], &[0.0, 1.0]), cfg);
    assert!(e.contains("kl_coeff"), "{e}");
    let mut cfg = LossConfig::new();
    cfg.insert("max_ratio".into(), ConfigValue::Text("big".into()));
    let e = run_err(sr_inputs(&[0.0, -1.0], &[0.0, 1.0], &[0.0, 1.0]), cfg);
    assert!(e.contains("max_ratio"), "{e}");
    assert_eq!(
        BuiltinLoss::parse("stable_reinforce").unwrap(),
        BuiltinLoss::StableReinforce
    );
    assert_eq!(BuiltinLoss::parse("gspo").unwrap(), BuiltinLoss::Gspo);
}

#[test]
fn an_inverted_per_token_clip_range_is_refused_not_a_panic() {
    let lp = [-1.0f32, -1.0];
    for loss in [BuiltinLoss::Ppo, BuiltinLoss::Cispo, BuiltinLoss::Gspo] {
        let mut inp = gspo_inputs(&[-1.0, -1.0], &[1.0, 1.0], &[1.0, 1.0]);
        inp.insert(
            "clip_low_threshold".into(),
            TensorIn::f32(vec![2], vec![0.9, 1.5]),
        );
        inp.insert(
            "clip_high_threshold".into(),
            TensorIn::f32(vec![2], vec![1.1, 1.2]),
        );
        let d = [LossDatum {
            logprobs: &lp,
            len: 2,
            k: 1,
            inputs: &inp,
        }];
        let e = loss
            .compute(&d, &LossConfig::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("clip_low_threshold") && e.contains("position 1"),
            "{}: {e}",
            loss.name()
        );
    }
}
