//! Unit tests of the candle backend's batched pieces, in f64 against plain references:
//! grouping rows under the scores budget, batched attention against a per-token loop
//! (causal, grouped-query, RoPE, q/k norms), its backward against finite differences and
//! against one row per group, decode over caches of different lengths, and stacked LoRA
//! against a per-adapter loop.

use super::attention::{AttnPlan, SCORES_BYTES};
use super::lora::LoraPlan;
use crate::lora::{LoraConfig, LoraGrads, LoraWeights, Site, Target};
use crate::model::backend::{Backend, Candle};
use crate::model::batch::PackedBatch;
use crate::model::front::KvCache;
use crate::model::{Arch, BaseModel, LlamaConfig};
use crate::util::SplitMix64;
use candle_core::{DType, Device, Tensor};

fn families() -> Vec<BaseModel> {
    let qwen3 = LlamaConfig {
        arch: Arch::Qwen3,
        qk_norm: true,
        head_dim: 6,
        ..LlamaConfig::tiny()
    };
    let mqa = LlamaConfig {
        num_kv_heads: 1,
        ..LlamaConfig::tiny()
    };
    [LlamaConfig::tiny(), qwen3, mqa]
        .into_iter()
        .map(|c| BaseModel::random(c, 7, DType::F64).expect("tiny model"))
        .collect()
}

