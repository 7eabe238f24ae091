//! The reference plugins do what their docs say: the `ppo-clip` and `dro`
//! losses match the built-in definitions (hand-computed values and an
//! independent native implementation), `kl-is` matches its definition, and
//! the samplers pick the tokens they should, reproducibly.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use loraplex::plugins::{
    ConfigValue, LossDatum, NamedTensor, PluginError, PluginHost, PluginId, PluginKind,
    PluginLimits, SamplerChoice,
};

const TOL: f64 = 1e-5;

fn host() -> &'static PluginHost {
    static HOST: OnceLock<PluginHost> = OnceLock::new();
    HOST.get_or_init(|| PluginHost::new(PluginLimits::default(), None).expect("plugin host"))
}

fn load(name: &str) -> PluginId {
    let (id, _) = host().load(&common::component(name)).expect("load");
    id
}

fn config(pairs: &[(&str, ConfigValue)]) -> BTreeMap<String, ConfigValue> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn datum(lp: &[f32], q: &[f32], adv: &[f32]) -> LossDatum {
    LossDatum {
        logprobs: lp.to_vec(),
        inputs: vec![
            NamedTensor::f32("logprobs", q.to_vec()),
            NamedTensor::f32("advantages", adv.to_vec()),
            NamedTensor::i64("target_tokens", vec![7; lp.len()]),
        ],
    }
}

fn input<'a>(d: &'a LossDatum, name: &str) -> &'a [f32] {
    d.inputs
        .iter()
        .find_map(|t| match &t.data {
            loraplex::plugins::TensorData::F32(v) if t.name == name => Some(v.as_slice()),
            _ => None,
        })
        .expect("input present")
}

/// A deterministic pseudo-random batch of `n` datums of `len` tokens.
fn batch(n: usize, len: usize, with_ref: bool) -> Vec<LossDatum> {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let lp: Vec<f32> = (0..len).map(|_| (-4.0 * next()) as f32).collect();
            let q: Vec<f32> = lp
                .iter()
                .map(|&x| x + (0.6 * next() - 0.3) as f32)
                .collect();
            let adv: Vec<f32> = (0..len).map(|_| (4.0 * next() - 2.0) as f32).collect();
            let mut d = datum(&lp, &q, &adv);
            if with_ref {
                let rho = lp
                    .iter()
                    .map(|&x| x + (0.4 * next() - 0.2) as f32)
                    .collect();
                d.inputs.push(NamedTensor::f32("ref_logprobs", rho));
            }
            d
        })
        .collect()
}

/// The built-in `ppo`, written independently of the plugin.
fn native_ppo(data: &[LossDatum], lo: f64, hi: f64) -> (f64, Vec<Vec<f64>>) {
    let mut loss = 0.0;
    let grads = data
        .iter()
        .map(|d| {
            let (q, a) = (input(d, "logprobs"), input(d, "advantages"));
            (0..d.logprobs.len())
                .map(|t| {
                    let r = (d.logprobs[t] as f64 - q[t] as f64).exp();
                    let a = a[t] as f64;
                    let unclipped = r * a;
                    let clipped = r.max(lo).min(hi) * a;
                    loss -= unclipped.min(clipped);
                    if clipped < unclipped && (r < lo || r > hi) {
                        0.0
                    } else {
                        -r * a
                    }
                })
                .collect()
        })
        .collect();
    (loss, grads)
}

/// The built-in `dro`.
fn native_dro(data: &[LossDatum], beta: f64) -> (f64, Vec<Vec<f64>>) {
    let mut loss = 0.0;
    let grads = data
        .iter()
        .map(|d| {
            let (q, a) = (input(d, "logprobs"), input(d, "advantages"));
            (0..d.logprobs.len())
                .map(|t| {
                    let (lp, q, a) = (d.logprobs[t] as f64, q[t] as f64, a[t] as f64);
                    loss -= lp * a - 0.5 * beta * (lp - q).powi(2);
                    -a + beta * (lp - q)
                })
                .collect()
        })
        .collect();
    (loss, grads)
}

fn assert_close(what: &str, got: f64, want: f64) {
    let scale = want.abs().max(1.0);
    assert!(
        (got - want).abs() <= TOL * scale,
        "{what}: got {got}, want {want}"
    );
}

fn assert_grads(got: &[Vec<f32>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "datum count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "datum {i} length");
        for (t, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert_close(&format!("grad[{i}][{t}]"), g as f64, w);
        }
    }
}

