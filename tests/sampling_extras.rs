//! What a sampling request asks of its prompt, and prompt KV computed once: target-id
//! logprobs and alternative draws agree with the full next-token distribution computed
//! independently (one candle forward per prefix); `prompt_logprobs_last_n` scores only the
//! suffix; a request's samples share one prefill and later requests of a sampling session
//! reuse its prompt KV, with results identical to sampling without any sharing, and cached
//! KV never crosses sampling sessions, tenants or weights.

mod common;

use candle_core::DType;
use common::*;
use loraplex::config::EngineConfig;
use loraplex::jobs::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::{LoraConfig, LoraWeights, Target};
use loraplex::model::{BaseModel, InferRow, KvCache};
use loraplex::sample::prompt::{CellLayout, Csr, PromptTargets};
use loraplex::sample::SamplingParams;
use loraplex::train::loss::{BuiltinLoss, LossConfig};
use loraplex::train::Datum;
use loraplex::util::SplitMix64;
use loraplex::Error;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn model() -> Arc<BaseModel> {
    Arc::new(tiny(DType::F32))
}

/// The engine without any prompt sharing: every sequence prefills its whole prompt.
fn unshared() -> EngineConfig {
    EngineConfig {
        share_prompt_kv: false,
        prefix_cache_bytes: 0,
        ..Default::default()
    }
}

fn engine(m: &Arc<BaseModel>, cfg: EngineConfig) -> Engine {
    Engine::with_model(cfg, m.clone()).expect("engine")
}

fn prompt(len: usize, seed: u64) -> Vec<u32> {
    tokens(&mut SplitMix64::new(seed), len, 64)
}

/// `log p(· | prompt[..=q])` for every q < len - 1, each from its own candle forward over
/// the prefix (no host kernels, no prompt-logits path).
fn full_logprobs(m: &BaseModel, w: Option<&LoraWeights>, prompt: &[u32]) -> Vec<Vec<f32>> {
    let reference = m.with_candle_backend();
    let adapters: Vec<&LoraWeights> = w.into_iter().collect();
    (0..prompt.len() - 1)
        .map(|q| {
            let mut cache = KvCache::default();
            let rows = [InferRow {
                tokens: &prompt[..=q],
                adapter: w.map(|_| 0),
            }];
            let (logits, _) = reference
                .forward_infer(&rows, &mut [&mut cache], &adapters, false)
                .unwrap();
            let row: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row.iter().map(|&l| (l as f64 - lse) as f32).collect()
        })
        .collect()
}

async fn sample(e: &Engine, t: &TenantId, s: &SessionId, r: SampleRequest) -> SampleOutput {
    let f = e.sample(t, s, r).await.expect("submit");
    match &*e.result(t, &f, T).await.expect("result") {
        JobOutput::Sample(o) => o.clone(),
        o => panic!("not a sample: {o:?}"),
    }
}

