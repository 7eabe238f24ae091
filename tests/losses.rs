//! Built-in losses against hand-computed values and gradients, input validation, and AdamW
//! against a hand-written step of torch's algorithm.

use candle_core::{Device, Tensor};
use loraplex::lora::optim::{AdamParams, AdamState};
use loraplex::lora::{LoraConfig, LoraGrads, LoraWeights, Site, Target};
use loraplex::model::LlamaConfig;
use loraplex::train::loss::*;
use loraplex::Error;

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
