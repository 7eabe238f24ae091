//! The candle backend runs attention over all rows of a batch at once (padded groups) and
//! LoRA over all adapters at once (stacked ranks). On tiny random models of every family
//! (Llama, Qwen2, Qwen3) and a multi-query shape, with rows of mixed lengths, adapters of
//! different ranks, rows without an adapter and mixed top-k:
//! - in f64, a batch equals its rows run one at a time: logprobs to 1e-12, LoRA gradients
//!   (f32, as `LoraGrads` holds them) to f32 rounding, whatever the attention budget
//!   (one group, several, one row per group);
//! - prefill and decode with KV caches of different lengths in one step equal each
//!   sequence decoded alone;
//! - in f32, the candle pass equals the cpu backend to 1e-4.

mod common;

use candle_core::DType;
use common::*;
use loraplex::lora::{LoraGrads, LoraWeights};
use loraplex::model::{BaseModel, InferRow, KvCache, LlamaConfig, TrainRow};
use loraplex::util::SplitMix64;

/// Every family, plus Llama with one key/value head for all query heads.
fn models(dtype: DType) -> Vec<(&'static str, BaseModel)> {
    let mut ms = tiny_families(dtype);
    let mqa = LlamaConfig {
        num_kv_heads: 1,
        ..LlamaConfig::tiny()
    };
    ms.push(("mqa", BaseModel::random(mqa, 7, dtype).expect("tiny model")));
    ms
}

/// Three adapters: rank 2 with an LM-head pair, rank 3 without, rank 5 with.
fn adapters(model: &BaseModel) -> Vec<LoraWeights> {
    vec![
        random_adapter(model, 21, 2, true),
        random_adapter(model, 22, 3, false),
        random_adapter(model, 23, 5, true),
    ]
}

struct Case {
    /// tokens, targets, k, adapter
    rows: Vec<(Vec<u32>, Vec<u32>, usize, Option<usize>)>,
    seeds: Vec<Vec<f32>>,
}

impl Case {
    fn new(vocab: usize) -> Case {
        let spec = [
            (7usize, 1usize, Some(2usize)),
            (3, 2, Some(0)),
            (5, 1, None),
            (9, 1, Some(1)),
            (1, 1, Some(0)),
            (6, 3, Some(2)),
            (4, 1, None),
        ];
        let mut rng = SplitMix64::new(31);
        let rows: Vec<_> = spec
            .iter()
            .map(|&(n, k, a)| {
                (
                    tokens(&mut rng, n, vocab),
                    tokens(&mut rng, n * k, vocab),
                    k,
                    a,
                )
            })
            .collect();
        let seeds = rows
            .iter()
            .map(|(t, _, k, _)| (0..t.len() * k).map(|_| rng.normal()).collect())
            .collect();
        Case { rows, seeds }
    }

    fn train_rows(&self) -> Vec<TrainRow<'_>> {
        self.rows
            .iter()
            .map(|(t, g, k, a)| TrainRow {
                tokens: t,
                targets: g,
                k: *k,
                adapter: *a,
            })
            .collect()
    }

    /// Logprobs and gradients of the rows as one batch.
    fn batched(&self, model: &BaseModel, ads: &[&LoraWeights]) -> (Vec<Vec<f64>>, Vec<LoraGrads>) {
        run(model, ads, &self.train_rows(), &self.seeds)
    }

    /// Logprobs and gradients of each row run alone, gradients summed.
    fn alone(&self, model: &BaseModel, ads: &[&LoraWeights]) -> (Vec<Vec<f64>>, Vec<LoraGrads>) {
        let mut lps = Vec::new();
        let mut grads = vec![LoraGrads::default(); ads.len()];
        for (row, seeds) in self.train_rows().into_iter().zip(&self.seeds) {
            let (mut lp, g) = run(model, ads, &[row], std::slice::from_ref(seeds));
            lps.push(lp.remove(0));
            for (acc, g) in grads.iter_mut().zip(g) {
                acc.merge(g).unwrap();
            }
        }
        (lps, grads)
    }
}

