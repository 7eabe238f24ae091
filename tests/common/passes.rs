//! A training pass run on given rows and loss seeds, and the comparison of two passes
//! (logprobs, and every LoRA gradient relative to its largest entry): shared by the tests
//! that hold one pass against another (`host_train`, `quant_base`).

use super::{flat, max_abs_diff, tokens};
use loraplex::lora::{LoraGrads, LoraWeights};
use loraplex::model::{BaseModel, TrainRow};
use loraplex::util::SplitMix64;

/// tokens, targets, k, adapter
pub type Row = (Vec<u32>, Vec<u32>, usize, Option<usize>);

pub struct Case {
    pub rows: Vec<Row>,
    pub seeds: Vec<Vec<f32>>,
}

impl Case {
    pub fn new(spec: &[(usize, usize, Option<usize>)], vocab: usize, seed: u64) -> Case {
        let mut rng = SplitMix64::new(seed);
        let rows: Vec<_> = spec
            .iter()
            .map(|&(len, k, a)| {
                (
                    tokens(&mut rng, len, vocab),
                    tokens(&mut rng, len * k, vocab),
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

    pub fn train_rows(&self) -> Vec<TrainRow<'_>> {
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

    pub fn run(&self, model: &BaseModel, ads: &[&LoraWeights]) -> (Vec<Vec<f32>>, Vec<LoraGrads>) {
        let (lp, tape) = model
            .forward_train(&model.train_batch(&self.train_rows()).unwrap(), ads, true)
            .unwrap();
        let grads = model.backward(tape.unwrap(), &self.seeds, ads).unwrap();
        (lp, grads)
    }
}

/// Worst difference of logprobs, and of each gradient relative to its largest entry.
pub fn compare(
    host: &(Vec<Vec<f32>>, Vec<LoraGrads>),
    reference: &(Vec<Vec<f32>>, Vec<LoraGrads>),
) -> (f32, f32) {
    let lp_err = host
        .0
        .iter()
        .zip(&reference.0)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0f32, f32::max);
    let mut g_err = 0f32;
    for (ai, (h, r)) in host.1.iter().zip(&reference.1).enumerate() {
        assert_eq!(
            h.pairs.keys().collect::<Vec<_>>(),
            r.pairs.keys().collect::<Vec<_>>(),
            "adapter {ai}: the same sites get gradients"
        );
        for (site, (da, db)) in &h.pairs {
            let (ra, rb) = &r.pairs[site];
            for (got, want) in [(flat(da), flat(ra)), (flat(db), flat(rb))] {
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    scale > 0.0,
                    "adapter {ai} {site:?}: zero reference gradient"
                );
                g_err = g_err.max(max_abs_diff(&got, &want) / scale);
            }
        }
    }
    (lp_err, g_err)
}