#[test]
fn ppo_clip_matches_hand_computed_values() {
    let id = load("ppo-clip");
    // Tokens: tie at r = 1; r = 1.5 clipped (A > 0); r = 0.5 clipped (A < 0);
    // r = e^0.1 inside the range; r = 2 with A < 0 (unclipped is smaller).
    let lp = [0.0, 1.5f32.ln(), 0.5f32.ln(), 0.1, 2.0f32.ln()];
    let d = datum(&lp, &[0.0; 5], &[2.0, 1.0, -1.0, -3.0, -1.0]);
    let out = host()
        .compute_loss(&id, &[d], &BTreeMap::new())
        .expect("ppo-clip");
    let r3 = 0.1f32 as f64;
    let r3 = r3.exp();
    // -2 - 1.2 + 0.8 + 3·e^0.1 + 2
    assert_close("loss", out.loss, -2.0 - 1.2 + 0.8 + 3.0 * r3 + 2.0);
    assert_grads(&out.grads, &[vec![-2.0, 0.0, 0.0, 3.0 * r3, 2.0]]);
    assert_close("loss:sum", out.metrics["loss:sum"], out.loss);
    assert_eq!(out.metrics["clipped_tokens:sum"], 2.0);
}

#[test]
fn ppo_clip_matches_native_ppo_on_a_batch_with_thresholds() {
    let id = load("ppo-clip");
    let data = batch(4, 128, false);
    for (lo, hi, cfg) in [
        (0.8, 1.2, config(&[])),
        (
            0.9,
            1.05,
            config(&[
                ("clip_low_threshold", 0.9.into()),
                ("clip_high_threshold", 1.05.into()),
            ]),
        ),
    ] {
        let out = host().compute_loss(&id, &data, &cfg).expect("ppo-clip");
        let (loss, grads) = native_ppo(&data, lo, hi);
        assert_close("loss", out.loss, loss);
        assert_grads(&out.grads, &grads);
    }
}

#[test]
fn dro_matches_hand_computed_values_and_native_dro() {
    let id = load("dro");
    // lp = 0.5, q = 0, A = 2, β = 0.05: loss = -(1 - 0.025·0.25), grad = -2 + 0.05·0.5
    let out = host()
        .compute_loss(&id, &[datum(&[0.5], &[0.0], &[2.0])], &BTreeMap::new())
        .expect("dro");
    assert_close("loss", out.loss, -0.99375);
    assert_grads(&out.grads, &[vec![-1.975]]);

    let data = batch(4, 128, false);
    for (beta, cfg) in [(0.05, config(&[])), (0.3, config(&[("beta", 0.3.into())]))] {
        let out = host().compute_loss(&id, &data, &cfg).expect("dro");
        let (loss, grads) = native_dro(&data, beta);
        assert_close("loss", out.loss, loss);
        assert_grads(&out.grads, &grads);
        assert_close("loss:sum", out.metrics["loss:sum"], loss);
    }
}

#[test]
fn kl_is_matches_its_definition() {
    let id = load("kl-is");
    // lp = q = 0, A = 1, ρ = ln 2, c = 0.1: r = 1, k = 2 - ln 2 - 1,
    // loss = -1 + 0.1·k, grad = -1 + 0.1·(1 - 2).
    let mut d = datum(&[0.0], &[0.0], &[1.0]);
    d.inputs
        .push(NamedTensor::f32("ref_logprobs", vec![2.0f32.ln()]));
    let out = host()
        .compute_loss(&id, &[d], &BTreeMap::new())
        .expect("kl-is");
    let k = 1.0 - (2.0f32.ln() as f64);
    assert_close("loss", out.loss, -1.0 + 0.1 * k);
    assert_close("kl:sum", out.metrics["kl:sum"], k);
    assert_grads(&out.grads, &[vec![-1.1]]);

    // With c = 0 it is plain importance sampling: -Σ r·A.
    let data = batch(2, 16, true);
    let out = host()
        .compute_loss(&id, &data, &config(&[("kl_coef", 0.0.into())]))
        .expect("kl-is");
    let mut want = 0.0;
    for d in &data {
        let (q, a) = (input(d, "logprobs"), input(d, "advantages"));
        for t in 0..d.logprobs.len() {
            want -= (d.logprobs[t] as f64 - q[t] as f64).exp() * a[t] as f64;
        }
    }
    assert_close("loss", out.loss, want);
}

#[test]
fn a_loss_reports_missing_inputs_and_bad_config_as_its_own_error() {
    let id = load("ppo-clip");
    let d = LossDatum {
        logprobs: vec![0.0; 3],
        inputs: vec![NamedTensor::f32("logprobs", vec![0.0; 3])],
    };
    let err = host()
        .compute_loss(&id, &[d], &BTreeMap::new())
        .expect_err("no advantages");
    match err {
        PluginError::PluginFailed { message } => {
            assert!(message.contains("advantages"), "{message}")
        }
        other => panic!("unexpected {other}"),
    }
    let err = host()
        .compute_loss(
            &id,
            &batch(1, 4, false),
            &config(&[("clip_low_threshold", "low".into())]),
        )
        .expect_err("text where a number belongs");
    assert!(matches!(err, PluginError::PluginFailed { .. }), "{err}");
}

