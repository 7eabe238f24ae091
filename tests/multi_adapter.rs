//! One batch, many adapters: each row's outputs and gradients equal running that row alone;
//! an optimizer step on one adapter never changes another's outputs; KV-cached decoding
//! equals the full forward pass, batched or not.

mod common;

use candle_core::DType;
use common::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::LoraWeights;
use loraplex::model::{InferRow, KvCache, TrainRow};
use loraplex::train::TrainableAdapter;
use loraplex::util::SplitMix64;

#[test]
fn mixed_batch_equals_rows_run_alone() {
    let model = tiny(DType::F32);
    let v = model.config.vocab_size;
    let ads: Vec<LoraWeights> = (0..3)
        .map(|i| random_adapter(&model, 10 + i, 2 + i as usize, i == 1))
        .collect();
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    let mut rng = SplitMix64::new(3);
    // Adapters interleaved on purpose, plus a base-model row; lengths differ.
    let spec = [
        (7usize, Some(2usize)),
        (3, Some(0)),
        (5, None),
        (9, Some(1)),
        (4, Some(0)),
        (6, Some(2)),
    ];
    let data: Vec<(Vec<u32>, Vec<u32>)> = spec
        .iter()
        .map(|(n, _)| (tokens(&mut rng, *n, v), tokens(&mut rng, *n, v)))
        .collect();
    let seeds: Vec<Vec<f32>> = spec
        .iter()
        .map(|(n, _)| (0..*n).map(|_| rng.normal()).collect())
        .collect();
    let rows: Vec<TrainRow> = data
        .iter()
        .zip(&spec)
        .map(|((t, g), (_, a))| TrainRow {
            tokens: t,
            targets: g,
            k: 1,
            adapter: *a,
        })
        .collect();
    let (lp, tape) = model
        .forward_train(&model.train_batch(&rows).unwrap(), &refs, true)
        .unwrap();
    let grads = model.backward(tape.unwrap(), &seeds, &refs).unwrap();

    let mut alone_grads = vec![loraplex::lora::LoraGrads::default(); ads.len()];
    for (i, row) in rows.iter().enumerate() {
        let (lp1, tape1) = model
            .forward_train(&model.train_batch(&[*row]).unwrap(), &refs, true)
            .unwrap();
        assert!(
            max_abs_diff(&lp[i], &lp1[0]) < 1e-5,
            "row {i} logprobs differ in the batch"
        );
        let g1 = model
            .backward(tape1.unwrap(), &[seeds[i].clone()], &refs)
            .unwrap();
        for (acc, g) in alone_grads.iter_mut().zip(g1) {
            acc.merge(g).unwrap();
        }
    }
    for (ai, (batched, alone)) in grads.iter().zip(&alone_grads).enumerate() {
        assert_eq!(
            batched.pairs.len(),
            alone.pairs.len(),
            "adapter {ai}: same sites get gradients"
        );
        assert!(!batched.is_empty(), "adapter {ai} got gradients");
        for (site, (a, b)) in &batched.pairs {
            let (a1, b1) = &alone.pairs[site];
            let scale = flat(a1)
                .iter()
                .chain(flat(b1).iter())
                .fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                max_abs_diff(&flat(a), &flat(a1)) <= 1e-4 * scale.max(1.0),
                "adapter {ai} {site:?} dA"
            );
            assert!(
                max_abs_diff(&flat(b), &flat(b1)) <= 1e-4 * scale.max(1.0),
                "adapter {ai} {site:?} dB"
            );
        }
    }
}