fn randn(rng: &mut SplitMix64, shape: (usize, usize)) -> Tensor {
    let v: Vec<f64> = (0..shape.0 * shape.1)
        .map(|_| rng.normal() as f64)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (vec2(a), vec2(b));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A training batch of rows of these lengths (random tokens, no adapters).
fn batch(m: &BaseModel, lens: &[usize], seed: u64) -> (PackedBatch, Vec<Vec<u32>>) {
    let mut rng = SplitMix64::new(seed);
    let toks: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| (rng.next_u64() % m.config.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    let spec: Vec<(&[u32], Option<usize>, usize)> =
        toks.iter().map(|t| (t.as_slice(), None, 0)).collect();
    (PackedBatch::new(&spec), toks)
}

#[test]
fn rows_group_by_length_under_the_budget() {
    let m = BaseModel::random(LlamaConfig::tiny(), 7, DType::F64).unwrap();
    let (b, _) = batch(&m, &[8, 7, 8, 2, 1, 3], 1);
    // Rows join a group while its padded area stays within twice theirs.
    let plan = AttnPlan::new(&m, &b, SCORES_BYTES).unwrap();
    assert_eq!(plan.num_groups(), 2);
    // No budget: one row per group.
    assert_eq!(AttnPlan::new(&m, &b, 0).unwrap().num_groups(), 6);
    // Room for exactly two 8×8 score blocks of 4 heads in f64.
    assert_eq!(
        AttnPlan::new(&m, &b, 2 * 8 * 8 * 4 * 8)
            .unwrap()
            .num_groups(),
        3
    );
}

/// `x` `[n, heads · hd]` rotated at positions `pos` (candle's half-split RoPE).
fn rope_ref(m: &BaseModel, x: &[f64], pos: usize, heads: usize) -> Vec<f64> {
    let hd = m.config.head_dim;
    let half = hd / 2;
    let cos = vec2(&m.cos);
    let sin = vec2(&m.sin);
    let mut out = x.to_vec();
    for h in 0..heads {
        for d in 0..half {
            let (x1, x2) = (x[h * hd + d], x[h * hd + d + half]);
            out[h * hd + d] = x1 * cos[pos][d] - x2 * sin[pos][d];
            out[h * hd + d + half] = x2 * cos[pos][d] + x1 * sin[pos][d];
        }
    }
    out
}

/// Causal attention of each row, one token and head at a time.
fn attention_ref(m: &BaseModel, b: &PackedBatch, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let c = &m.config;
    let (h, kvh, hd, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size());
    let (q, k, v) = (vec2(q), vec2(k), vec2(v));
    let mut out = vec![vec![0f64; h * hd]; b.num_tokens()];
    for r in &b.rows {
        let qr: Vec<Vec<f64>> = (0..r.len)
            .map(|i| rope_ref(m, &q[r.start + i], r.pos0 + i, h))
            .collect();
        let kr: Vec<Vec<f64>> = (0..r.len)
            .map(|i| rope_ref(m, &k[r.start + i], r.pos0 + i, kvh))
            .collect();
        for i in 0..r.len {
            for head in 0..h {
                let kv = head / g;
                let dot = |j: usize| -> f64 {
                    (0..hd)
                        .map(|d| qr[i][head * hd + d] * kr[j][kv * hd + d])
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                };
                let s: Vec<f64> = (0..=i).map(dot).collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    let p = (sj - mx).exp() / z;
                    for d in 0..hd {
                        out[r.start + i][head * hd + d] += p * v[r.start + j][kv * hd + d];
                    }
                }
            }
        }
    }
    let flat: Vec<f64> = out.into_iter().flatten().collect();
    Tensor::from_vec(flat, (b.num_tokens(), h * hd), &Device::Cpu).unwrap()
}

#[test]
fn batched_attention_equals_a_per_token_loop() {
    let m = BaseModel::random(LlamaConfig::tiny(), 7, DType::F64).unwrap();
    let c = &m.config;
    let (b, _) = batch(&m, &[5, 3, 1, 6], 2);
    let mut rng = SplitMix64::new(3);
    let n = b.num_tokens();
    let q = randn(&mut rng, (n, c.q_dim()));
    let k = randn(&mut rng, (n, c.kv_dim()));
    let v = randn(&mut rng, (n, c.kv_dim()));
    let want = attention_ref(&m, &b, &q, &k, &v);
    for budget in [SCORES_BYTES, 0] {
        let plan = AttnPlan::new(&m, &b, budget).unwrap();
        let (o, _) = m
            .attention(&m.weights.layers[0], &plan, [&q, &k, &v], None, false)
            .unwrap();
        let d = max_diff(&o, &want);
        eprintln!("budget {budget}: batched attention vs loop {d:.2e}");
        assert!(d < 1e-12, "{d}");
    }
}

#[test]
fn attention_backward_matches_finite_differences_and_one_row_per_group() {
    for m in families() {
        let c = m.config.clone();
        let lw = &m.weights.layers[0];
        let (b, _) = batch(&m, &[4, 2, 5], 4);
        let n = b.num_tokens();
        let mut rng = SplitMix64::new(5);
        let q = randn(&mut rng, (n, c.q_dim()));
        let k = randn(&mut rng, (n, c.kv_dim()));
        let v = randn(&mut rng, (n, c.kv_dim()));
        let w = randn(&mut rng, (n, c.q_dim()));
        let plan = AttnPlan::new(&m, &b, SCORES_BYTES).unwrap();
        let objective = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            let (o, _) = m.attention(lw, &plan, [q, k, v], None, false).unwrap();
            (o * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (_, tape) = m.attention(lw, &plan, [&q, &k, &v], None, true).unwrap();
        let grads = m.attention_backward(lw, &plan, &w, &tape.unwrap()).unwrap();
        // One row per group gives the same gradients.
        let single = AttnPlan::new(&m, &b, 0).unwrap();
        let (_, tape1) = m.attention(lw, &single, [&q, &k, &v], None, true).unwrap();
        let grads1 = m
            .attention_backward(lw, &single, &w, &tape1.unwrap())
            .unwrap();
        for (g, g1) in grads.iter().zip(&grads1) {
            assert!(max_diff(g, g1) < 1e-12);
        }
        let eps = 1e-6;
        let mut worst = 0f64;
        for (which, x) in [&q, &k, &v].into_iter().enumerate() {
            let g = vec2(&grads[which]);
            let cols = x.dim(1).unwrap();
            for idx in [0, 3, cols + 1, n * cols - 1] {
                let bump = |h: f64| -> Tensor {
                    let mut flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
                    flat[idx] += h;
                    Tensor::from_vec(flat, x.dims(), &Device::Cpu).unwrap()
                };
                let f = |h: f64| -> f64 {
                    let xb = bump(h);
                    match which {
                        0 => objective(&xb, &k, &v),
                        1 => objective(&q, &xb, &v),
                        _ => objective(&q, &k, &xb),
                    }
                };
                let fd = (f(eps) - f(-eps)) / (2.0 * eps);
                let an = g[idx / cols][idx % cols];
                let err = (fd - an).abs() / (1.0 + an.abs());
                worst = worst.max(err);
                assert!(
                    err < 1e-6,
                    "{:?} input {which}[{idx}]: {an} vs {fd}",
                    c.arch
                );
            }
        }
        eprintln!(
            "{:?}: attention backward vs finite differences {worst:.2e}",
            c.arch
        );
    }
}

#[test]
fn decode_over_caches_of_different_lengths_equals_each_row_alone() {
    for m in families() {
        let mut rng = SplitMix64::new(11);
        let v = m.config.vocab_size as u64;
        let prompts: Vec<Vec<u32>> = [6usize, 2, 4]
            .iter()
            .map(|&n| (0..n).map(|_| (rng.next_u64() % v) as u32).collect())
            .collect();
        let next: Vec<Vec<u32>> = [1usize, 3, 1]
            .iter()
            .map(|&n| (0..n).map(|_| (rng.next_u64() % v) as u32).collect())
            .collect();
        let be = Candle::default();
        let step = |caches: &mut [KvCache], rows: &[&Vec<u32>]| -> Tensor {
            let spec: Vec<(&[u32], Option<usize>, usize)> = rows
                .iter()
                .zip(caches.iter())
                .map(|(t, c)| (t.as_slice(), None, c.len))
                .collect();
            let b = PackedBatch::new(&spec);
            let mut packed: Vec<&mut KvCache> = caches.iter_mut().collect();
            be.infer_hidden(&m, &b, &[], &mut packed).unwrap()
        };
        // Together: prefill all, then one step of mixed lengths over caches of 6, 2, 4.
        let mut caches = vec![KvCache::default(); 3];
        step(&mut caches, &prompts.iter().collect::<Vec<_>>());
        let together = step(&mut caches, &next.iter().collect::<Vec<_>>());
        // Alone.
        let mut parts = Vec::new();
        for (p, nx) in prompts.iter().zip(&next) {
            let mut c = vec![KvCache::default()];
            step(&mut c, &[p]);
            parts.push(step(&mut c, &[nx]));
        }
        let alone = Tensor::cat(&parts, 0).unwrap();
        let d = max_diff(&together, &alone);
        eprintln!("{:?}: decode batched vs alone {d:.2e}", m.config.arch);
        assert!(d < 1e-12, "{d}");
        assert_eq!(
            caches.iter().map(|c| c.len).collect::<Vec<_>>(),
            vec![7, 5, 5]
        );
    }
}

fn adapter(m: &BaseModel, seed: u64, rank: usize, unembed: bool) -> LoraWeights {
    let cfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f32 + 1.0,
        seed,
        targets: Target::ALL.to_vec(),
        train_unembed: unembed,
    };
    let mut w = LoraWeights::init(&cfg, &m.config, &Device::Cpu).unwrap();
    let mut rng = SplitMix64::new(seed ^ 0xB);
    for p in w.pairs.values_mut() {
        let dims = p.b.dims().to_vec();
        let v: Vec<f32> = (0..dims[0] * dims[1]).map(|_| rng.normal() * 0.1).collect();
        p.b = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
    }
    w
}

#[test]
fn stacked_lora_equals_a_loop_over_adapters() {
    let m = BaseModel::random(LlamaConfig::tiny(), 7, DType::F64).unwrap();
    let ads = [
        adapter(&m, 1, 2, true),
        adapter(&m, 2, 3, false),
        adapter(&m, 3, 5, true),
    ];
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    let mut rng = SplitMix64::new(9);
    for spec in [
        vec![
            (3usize, Some(2usize)),
            (2, None),
            (4, Some(0)),
            (1, Some(1)),
            (2, Some(0)),
        ],
        vec![(3, Some(1)), (2, Some(1))],
        vec![(3, None), (2, Some(1))],
    ] {
        let toks: Vec<Vec<u32>> = spec.iter().map(|(n, _)| vec![1; *n]).collect();
        let rows: Vec<(&[u32], Option<usize>, usize)> = toks
            .iter()
            .zip(&spec)
            .map(|(t, (_, a))| (t.as_slice(), *a, 0))
            .collect();
        let b = PackedBatch::new(&rows);
        let n = b.num_tokens();
        let mut plan = LoraPlan::new(&b, &refs, &Device::Cpu, DType::F64);
        for site in [Site::Layer(1, Target::Up), Site::LmHead] {
            let (inp, out) = site.dims(&m.config);
            let x = randn(&mut rng, (n, inp));
            let dy = randn(&mut rng, (n, out));
            let Some(stack) = plan.stack(site).unwrap() else {
                assert!(b
                    .rows
                    .iter()
                    .all(|r| r.adapter.is_none_or(|a| ads[a].get(site).is_none())));
                continue;
            };
            let (d, xs) = stack.forward(&x, 0).unwrap();
            let (dx, parts) = stack.backward_parts(&x, &dy, &xs, 0).unwrap();
            let mut grads = vec![LoraGrads::default(); ads.len()];
            for (ai, da, db) in parts {
                grads[ai].add(site, da, db).unwrap();
            }
            // Reference: each row alone with its own adapter.
            let mut d_ref = Tensor::zeros((n, out), DType::F64, &Device::Cpu).unwrap();
            let mut dx_ref = Tensor::zeros((n, inp), DType::F64, &Device::Cpu).unwrap();
            let mut g_ref = vec![LoraGrads::default(); ads.len()];
            for r in &b.rows {
                let Some((ai, p)) = r.adapter.and_then(|a| Some((a, ads[a].get(site)?))) else {
                    continue;
                };
                let s = ads[ai].scale;
                let (a, bm) = (
                    p.a.to_dtype(DType::F64).unwrap(),
                    p.b.to_dtype(DType::F64).unwrap(),
                );
                let xr = x.narrow(0, r.start, r.len).unwrap();
                let dyr = dy.narrow(0, r.start, r.len).unwrap();
                let xa = xr.matmul(&a.t().unwrap()).unwrap();
                let dr = xa.matmul(&bm.t().unwrap()).unwrap().affine(s, 0.0).unwrap();
                let dxa = dyr.matmul(&bm).unwrap().affine(s, 0.0).unwrap();
                let dxr = dxa.matmul(&a).unwrap();
                d_ref = d_ref
                    .slice_assign(&[r.start..r.start + r.len, 0..out], &dr)
                    .unwrap();
                dx_ref = dx_ref
                    .slice_assign(&[r.start..r.start + r.len, 0..inp], &dxr)
                    .unwrap();
                let da = dxa.t().unwrap().matmul(&xr).unwrap();
                let db = dyr
                    .t()
                    .unwrap()
                    .matmul(&xa)
                    .unwrap()
                    .affine(s, 0.0)
                    .unwrap();
                g_ref[ai].add(site, da, db).unwrap();
            }
            let mut worst = max_diff(&d, &d_ref).max(max_diff(&dx, &dx_ref));
            for (g, gr) in grads.iter().zip(&g_ref) {
                assert_eq!(g.pairs.len(), gr.pairs.len(), "{site:?}: same adapters");
                for (s, (da, db)) in &gr.pairs {
                    let (ga, gb) = &g.pairs[s];
                    worst = worst.max(max_diff(ga, da)).max(max_diff(gb, db));
                }
            }
            eprintln!("{site:?} {spec:?}: stacked LoRA vs loop {worst:.2e}");
            assert!(worst < 1e-12, "{worst}");
        }
    }
}