#[test]
fn loading_reports_the_kind_and_is_idempotent() {
    let bytes = common::component("min-p");
    let (a, kind) = host().load(&bytes).expect("load");
    let (b, _) = host().load(&bytes).expect("load again");
    assert_eq!(kind, PluginKind::Sampler);
    assert_eq!(a, b);
    assert_eq!(a, PluginId::of(&bytes));
    assert!(a.is_well_formed());
    let (_, kind) = host().load(&common::component("dro")).expect("load");
    assert_eq!(kind, PluginKind::Loss);
}

/// Logits over a small vocabulary from a list of (token, logit), others -10.
fn logits(vocab: usize, set: &[(usize, f32)]) -> Vec<f32> {
    let mut l = vec![-10.0; vocab];
    for &(t, x) in set {
        l[t] = x;
    }
    l
}

fn splitmix(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
}

#[test]
fn min_p_only_draws_tokens_above_the_threshold() {
    let id = load("min-p");
    // Probabilities ∝ e^0, e^-0.5, e^-1, e^-3: with min_p = 0.3 the cut is
    // ln 0.3 ≈ -1.2 below the top, so token 3 (and the -10s) never appear.
    let l = logits(8, &[(0, 0.0), (1, -0.5), (2, -1.0), (3, -3.0)]);
    let cfg = config(&[("min_p", 0.3.into())]);
    let mut counts = [0usize; 8];
    let mut rng = splitmix(1);
    for _ in 0..400 {
        let mut s = host().new_sampler(&id, &[1, 2], &cfg, 8).expect("session");
        match s.step(&l, &[], rng()).expect("step") {
            SamplerChoice::Token(t) => counts[t as usize] += 1,
            SamplerChoice::Stop => panic!("min-p does not stop without max_tokens"),
        }
    }
    assert_eq!(counts[3..].iter().sum::<usize>(), 0, "{counts:?}");
    assert!(
        counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > 0,
        "{counts:?}"
    );

    // Temperature 0 is greedy; max_tokens stops.
    let cfg = config(&[("temperature", 0.0.into()), ("max_tokens", 2.0.into())]);
    let mut s = host().new_sampler(&id, &[], &cfg, 8).expect("session");
    assert_eq!(s.step(&l, &[], 123).expect("step"), SamplerChoice::Token(0));
    assert_eq!(
        s.step(&l, &[0], 456).expect("step"),
        SamplerChoice::Token(0)
    );
    assert_eq!(s.step(&l, &[0, 0], 789).expect("step"), SamplerChoice::Stop);
}