fn run(
    model: &BaseModel,
    ads: &[&LoraWeights],
    rows: &[TrainRow],
    seeds: &[Vec<f32>],
) -> (Vec<Vec<f64>>, Vec<LoraGrads>) {
    let batch = model.train_batch(rows).unwrap();
    let (lp, tape) = model.forward_train_f64(&batch, ads, true).unwrap();
    let grads = model.backward(tape.unwrap(), seeds, ads).unwrap();
    (lp, grads)
}

fn max_diff64(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

/// The largest gradient difference relative to the largest gradient, over all adapters.
fn grads_diff(a: &[LoraGrads], b: &[LoraGrads]) -> f32 {
    let mut worst = 0f32;
    for (ai, (ga, gb)) in a.iter().zip(b).enumerate() {
        assert_eq!(ga.pairs.len(), gb.pairs.len(), "adapter {ai}: same sites");
        assert!(!ga.is_empty(), "adapter {ai} got gradients");
        for (site, (da, db)) in &ga.pairs {
            let (da1, db1) = &gb.pairs[site];
            for (x, y) in [(da, da1), (db, db1)] {
                let (x, y) = (flat(x), flat(y));
                let scale = y.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                worst = worst.max(max_abs_diff(&x, &y) / scale);
            }
        }
    }
    worst
}

#[test]
fn a_batch_equals_its_rows_alone_in_f64() {
    for (family, model) in models(DType::F64) {
        assert_eq!(model.backend_name(), "candle");
        let ads = adapters(&model);
        let refs: Vec<&LoraWeights> = ads.iter().collect();
        let case = Case::new(model.config.vocab_size);
        let (lp1, g1) = case.alone(&model, &refs);
        // The default budget (one group here), a small one (several), none (one row each).
        for budget in [None, Some(4096), Some(0)] {
            let m = match budget {
                None => model.clone(),
                Some(b) => model.with_candle_scores_budget(b),
            };
            let (lp, g) = case.batched(&m, &refs);
            let dl = max_diff64(&lp, &lp1);
            let dg = grads_diff(&g, &g1);
            eprintln!(
                "{family} budget {budget:?}: logprobs {dl:.2e}, LoRA grads (relative) {dg:.2e}"
            );
            assert!(dl < 1e-12, "{family}: logprobs differ by {dl}");
            assert!(dg < 1e-6, "{family}: gradients differ by {dg}");
        }
    }
}

#[test]
fn candle_equals_the_cpu_backend_in_f32() {
    for (family, cpu) in models(DType::F32) {
        assert_eq!(cpu.backend_name(), "cpu");
        let candle = cpu.with_candle_backend();
        let ads = adapters(&cpu);
        let refs: Vec<&LoraWeights> = ads.iter().collect();
        let case = Case::new(cpu.config.vocab_size);
        let (lp, g) = case.batched(&candle, &refs);
        let (lp1, g1) = case.batched(&cpu, &refs);
        let dl = max_diff64(&lp, &lp1);
        let dg = grads_diff(&g, &g1);
        eprintln!("{family}: candle vs cpu: logprobs {dl:.2e}, LoRA grads (relative) {dg:.2e}");
        assert!(dl < 1e-4, "{family}: logprobs differ by {dl}");
        assert!(dg < 1e-4, "{family}: gradients differ by {dg}");
    }
}

/// Sequences (tokens, adapter) and, per step, how many new tokens each feeds (0: none).
struct Decode {
    seqs: Vec<(Vec<u32>, Option<usize>)>,
    schedule: Vec<Vec<usize>>,
}

/// Per step, per sequence fed in it: the last position's logits and prompt logprobs.
type Steps = Vec<Vec<(usize, Vec<f32>, Vec<f32>)>>;

impl Decode {
    fn new(vocab: usize) -> Decode {
        let mut rng = SplitMix64::new(41);
        let seqs = [
            (12usize, Some(0usize)),
            (9, Some(1)),
            (14, None),
            (8, Some(2)),
        ]
        .iter()
        .map(|&(n, a)| (tokens(&mut rng, n, vocab), a))
        .collect();
        // Prompts of different lengths together, then decode steps over caches of
        // different lengths, one with chunks of several tokens and a sequence resting.
        let schedule = vec![
            vec![5, 2, 7, 3],
            vec![1, 1, 1, 1],
            vec![1, 3, 0, 2],
            vec![1, 1, 1, 1],
            vec![2, 1, 4, 1],
        ];
        Decode { seqs, schedule }
    }

    /// Run the schedule for the sequences in `which` together.
    fn run(&self, model: &BaseModel, ads: &[&LoraWeights], which: &[usize]) -> Steps {
        let mut caches = vec![KvCache::default(); self.seqs.len()];
        let mut done = vec![0usize; self.seqs.len()];
        let mut out = Vec::new();
        for chunk in &self.schedule {
            let live: Vec<usize> = which.iter().copied().filter(|&i| chunk[i] > 0).collect();
            if live.is_empty() {
                out.push(Vec::new());
                continue;
            }
            let rows: Vec<InferRow> = live
                .iter()
                .map(|&i| InferRow {
                    tokens: &self.seqs[i].0[done[i]..done[i] + chunk[i]],
                    adapter: self.seqs[i].1,
                })
                .collect();
            let mut cr: Vec<&mut KvCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live.contains(i))
                .map(|(_, c)| c)
                .collect();
            let (last, plp) = model.forward_infer(&rows, &mut cr, ads, true).unwrap();
            let last = last.to_vec2::<f32>().unwrap();
            let plp = plp.unwrap();
            out.push(
                live.iter()
                    .enumerate()
                    .map(|(r, &i)| (i, last[r].clone(), plp[r].clone()))
                    .collect(),
            );
            for &i in &live {
                done[i] += chunk[i];
                assert_eq!(caches[i].len, done[i]);
            }
        }
        out
    }

    /// Each sequence alone, merged into the steps of a run of all of them.
    fn alone(&self, model: &BaseModel, ads: &[&LoraWeights]) -> Steps {
        let mut out: Steps = vec![Vec::new(); self.schedule.len()];
        for i in 0..self.seqs.len() {
            for (step, mut got) in self.run(model, ads, &[i]).into_iter().enumerate() {
                out[step].append(&mut got);
            }
        }
        out
    }
}

