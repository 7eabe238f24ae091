//! Plugin losses against the native built-ins: the `ppo-clip` and `dro` components give
//! the built-in `ppo` and `dro` losses and gradients to 1e-5, and a plugin loss drives
//! `forward_backward` to the same adapter gradients. A hostile plugin in the same batch
//! fails only its own request.

mod common;

use candle_core::DType;
use common::*;
use loraplex::lora::LoraWeights;
use loraplex::plugins::{PluginHost, PluginLimits, PluginLoss};
use loraplex::train::loss::*;
use loraplex::train::{check_data, forward_backward, Datum, Work};
use loraplex::util::SplitMix64;
use loraplex::Error;

fn host() -> PluginHost {
    PluginHost::new(PluginLimits::default(), None).expect("plugin host")
}

fn plugin(host: &PluginHost, name: &str) -> PluginLoss {
    let (id, kind) = host.load(&component(name)).expect("load");
    assert_eq!(kind, loraplex::plugins::PluginKind::Loss);
    PluginLoss {
        host: host.clone(),
        id,
    }
}

/// 4 data x 128 tokens of RL inputs with ratios spread across the clip range.
fn rl_batch(rng: &mut SplitMix64) -> (Vec<Vec<f32>>, Vec<LossInputs>) {
    let mut lps = Vec::new();
    let mut inputs = Vec::new();
    for _ in 0..4 {
        let n = 128;
        let q: Vec<f32> = (0..n).map(|_| -(rng.uniform() as f32) * 5.0).collect();
        let lp: Vec<f32> = q.iter().map(|q| q + (rng.normal() * 0.4)).collect();
        let a: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let mut m = LossInputs::new();
        m.insert("target_tokens".into(), TensorIn::i64(vec![n], vec![3; n]));
        m.insert("logprobs".into(), TensorIn::f32(vec![n], q));
        m.insert("advantages".into(), TensorIn::f32(vec![n], a));
        lps.push(lp);
        inputs.push(m);
    }
    (lps, inputs)
}

fn assert_same(a: &LossOutput, b: &LossOutput, what: &str) {
    assert!(
        (a.loss - b.loss).abs() <= 1e-5 * (1.0 + b.loss.abs()),
        "{what}: loss {} vs {}",
        a.loss,
        b.loss
    );
    assert_eq!(a.grads.len(), b.grads.len());
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        let d = max_abs_diff(ga, gb);
        assert!(d <= 1e-5, "{what}: gradients differ by {d}");
    }
    assert!((a.metrics["loss:sum"] - b.metrics["loss:sum"]).abs() <= 1e-5 * (1.0 + b.loss.abs()));
}

#[test]
fn ppo_clip_and_dro_plugins_equal_the_builtin_losses() {
    let host = host();
    let mut rng = SplitMix64::new(21);
    let (lps, inputs) = rl_batch(&mut rng);
    let data: Vec<LossDatum> = lps
        .iter()
        .zip(&inputs)
        .map(|(l, i)| LossDatum {
            logprobs: l,
            len: l.len(),
            k: 1,
            inputs: i,
        })
        .collect();
    let mut custom = LossConfig::new();
    custom.insert("clip_low_threshold".into(), ConfigValue::Number(0.7));
    custom.insert("clip_high_threshold".into(), ConfigValue::Number(1.3));
    custom.insert("beta".into(), ConfigValue::Number(0.2));
    for cfg in [LossConfig::new(), custom] {
        let ppo = plugin(&host, "ppo-clip");
        let native = BuiltinLoss::Ppo.compute(&data, &cfg).unwrap();
        let wasm = ppo.compute(&data, &cfg).unwrap();
        assert!(
            native.grads.iter().flatten().any(|g| *g == 0.0),
            "some tokens are clipped"
        );
        assert_same(&wasm, &native, "ppo");
        let dro = plugin(&host, "dro");
        assert_same(
            &dro.compute(&data, &cfg).unwrap(),
            &BuiltinLoss::Dro.compute(&data, &cfg).unwrap(),
            "dro",
        );
    }
}