#[test]
fn samplers_are_reproducible_from_the_hosts_random_bits() {
    let id = load("min-p");
    let vocab = 1000;
    let l: Vec<f32> = (0..vocab).map(|i| ((i * 37 % 101) as f32) / 20.0).collect();
    let cfg = config(&[("min_p", 0.05.into())]);
    let run = |seed| {
        let mut rng = splitmix(seed);
        let mut s = host().new_sampler(&id, &[5], &cfg, vocab).expect("session");
        let mut out = Vec::new();
        for _ in 0..20 {
            match s.step(&l, &out, rng()).expect("step") {
                SamplerChoice::Token(t) => out.push(t),
                SamplerChoice::Stop => break,
            }
        }
        out
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn repetition_penalty_demotes_seen_tokens() {
    let id = load("repetition-penalty");
    let cfg = config(&[("penalty", 1.2.into()), ("temperature", 0.0.into())]);
    // Token 0 is in the prompt: 2.0 / 1.2 ≈ 1.67 < 1.9, so token 1 wins.
    let l = logits(4, &[(0, 2.0), (1, 1.9), (2, 1.8)]);
    let mut s = host().new_sampler(&id, &[0, 3], &cfg, 4).expect("session");
    assert_eq!(s.step(&l, &[], 0).expect("step"), SamplerChoice::Token(1));
    // Now token 1 was generated too: 1.9 / 1.2 < 1.8.
    assert_eq!(s.step(&l, &[1], 0).expect("step"), SamplerChoice::Token(2));
    // Negative logits are multiplied: -1 · 1.2 < -1.1.
    let l = logits(4, &[(0, -10.0), (1, -10.0), (2, -1.0), (3, -1.1)]);
    let mut s = host().new_sampler(&id, &[2], &cfg, 4).expect("session");
    assert_eq!(s.step(&l, &[], 0).expect("step"), SamplerChoice::Token(3));
    // Without a penalty the unseen favourite wins.
    let cfg = config(&[("penalty", 1.0.into()), ("temperature", 0.0.into())]);
    let mut s = host().new_sampler(&id, &[2], &cfg, 4).expect("session");
    assert_eq!(s.step(&l, &[], 0).expect("step"), SamplerChoice::Token(2));
}

#[test]
fn token_dfa_keeps_output_in_the_language() {
    let id = load("token-dfa");
    // Tokens 10..=19 are digits 0..9, 2 is EOS, 0..=9 and 20.. are words.
    // Language: a number 1..=999 with no leading zero, then optional EOS.
    let cfg = config(&[
        ("dfa", "0 11-19 1; 1 10-19 2; 2 10-19 3".into()),
        ("accept", "1,2,3".into()),
        ("eos_token_id", 2.0.into()),
    ]);
    let vocab = 64;
    let mut rng = splitmix(42);
    let mut lengths = [0usize; 4];
    for _ in 0..200 {
        // The model prefers words and the digit zero; the DFA must not care.
        let l: Vec<f32> = (0..vocab)
            .map(|t| match t {
                10 => 3.0,
                11..=19 => (rng() % 100) as f32 / 50.0,
                2 => 0.5,
                _ => 5.0,
            })
            .collect();
        let mut s = host()
            .new_sampler(&id, &[30, 31], &cfg, vocab)
            .expect("session");
        let mut out: Vec<u32> = Vec::new();
        while let SamplerChoice::Token(t) = s.step(&l, &out, rng()).expect("step") {
            out.push(t);
            assert!(out.len() <= 4, "ran past the language: {out:?}");
        }
        let digits: Vec<u32> = out.iter().copied().filter(|&t| t != 2).collect();
        assert!(!digits.is_empty() && digits.len() <= 3, "{out:?}");
        assert!((11..=19).contains(&digits[0]), "leading digit {out:?}");
        assert!(digits.iter().all(|t| (10..=19).contains(t)), "{out:?}");
        if let Some(p) = out.iter().position(|&t| t == 2) {
            assert_eq!(p, out.len() - 1, "EOS is last: {out:?}");
        }
        lengths[digits.len()] += 1;
    }
    // Every length 1..=3 occurs: EOS competes in accepting states.
    assert!(
        lengths[1] > 0 && lengths[2] > 0 && lengths[3] > 0,
        "{lengths:?}"
    );

    // A token the DFA forbids, fed back by the caller, is the plugin's error.
    let mut s = host().new_sampler(&id, &[], &cfg, vocab).expect("session");
    let err = s
        .step(&vec![0.0; vocab], &[40], 0)
        .expect_err("forbidden token");
    assert!(matches!(err, PluginError::PluginFailed { .. }), "{err}");

    // A bad DFA is refused when the session starts.
    let bad = config(&[("dfa", "0 11-99999 1".into()), ("accept", "1".into())]);
    let err = host()
        .new_sampler(&id, &[], &bad, vocab)
        .err()
        .expect("bad dfa");
    assert!(matches!(err, PluginError::PluginFailed { .. }), "{err}");
}

#[test]
fn the_disk_cache_survives_a_restart_and_a_corrupt_artifact() {
    let dir = std::env::temp_dir().join(format!("loraplex-plugin-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bytes = common::component("dro");
    let data = batch(2, 8, false);

    let first = PluginHost::new(PluginLimits::default(), Some(dir.clone())).expect("host");
    let (id, _) = first.load(&bytes).expect("load");
    let want = first
        .compute_loss(&id, &data, &BTreeMap::new())
        .expect("dro");
    let artifacts: Vec<_> = std::fs::read_dir(&dir)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let name = artifacts[0]
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        name.starts_with(&format!("{id}-")) && name.ends_with(".cwasm"),
        "{name}"
    );

    // A new process (here: a new host) reuses the artifact.
    let second = PluginHost::new(PluginLimits::default(), Some(dir.clone())).expect("host");
    second.load(&bytes).expect("load from cache");
    let got = second
        .compute_loss(&id, &data, &BTreeMap::new())
        .expect("dro");
    assert_eq!(got, want);

    // A damaged artifact is ignored and replaced.
    std::fs::write(&artifacts[0], b"garbage").expect("corrupt");
    let third = PluginHost::new(PluginLimits::default(), Some(dir.clone())).expect("host");
    third.load(&bytes).expect("recompile");
    let got = third
        .compute_loss(&id, &data, &BTreeMap::new())
        .expect("dro");
    assert_eq!(got, want);
    assert!(std::fs::metadata(&artifacts[0]).expect("rewritten").len() > 1000);
    let _ = std::fs::remove_dir_all(&dir);
}
