//! The hand-written backward pass against finite differences, on a tiny f64 model: every
//! LoRA site (q, k, v, o, gate, up, down, LM head), two adapters in one batch, rows of
//! different lengths, and top-K targets with arbitrary (negative, fractional) seeds.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use loraplex::lora::{LoraWeights, Site};
use loraplex::model::TrainRow;
use loraplex::util::SplitMix64;

struct Problem {
    rows: Vec<(Vec<u32>, Vec<u32>, usize, usize)>, // tokens, targets, k, adapter
    seeds: Vec<Vec<f32>>,
}

impl Problem {
    fn train_rows(&self) -> Vec<TrainRow<'_>> {
        self.rows
            .iter()
            .map(|(t, g, k, a)| TrainRow {
                tokens: t,
                targets: g,
                k: *k,
                adapter: Some(*a),
            })
            .collect()
    }
}

fn objective(model: &loraplex::model::BaseModel, ads: &[&LoraWeights], p: &Problem) -> f64 {
    let (lp, _) = model
        .forward_train_f64(&model.train_batch(&p.train_rows()).unwrap(), ads, false)
        .unwrap();
    lp.iter()
        .zip(&p.seeds)
        .flat_map(|(l, s)| l.iter().zip(s).map(|(a, b)| *a * *b as f64))
        .sum()
}

fn perturbed(w: &LoraWeights, site: Site, which: usize, idx: usize, h: f32) -> LoraWeights {
    let mut w = w.clone();
    let p = w.pairs.get_mut(&site).unwrap();
    let t = if which == 0 { &mut p.a } else { &mut p.b };
    let mut v = flat(t);
    v[idx] += h;
    *t = Tensor::from_vec(v, t.dims(), t.device()).unwrap();
    w
}

#[test]
fn lora_gradients_match_finite_differences() {
    for (family, model) in tiny_families(DType::F64) {
        eprintln!("{family}:");
        check_against_finite_differences(&model);
    }
}