fn steps_diff(a: &Steps, b: &Steps) -> f32 {
    let mut worst = 0f32;
    for (sa, sb) in a.iter().zip(b) {
        assert_eq!(sa.len(), sb.len());
        for ((ia, la, pa), (ib, lb, pb)) in sa.iter().zip(sb) {
            assert_eq!(ia, ib);
            worst = worst.max(max_abs_diff(la, lb)).max(max_abs_diff(pa, pb));
        }
    }
    worst
}

#[test]
fn decoding_many_caches_at_once_equals_each_alone() {
    for (family, model) in models(DType::F64) {
        let ads = adapters(&model);
        let refs: Vec<&LoraWeights> = ads.iter().collect();
        let dec = Decode::new(model.config.vocab_size);
        let alone = dec.alone(&model, &refs);
        for budget in [None, Some(0)] {
            let m = match budget {
                None => model.clone(),
                Some(b) => model.with_candle_scores_budget(b),
            };
            let together = dec.run(&m, &refs, &[0, 1, 2, 3]);
            // Logits leave a step in f32: equal up to rounding the f64 values once.
            let d = steps_diff(&together, &alone);
            eprintln!("{family} budget {budget:?}: decode batched vs alone {d:.2e}");
            assert!(d < 1e-5, "{family}: {d}");
        }
    }
}

#[test]
fn candle_decoding_equals_the_cpu_backend_in_f32() {
    for (family, cpu) in models(DType::F32) {
        let ads = adapters(&cpu);
        let refs: Vec<&LoraWeights> = ads.iter().collect();
        let dec = Decode::new(cpu.config.vocab_size);
        let all = [0, 1, 2, 3];
        let d = steps_diff(
            &dec.run(&cpu.with_candle_backend(), &refs, &all),
            &dec.run(&cpu, &refs, &all),
        );
        eprintln!("{family}: candle vs cpu decode {d:.2e}");
        assert!(d < 1e-4, "{family}: {d}");
    }
}