fn params(max_tokens: usize, temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature,
        top_k: 40,
        seed: Some(seed),
        ..Default::default()
    }
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_prompt_logprobs_are_the_full_distribution_at_each_position() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let p = prompt(12, 1);
    let want = full_logprobs(&m, None, &p);
    // Dense: every vocabulary id at every position.
    let rows = p.len() - 1;
    let mut r = SampleRequest::new(p.clone(), params(2, 1.0, 5));
    r.prompt_logprobs = true;
    r.target_prompt_logprobs = Some(Arc::new(PromptTargets {
        layout: CellLayout {
            rows,
            cols: 64,
            sparse: None,
        },
        ids: (0..rows * 64).map(|c| Some((c % 64) as u32)).collect(),
    }));
    let o = sample(&e, &t, &s, r).await;
    let got = o.target_prompt_logprobs.as_ref().unwrap();
    assert_eq!(got.logprobs.len(), rows * 64);
    for q in 0..rows {
        for id in 0..64 {
            let (g, w) = (got.logprobs[q * 64 + id], want[q][id]);
            assert!(close(g, w, 1e-4), "position {q} id {id}: {g} vs {w}");
        }
    }
    // The column of the actual next token is what compute_logprobs returns.
    let plp = o.prompt_logprobs.as_ref().unwrap();
    for q in 0..rows {
        let g = got.logprobs[q * 64 + p[q + 1] as usize];
        assert!(close(g, plp[q], 1e-6), "position {q}: {g} vs {}", plp[q]);
    }
    // Sparse, with -1 cells and empty leading rows: 0 where nothing was named.
    let mut r = SampleRequest::new(p.clone(), params(1, 1.0, 5));
    r.target_prompt_logprobs = Some(Arc::new(PromptTargets {
        layout: CellLayout {
            rows,
            cols: 3,
            sparse: Some(Csr {
                crow: (0..=rows)
                    .map(|i| if i <= 6 { 0 } else { (i - 6) * 2 })
                    .collect(),
                col: (6..rows).flat_map(|_| [0, 2]).collect(),
            }),
        },
        ids: (6..rows)
            .flat_map(|q| [Some(p[q + 1]), if q % 2 == 0 { None } else { Some(7) }])
            .collect(),
    }));
    let o = sample(&e, &t, &s, r).await;
    let got = &o.target_prompt_logprobs.as_ref().unwrap().logprobs;
    for (j, q) in (6..rows).enumerate() {
        assert!(close(got[2 * j], want[q][p[q + 1] as usize], 1e-4));
        let other = if q % 2 == 0 { 0.0 } else { want[q][7] };
        assert!(close(got[2 * j + 1], other, 1e-4), "q {q}");
    }
    assert!(o.prompt_logprobs.is_none(), "only what was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternative_draws_carry_the_models_logprobs_and_follow_its_distribution() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let p = prompt(30, 2);
    let want = full_logprobs(&m, None, &p);
    let k = 64;
    let mut r = SampleRequest::new(p.clone(), params(1, 1.0, 9));
    r.prompt_alt_tokens_k = k;
    let a = sample(&e, &t, &s, r.clone())
        .await
        .prompt_alt_tokens
        .unwrap();
    assert_eq!((a.k, a.tokens.len()), (k, (p.len() - 1) * k));
    let (mut drawn, mut neg_entropy) = (0f64, 0f64);
    for q in 0..p.len() - 1 {
        for j in 0..k {
            let (tok, lp) = (a.tokens[q * k + j] as usize, a.logprobs[q * k + j]);
            assert!(
                close(lp, want[q][tok], 1e-4),
                "position {q}: {lp} vs {}",
                want[q][tok]
            );
            drawn += lp as f64 / k as f64;
        }
        neg_entropy += want[q]
            .iter()
            .map(|&l| (l as f64).exp() * l as f64)
            .sum::<f64>();
    }
    // E[log p(drawn)] = -H(p): draws at temperature 1 follow the model's distribution.
    let rows = (p.len() - 1) as f64;
    let (mean, expect) = (drawn / rows, neg_entropy / rows);
    assert!(
        (mean - expect).abs() < 0.15,
        "mean drawn logprob {mean:.3} vs -H {expect:.3}"
    );
    // Same seed, same draws; temperature 0 is the most likely token every time.
    let again = sample(&e, &t, &s, r.clone())
        .await
        .prompt_alt_tokens
        .unwrap();
    assert_eq!(again.tokens, a.tokens);
    r.params.temperature = 0.0;
    let g = sample(&e, &t, &s, r).await.prompt_alt_tokens.unwrap();
    for q in 0..p.len() - 1 {
        let best = (0..64)
            .max_by(|&x, &y| want[q][x].total_cmp(&want[q][y]))
            .unwrap();
        assert!(g.tokens[q * k..(q + 1) * k]
            .iter()
            .all(|&x| x as usize == best));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_last_n_scores_only_the_suffix_plain_and_top_k() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let p = prompt(20, 3);
    let want = full_logprobs(&m, None, &p);
    let mut r = SampleRequest::new(p.clone(), params(1, 1.0, 1));
    r.prompt_logprobs = true;
    r.prompt_top_logprobs = 3;
    r.prompt_logprobs_last_n = Some(4);
    let o = sample(&e, &t, &s, r).await;
    let (plp, top) = (o.prompt_logprobs.unwrap(), o.prompt_top_logprobs.unwrap());
    assert_eq!((plp.len(), top.len()), (19, 19));
    for q in 0..19 {
        if q < 15 {
            assert!(top[q].is_empty(), "row {q} is not scored");
            continue;
        }
        assert!(close(plp[q], want[q][p[q + 1] as usize], 1e-4));
        let mut best: Vec<(usize, f32)> = want[q].iter().copied().enumerate().collect();
        best.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (j, &(id, lp)) in top[q].iter().enumerate() {
            assert_eq!(id as usize, best[j].0, "row {q} rank {j}");
            assert!(close(lp, best[j].1, 1e-4));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefill_and_cached_prefixes_sample_exactly_as_without_them() {
    let m = model();
    let plain = engine(&m, unshared());
    let shared = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let (sp, ss) = (
        plain.base_sampling_session(&t).await.unwrap(),
        shared.base_sampling_session(&t).await.unwrap(),
    );
    let p = prompt(40, 4);
    let mut r = SampleRequest::new(p.clone(), params(12, 1.0, 77));
    r.num_samples = 4;
    r.top_logprobs = 2;
    let want = sample(&plain, &t, &sp, r.clone()).await;
    assert_eq!(want.prompt_cache_hit_tokens, 0);
    // The sampler's token count: 4 prompts and 4 x 12 generated tokens without sharing...
    let fed = |e: &Engine| e.tenant_metrics(&t).sampled_tokens;
    assert_eq!(fed(&plain), 4 * 40 + 4 * 12);
    let same = |o: &SampleOutput, what: &str| {
        assert_eq!(o.sequences.len(), 4);
        for (i, (a, b)) in o.sequences.iter().zip(&want.sequences).enumerate() {
            assert_eq!(a.tokens, b.tokens, "{what}: sequence {i}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(close(*x, *y, 1e-4), "{what}: sequence {i}: {x} vs {y}");
            }
            assert_eq!(a.stop_reason, b.stop_reason);
        }
    };
    // One prefill for the four samples, then the whole prompt but its last token cached.
    let first = sample(&shared, &t, &ss, r.clone()).await;
    same(&first, "forked");
    assert_eq!(first.prompt_cache_hit_tokens, 0);
    // ...and one prompt with sharing, then one token of it with the cache.
    assert_eq!(fed(&shared), 40 + 4 * 12);
    let second = sample(&shared, &t, &ss, r.clone()).await;
    same(&second, "cached");
    assert_eq!(second.prompt_cache_hit_tokens, 39);
    assert_eq!(fed(&shared), 40 + 4 * 12 + 1 + 4 * 12);
    // Scoring the last 5 prompt tokens: the prefix before them comes from the cache, and
    // the scores match the uncached ones.
    r.prompt_logprobs = true;
    r.prompt_top_logprobs = 2;
    r.prompt_logprobs_last_n = Some(5);
    let want_scored = sample(&plain, &t, &sp, r.clone()).await;
    let scored = sample(&shared, &t, &ss, r.clone()).await;
    assert_eq!(scored.prompt_cache_hit_tokens, 34);
    let (a, b) = (
        scored.prompt_logprobs.unwrap(),
        want_scored.prompt_logprobs.unwrap(),
    );
    for q in 34..39 {
        assert!(
            close(a[q], b[q], 1e-4),
            "position {q}: {} vs {}",
            a[q],
            b[q]
        );
    }
    // Whole-prompt logprobs read every position: nothing is taken from the cache.
    r.prompt_logprobs_last_n = None;
    let full = sample(&shared, &t, &ss, r.clone()).await;
    assert_eq!(full.prompt_cache_hit_tokens, 0);
    same(&full, "whole prompt scored");
    // A prompt that shares 30 tokens with the cached one prefills the other 15.
    let mut longer = p[..30].to_vec();
    longer.extend(prompt(15, 40));
    longer[30] = (p[30] + 1) % 64;
    let mut r2 = SampleRequest::new(longer, params(8, 1.0, 3));
    r2.num_samples = 2;
    let want2 = sample(&plain, &t, &sp, r2.clone()).await;
    let got2 = sample(&shared, &t, &ss, r2).await;
    assert_eq!(got2.prompt_cache_hit_tokens, 30);
    for (a, b) in got2.sequences.iter().zip(&want2.sequences) {
        assert_eq!(a.tokens, b.tokens);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_with_one_prompt_prefill_it_once() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let p = prompt(40, 5);
    let mut futures = Vec::new();
    for i in 0..4 {
        futures.push(
            e.sample(&t, &s, SampleRequest::new(p.clone(), params(6, 1.0, i)))
                .await
                .unwrap(),
        );
    }
    let mut hits = Vec::new();
    for f in futures {
        match &*e.result(&t, &f, T).await.unwrap() {
            JobOutput::Sample(o) => hits.push(o.prompt_cache_hit_tokens),
            o => panic!("{o:?}"),
        }
    }
    hits.sort();
    assert_eq!(
        hits,
        vec![0, 39, 39, 39],
        "the first prefills, the others reuse it"
    );
}

fn lora(seed: u64) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed,
        targets: Target::ALL.to_vec(),
        train_unembed: false,
    }
}

/// One cross-entropy step with a big learning rate, so the adapter's weights change.
async fn train_step(e: &Engine, t: &TenantId, id: &AdapterId, seq: u64) {
    let mut rng = SplitMix64::new(seq);
    let op = Op::ForwardBackward(FbRequest {
        data: vec![Datum::next_token(&tokens(&mut rng, 17, 64), 0)],
        loss: Arc::new(BuiltinLoss::CrossEntropy),
        loss_config: LossConfig::new(),
    });
    let f = e.submit(t, id, Some(seq), op).await.unwrap();
    e.result(t, &f, T).await.unwrap();
    let adam = AdamParams {
        learning_rate: 0.05,
        ..Default::default()
    };
    let f = e
        .submit(t, id, Some(seq + 1), Op::OptimStep(adam))
        .await
        .unwrap();
    e.result(t, &f, T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prompt_kv_never_crosses_sessions_tenants_or_weights() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let (t, u) = (TenantId::from("t"), TenantId::from("u"));
    let p = prompt(40, 6);
    let mut r = SampleRequest::new(p.clone(), params(4, 0.0, 1));
    r.prompt_logprobs = true;
    r.prompt_logprobs_last_n = Some(1);
    let hit = |o: &SampleOutput| o.prompt_cache_hit_tokens;
    let s1 = e.base_sampling_session(&t).await.unwrap();
    assert_eq!(hit(&sample(&e, &t, &s1, r.clone()).await), 0);
    assert_eq!(hit(&sample(&e, &t, &s1, r.clone()).await), 38);
    // Another sampling session of the same tenant and weights, another tenant: no hit.
    let s2 = e.base_sampling_session(&t).await.unwrap();
    assert_eq!(hit(&sample(&e, &t, &s2, r.clone()).await), 0);
    let su = e.base_sampling_session(&u).await.unwrap();
    assert_eq!(hit(&sample(&e, &u, &su, r.clone()).await), 0);
    // An adapter, then new weights saved for sampling: a new snapshot starts cold, and its
    // logprobs are its own weights' (computed independently), not the old snapshot's.
    let id = e.create_model(&t, lora(3)).await.unwrap();
    train_step(&e, &t, &id, 0).await;
    let a1 = e.sampling_session(&t, &id, Some(2), T).await.unwrap();
    let o1 = sample(&e, &t, &a1, r.clone()).await;
    assert_eq!(hit(&o1), 0);
    assert_eq!(hit(&sample(&e, &t, &a1, r.clone()).await), 38);
    train_step(&e, &t, &id, 3).await;
    let a2 = e.sampling_session(&t, &id, Some(5), T).await.unwrap();
    let o2 = sample(&e, &t, &a2, r.clone()).await;
    assert_eq!(hit(&o2), 0);
    let again = sample(&e, &t, &a2, r.clone()).await;
    assert_eq!(hit(&again), 38);
    let w2 = e
        .registry()
        .session(&t, &a2)
        .unwrap()
        .weights
        .clone()
        .unwrap()
        .resident_weights()
        .unwrap();
    let want = full_logprobs(&m, Some(&w2), &p);
    let last = want[38][p[39] as usize];
    for o in [&o2, &again] {
        let got = o.prompt_logprobs.as_ref().unwrap()[38];
        assert!(close(got, last, 1e-4), "{got} vs {last}");
    }
    let old = o1.prompt_logprobs.as_ref().unwrap()[38];
    assert!(
        (old - last).abs() > 1e-3,
        "the two snapshots differ: {old} vs {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prompt_requests_are_refused_naming_the_field() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let p = prompt(10, 7);
    let refused = |r: SampleRequest, field: &'static str| {
        let (e, t, s) = (&e, &t, &s);
        async move {
            match e.sample(t, s, r).await {
                Err(err @ Error::InvalidInput { .. }) => {
                    assert!(err.to_string().contains(field), "{err}")
                }
                other => panic!("expected a refusal naming {field}, got {other:?}"),
            }
        }
    };
    let base = SampleRequest::new(p.clone(), params(2, 1.0, 1));
    for n in [0, 10] {
        let mut r = base.clone();
        r.prompt_logprobs = true;
        r.prompt_logprobs_last_n = Some(n);
        refused(r, "prompt_logprobs_last_n").await;
    }
    let mut r = base.clone();
    r.prompt_alt_tokens_k = 65;
    refused(r, "prompt_alt_tokens_k").await;
    let targets = |rows: usize, ids: Vec<Option<u32>>| {
        Some(Arc::new(PromptTargets {
            layout: CellLayout {
                rows,
                cols: 1,
                sparse: None,
            },
            ids,
        }))
    };
    let mut r = base.clone();
    r.target_prompt_logprobs = targets(10, vec![Some(1); 10]);
    refused(r, "target_prompt_logprobs").await;
    let mut r = base.clone();
    r.target_prompt_logprobs = targets(9, vec![Some(64); 9]);
    refused(r, "target_prompt_logprobs").await;
    let mut r = base.clone();
    r.target_prompt_logprobs = targets(9, vec![None; 9]);
    refused(r, "target_prompt_logprobs").await;
    let mut r = base;
    r.target_prompt_logprobs = Some(Arc::new(PromptTargets {
        layout: CellLayout {
            rows: 1 << 30,
            cols: 1 << 30,
            sparse: None,
        },
        ids: vec![Some(1)],
    }));
    refused(r, "target_prompt_logprobs").await;
}

/// The same on candle's general ops (the path a GPU takes): KV kept as device tensors is
/// cut and copied for forks and cache hits, and the prompt's logits reach the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candle_kv_forks_and_cache_hits_match_the_host_kernels() {
    let m = model();
    let host = engine(&m, unshared());
    let candle = engine(&Arc::new(m.with_candle_backend()), EngineConfig::default());
    let t = TenantId::from("t");
    let (sh, sc) = (
        host.base_sampling_session(&t).await.unwrap(),
        candle.base_sampling_session(&t).await.unwrap(),
    );
    let p = prompt(40, 8);
    let mut r = SampleRequest::new(p.clone(), params(10, 1.0, 21));
    r.num_samples = 3;
    r.prompt_logprobs = true;
    r.prompt_logprobs_last_n = Some(3);
    r.target_prompt_logprobs = Some(Arc::new(PromptTargets {
        layout: CellLayout {
            rows: 39,
            cols: 1,
            sparse: Some(Csr {
                crow: (0..=39).map(|i| usize::from(i == 39)).collect(),
                col: vec![0],
            }),
        },
        ids: vec![Some(5)],
    }));
    let want = sample(&host, &t, &sh, r.clone()).await;
    for round in 0..2 {
        let got = sample(&candle, &t, &sc, r.clone()).await;
        assert_eq!(got.prompt_cache_hit_tokens, if round == 0 { 0 } else { 36 });
        for (a, b) in got.sequences.iter().zip(&want.sequences) {
            assert_eq!(a.tokens, b.tokens, "round {round}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(close(*x, *y, 1e-4), "round {round}: {x} vs {y}");
            }
        }
        let (a, b) = (
            got.prompt_logprobs.as_ref().unwrap(),
            want.prompt_logprobs.as_ref().unwrap(),
        );
        for q in 36..39 {
            assert!(close(a[q], b[q], 1e-4), "round {round} position {q}");
        }
        let (a, b) = (
            &got.target_prompt_logprobs.as_ref().unwrap().logprobs,
            &want.target_prompt_logprobs.as_ref().unwrap().logprobs,
        );
        assert!(close(a[0], b[0], 1e-4) && a[0] < 0.0);
    }
}