#[test]
fn plugin_loss_drives_forward_backward_and_a_hostile_one_fails_alone() {
    let host = host();
    let model = tiny(DType::F32);
    let v = model.config.vocab_size;
    let ad = [
        random_adapter(&model, 3, 2, true),
        random_adapter(&model, 4, 2, false),
    ];
    let refs: Vec<&LoraWeights> = ad.iter().collect();
    let mut rng = SplitMix64::new(5);
    let data: Vec<Datum> = (0..2)
        .map(|_| {
            let toks = tokens(&mut rng, 9, v);
            let mut d = Datum::next_token(&toks, 0);
            d.loss_fn_inputs.insert(
                "logprobs".into(),
                TensorIn::f32(
                    vec![8],
                    (0..8).map(|_| -(rng.uniform() as f32) * 4.0).collect(),
                ),
            );
            d.loss_fn_inputs.insert(
                "advantages".into(),
                TensorIn::f32(vec![8], (0..8).map(|_| rng.normal()).collect()),
            );
            d
        })
        .collect();
    let data = check_data(&model, data).unwrap();
    let cfg = LossConfig::new();
    let ppo = plugin(&host, "ppo-clip");
    let run = |loss: &dyn LossFunction| {
        let work = [Work {
            adapter: Some(0),
            data: &data,
            loss,
            config: &cfg,
        }];
        forward_backward(&model, &refs, &work, false).unwrap()
    };
    let (rn, gn) = run(&BuiltinLoss::Ppo);
    let (rp, gp) = run(&ppo);
    let (rn, rp) = (rn[0].as_ref().unwrap(), rp[0].as_ref().unwrap());
    assert!((rn.loss - rp.loss).abs() < 1e-5 * (1.0 + rn.loss.abs()));
    assert!(!gp[0].is_empty());
    for (site, (a, b)) in &gn[0].pairs {
        let (pa, pb) = &gp[0].pairs[site];
        assert!(
            max_abs_diff(&flat(a), &flat(pa)) < 1e-5 && max_abs_diff(&flat(b), &flat(pb)) < 1e-5,
            "{site:?}"
        );
    }

    // One batch: adapter 0 with the hostile plugin (trap), adapter 1 with ppo-clip.
    let hostile = plugin(&host, "hostile-loss");
    for mode in ["panic", "nan-grad", "loop"] {
        let mut hcfg = LossConfig::new();
        hcfg.insert("mode".into(), ConfigValue::Text(mode.into()));
        let work = [
            Work {
                adapter: Some(0),
                data: &data,
                loss: &hostile,
                config: &hcfg,
            },
            Work {
                adapter: Some(1),
                data: &data,
                loss: &ppo,
                config: &cfg,
            },
        ];
        let (res, grads) = forward_backward(&model, &refs, &work, false).unwrap();
        match &res[0] {
            Err(Error::Plugin(e)) => eprintln!("{mode}: {e}"),
            other => panic!("{mode}: expected a plugin error, got {other:?}"),
        }
        assert!(
            grads[0].is_empty() || grads[0].norm().unwrap() == 0.0,
            "{mode}: the failed request adds no gradient"
        );
        let ok = res[1].as_ref().expect("the neighbour completes");
        let (alone, galone) = {
            let w = [Work {
                adapter: Some(1),
                data: &data,
                loss: &ppo,
                config: &cfg,
            }];
            forward_backward(&model, &refs, &w, false).unwrap()
        };
        assert!((ok.loss - alone[0].as_ref().unwrap().loss).abs() < 1e-5);
        for (site, (a, _)) in &galone[1].pairs {
            assert!(max_abs_diff(&flat(a), &flat(&grads[1].pairs[site].0)) < 1e-5);
        }
    }
}