fn check_against_finite_differences(model: &loraplex::model::BaseModel) {
    let v = model.config.vocab_size;
    let a0 = random_adapter(model, 1, 2, true);
    let a1 = random_adapter(model, 2, 3, true);
    let mut rng = SplitMix64::new(99);
    let mut rows = Vec::new();
    for (len, k, ad) in [(5usize, 1usize, 0usize), (3, 2, 1), (4, 1, 0)] {
        rows.push((
            tokens(&mut rng, len, v),
            tokens(&mut rng, len * k, v),
            k,
            ad,
        ));
    }
    let seeds: Vec<Vec<f32>> = rows
        .iter()
        .map(|(t, _, k, _)| (0..t.len() * k).map(|_| rng.normal() * 0.7).collect())
        .collect();
    let p = Problem { rows, seeds };

    let ads = [&a0, &a1];
    let (_, tape) = model
        .forward_train(&model.train_batch(&p.train_rows()).unwrap(), &ads, true)
        .unwrap();
    let grads = model.backward(tape.unwrap(), &p.seeds, &ads).unwrap();

    let h = 1e-3f32;
    let mut checked = 0;
    let mut worst = 0f64;
    for (ai, w) in [&a0, &a1].into_iter().enumerate() {
        assert_eq!(
            grads[ai].pairs.len(),
            w.pairs.len(),
            "every site of adapter {ai} gets a gradient"
        );
        for (&site, pair) in &w.pairs {
            let (ga, gb) = &grads[ai].pairs[&site];
            for (which, (param, g)) in [(&pair.a, ga), (&pair.b, gb)].into_iter().enumerate() {
                assert_eq!(param.dims(), g.dims(), "{site:?} grad shape");
                let gv = flat(g);
                assert!(
                    gv.iter().any(|x| x.abs() > 1e-6),
                    "{site:?}/{which} of adapter {ai} has a zero gradient"
                );
                for j in 0..3 {
                    let idx = (rng.next_u64() as usize) % gv.len();
                    let mut ad_p = [a0.clone(), a1.clone()];
                    ad_p[ai] = perturbed(w, site, which, idx, h);
                    let fp = objective(model, &[&ad_p[0], &ad_p[1]], &p);
                    ad_p[ai] = perturbed(w, site, which, idx, -h);
                    let fm = objective(model, &[&ad_p[0], &ad_p[1]], &p);
                    let fd = (fp - fm) / (2.0 * h as f64);
                    let an = gv[idx] as f64;
                    let err = (fd - an).abs();
                    worst = worst.max(err / (1e-6 + an.abs()));
                    assert!(
                        err <= 1e-5 + 1e-3 * an.abs(),
                        "adapter {ai} {site:?} {} [{idx}] (probe {j}): finite difference {fd:.6} vs backward {an:.6}",
                        if which == 0 { "A" } else { "B" }
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 180, "checked {checked} entries");
    eprintln!("checked {checked} gradient entries, worst relative error {worst:.2e}");
}

#[test]
fn new_adapter_has_zero_b_and_leaves_outputs_unchanged() {
    let model = tiny(DType::F32);
    let cfg = loraplex::lora::LoraConfig::from_tinker(4, 3, true, true, true).unwrap();
    let w = LoraWeights::init(&cfg, &model.config, &model.device).unwrap();
    let again = LoraWeights::init(&cfg, &model.config, &model.device).unwrap();
    for (s, p) in &w.pairs {
        assert!(
            flat(&p.b).iter().all(|x| *x == 0.0),
            "{s:?} B starts at zero"
        );
        assert_eq!(
            flat(&p.a),
            flat(&again.pairs[s].a),
            "A is a deterministic function of the seed"
        );
        assert!(flat(&p.a).iter().any(|x| *x != 0.0));
    }
    let mut rng = SplitMix64::new(5);
    let t = tokens(&mut rng, 6, model.config.vocab_size);
    let g = tokens(&mut rng, 6, model.config.vocab_size);
    let row = |adapter| TrainRow {
        tokens: &t,
        targets: &g,
        k: 1,
        adapter,
    };
    let with = model
        .forward_train(&model.train_batch(&[row(Some(0))]).unwrap(), &[&w], false)
        .unwrap()
        .0;
    let without = model
        .forward_train(&model.train_batch(&[row(None)]).unwrap(), &[], false)
        .unwrap()
        .0;
    assert!(max_abs_diff(&with[0], &without[0]) < 1e-6);
}

#[test]
fn train_rows_are_checked_when_batched_and_not_after() {
    let model = tiny(DType::F64);
    let v = model.config.vocab_size as u32;
    let ctx = model.config.max_position_embeddings;
    let t = [1u32, 2, 3];
    fn row<'a>(tokens: &'a [u32], targets: &'a [u32], k: usize) -> TrainRow<'a> {
        TrainRow {
            tokens,
            targets,
            k,
            adapter: None,
        }
    }
    let err = |rows: &[TrainRow]| match model.train_batch(rows) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted bad rows"),
    };
    let ok = row(&[1, 2, 3], &[2, 3, 4], 1);
    let long = vec![1; ctx + 1];
    let (bad_token, bad_target) = ([1, v, 2], [1, 2, v + 5]);
    for (rows, needle) in [
        (vec![ok, row(&[], &[], 1)], "data[1].model_input: empty"),
        (vec![row(&bad_token, &[1, 2, 3], 1)], "data[0].model_input"),
        (vec![row(&long, &long, 1)], "context length"),
        (
            vec![row(&[1, 2], &[1, 2, 3], 1)],
            "data[0].loss_fn_inputs.target_tokens: has 3 entries; expected 2",
        ),
        (vec![row(&[1, 2], &[], 0)], "target_tokens"),
        (
            vec![ok, row(&t, &bad_target, 1)],
            "data[1].loss_fn_inputs.target_tokens: token id",
        ),
    ] {
        let e = err(&rows);
        assert!(e.contains(needle), "{e} lacks {needle:?}");
    }
    assert!(err(&[row(&t, &bad_target, 1)]).contains("outside the vocabulary"));
    // A checked row runs as it is; rows checked for a model with a bigger vocabulary do not
    // run on this one.
    let checked = model
        .check_train_row("data[0]", t.to_vec(), || Ok((vec![2, 3, 4], 1)))
        .unwrap();
    let batch = loraplex::model::TrainBatch::of_checked([(&checked, None)]);
    let (lp, _) = model.forward_train(&batch, &[], false).unwrap();
    let (want, _) = model
        .forward_train(&model.train_batch(&[ok]).unwrap(), &[], false)
        .unwrap();
    assert_eq!(lp, want);
    let mut cfg = model.config.clone();
    cfg.vocab_size += 8;
    let big = loraplex::model::BaseModel::random(cfg, 7, DType::F64).unwrap();
    let wide = big
        .check_train_row("data[0]", t.to_vec(), || Ok((vec![2, 3, v + 5], 1)))
        .unwrap();
    let wide = loraplex::model::TrainBatch::of_checked([(&wide, None)]);
    let Err(e) = model.forward_train(&wide, &[], false) else {
        panic!("ran rows checked for another model");
    };
    assert!(e.to_string().contains("another model"), "{e}");
    // The targets are parsed only once the tokens have passed.
    let e = model
        .check_train_row("data[2]", vec![], || panic!("targets read before tokens"))
        .unwrap_err();
    assert!(e.to_string().contains("data[2].model_input"), "{e}");
}