#[test]
fn optimizer_step_on_one_adapter_leaves_others_untouched() {
    let model = tiny(DType::F32);
    let v = model.config.vocab_size;
    let mut rng = SplitMix64::new(8);
    let t = tokens(&mut rng, 6, v);
    let g = tokens(&mut rng, 6, v);
    let mut a = TrainableAdapter::new(random_adapter(&model, 1, 2, true));
    let b = random_adapter(&model, 2, 2, true);
    let row = |ad| TrainRow {
        tokens: &t,
        targets: &g,
        k: 1,
        adapter: Some(ad),
    };
    let batch = model.train_batch(&[row(0), row(1)]).unwrap();
    let before = model
        .forward_train(&batch, &[&a.weights, &b], false)
        .unwrap()
        .0;
    let (_, tape) = model
        .forward_train(&batch, &[&a.weights, &b], true)
        .unwrap();
    let grads = model
        .backward(
            tape.unwrap(),
            &[vec![-1.0; 6], vec![-1.0; 6]],
            &[&a.weights, &b],
        )
        .unwrap();
    a.accumulate(grads[0].clone()).unwrap();
    a.optim_step(&AdamParams {
        learning_rate: 1e-2,
        ..Default::default()
    })
    .unwrap();
    let after = model
        .forward_train(&batch, &[&a.weights, &b], false)
        .unwrap()
        .0;
    assert!(
        max_abs_diff(&before[0], &after[0]) > 1e-4,
        "the stepped adapter changed"
    );
    assert_eq!(
        before[1], after[1],
        "the other adapter's outputs are bit-identical"
    );
    let sum_after: f32 = after[0].iter().sum();
    let sum_before: f32 = before[0].iter().sum();
    assert!(
        sum_after > sum_before,
        "a step against d(-Σlp) raises the targets' logprobs"
    );
}

#[test]
fn kv_cache_decode_equals_full_forward_batched_or_not() {
    // Every family, on the host kernels and on the candle backend.
    for (family, m) in tiny_families(DType::F32) {
        for model in [m.clone(), m.with_candle_backend()] {
            eprintln!("{family}");
            kv_cache_decode_equals_full_forward_batched_or_not_on(&model);
        }
    }
}

fn kv_cache_decode_equals_full_forward_batched_or_not_on(model: &loraplex::model::BaseModel) {
    let (ads, seqs) = decode_fixture(model, 4, [9, 6, 8]);
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    // Reference: full forward over each whole sequence; logprob of token t+1 at position t.
    let full = full_forward_logprobs(model, &refs, &seqs);
    // Batched: prefill 3 tokens of each, then decode the rest one token per step, all together.
    let mut caches = vec![KvCache::default(); seqs.len()];
    let mut got: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    let prefill = 3;
    {
        let rows: Vec<InferRow> = seqs
            .iter()
            .map(|(s, a)| InferRow {
                tokens: &s[..prefill],
                adapter: *a,
            })
            .collect();
        let mut cr: Vec<&mut KvCache> = caches.iter_mut().collect();
        let (last, plp) = model.forward_infer(&rows, &mut cr, &refs, true).unwrap();
        let last = last.to_vec2::<f32>().unwrap();
        for (i, (s, _)) in seqs.iter().enumerate() {
            got[i].extend(plp.as_ref().unwrap()[i].iter().copied());
            let lse = loraplex_lse(&last[i]);
            got[i].push(last[i][s[prefill] as usize] - lse);
        }
    }
    for step in prefill..9 {
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| step + 1 < seqs[i].0.len())
            .collect();
        if live.is_empty() {
            break;
        }
        let rows: Vec<InferRow> = live
            .iter()
            .map(|&i| InferRow {
                tokens: &seqs[i].0[step..step + 1],
                adapter: seqs[i].1,
            })
            .collect();
        let mut cr = live_caches(&mut caches, &live);
        let (last, _) = model.forward_infer(&rows, &mut cr, &refs, false).unwrap();
        let last = last.to_vec2::<f32>().unwrap();
        for (r, &i) in live.iter().enumerate() {
            got[i].push(last[r][seqs[i].0[step + 1] as usize] - loraplex_lse(&last[r]));
        }
    }
    for i in 0..seqs.len() {
        assert_eq!(got[i].len(), full[i].len(), "seq {i}");
        assert!(
            max_abs_diff(&got[i], &full[i]) < 1e-4,
            "seq {i}: cached decode {:?} vs full {:?}",
            got[i],
            full[i]
        );
        assert_eq!(caches[i].len, seqs[i].0.len() - 1);
    }
}

type Seqs = Vec<(Vec<u32>, Option<usize>)>;

/// Two adapters (rank 2 with an LM-head pair, rank 3 without) seeded from `seed`, and three
/// random sequences of the given lengths: on adapter 0, on adapter 1, on the base model.
/// The caches of the live sequences, in order.
fn live_caches<'a>(caches: &'a mut [KvCache], live: &[usize]) -> Vec<&'a mut KvCache> {
    caches
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| live.contains(i))
        .map(|(_, c)| c)
        .collect()
}

fn decode_fixture(
    model: &loraplex::model::BaseModel,
    seed: u64,
    lens: [usize; 3],
) -> (Vec<LoraWeights>, Seqs) {
    let v = model.config.vocab_size;
    let ads = vec![
        random_adapter(model, seed, 2, true),
        random_adapter(model, seed + 1, 3, false),
    ];
    let mut rng = SplitMix64::new(seed + 7);
    let seqs = lens
        .into_iter()
        .zip([Some(0), Some(1), None])
        .map(|(n, a)| (tokens(&mut rng, n, v), a))
        .collect();
    (ads, seqs)
}

/// Per sequence, the logprob of token t+1 at position t from one full training forward pass.
fn full_forward_logprobs(
    model: &loraplex::model::BaseModel,
    refs: &[&LoraWeights],
    seqs: &[(Vec<u32>, Option<usize>)],
) -> Vec<Vec<f32>> {
    seqs.iter()
        .map(|(s, a)| {
            let rows = [TrainRow {
                tokens: &s[..s.len() - 1],
                targets: &s[1..],
                k: 1,
                adapter: *a,
            }];
            model
                .forward_train(&model.train_batch(&rows).unwrap(), refs, false)
                .unwrap()
                .0
                .remove(0)
        })
        .collect()
}

fn loraplex_lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
}

/// Rows of several new tokens after a filled cache (a prompt arriving in chunks) in the
/// same steps as one-token rows: every position's prediction equals the full forward pass.
#[test]
fn chunks_after_a_cache_mixed_with_single_tokens_equal_full_forward() {
    // Every family, on the host kernels and on the candle backend.
    for (family, m) in tiny_families(DType::F32) {
        for model in [m.clone(), m.with_candle_backend()] {
            eprintln!("{family}");
            chunks_after_a_cache_mixed_with_single_tokens_equal_full_forward_on(&model);
        }
    }
}

fn chunks_after_a_cache_mixed_with_single_tokens_equal_full_forward_on(
    model: &loraplex::model::BaseModel,
) {
    let (ads, seqs) = decode_fixture(model, 6, [10, 8, 9]);
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    let full = full_forward_logprobs(model, &refs, &seqs);
    // Chunk lengths per step and sequence (cut short at each sequence's end).
    let schedule = [[3, 1, 2], [2, 1, 3], [1, 4, 1], [3, 1, 2], [9, 9, 9]];
    let mut caches = vec![KvCache::default(); seqs.len()];
    let mut done = vec![0usize; seqs.len()];
    for chunk in schedule {
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| done[i] < seqs[i].0.len() - 1)
            .collect();
        if live.is_empty() {
            break;
        }
        let ends: Vec<usize> = live
            .iter()
            .map(|&i| (done[i] + chunk[i]).min(seqs[i].0.len() - 1))
            .collect();
        let rows: Vec<InferRow> = live
            .iter()
            .zip(&ends)
            .map(|(&i, &e)| InferRow {
                tokens: &seqs[i].0[done[i]..e],
                adapter: seqs[i].1,
            })
            .collect();
        let mut cr = live_caches(&mut caches, &live);
        let (last, plp) = model.forward_infer(&rows, &mut cr, &refs, true).unwrap();
        let last = last.to_vec2::<f32>().unwrap();
        let plp = plp.unwrap();
        for (r, (&i, &e)) in live.iter().zip(&ends).enumerate() {
            // Within the chunk: the prompt logprobs of its tokens after the first.
            for (t, lp) in plp[r].iter().enumerate() {
                let want = full[i][done[i] + t];
                assert!(
                    (lp - want).abs() < 1e-4,
                    "seq {i} pos {}: {lp} vs {want}",
                    done[i] + t
                );
            }
            let lp = last[r][seqs[i].0[e] as usize] - loraplex_lse(&last[r]);
            assert!(
                (lp - full[i][e - 1]).abs() < 1e-4,
                "seq {i} after {e} tokens: {lp} vs {}",
                full[i][e - 1]
            );
            done[i] = e;
            assert_eq!(caches[i].len, e);
        }
    }
    assert!(done.iter().zip(&seqs).all(|(d, s)| *d == s.0.len() - 1));
}
