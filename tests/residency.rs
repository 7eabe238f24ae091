//! Thousands of adapters in bounded memory, as a tenant sees it: an adapter evicted to disk
//! between every step trains bit-identically to one that stays resident (with an automatic
//! checkpoint every step, and every third step, where eviction writes back); the budget is
//! never exceeded; when pinned adapters fill it, new work waits and then completes; a
//! tenant whose adapter is cold does not hold up another tenant's resident work; after a
//! restart, runs are listed without loading any adapter, and continue exactly; sampling
//! snapshots share the budget, leave memory to disk and sample identically when read back;
//! gradients not yet applied leave memory with their adapter and come back exactly.

mod common;

use candle_core::DType;
use common::*;
use loraplex::config::EngineConfig;
use loraplex::jobs::residency::entry_bytes;
use loraplex::jobs::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::{LoraConfig, LoraWeights, Target};
use loraplex::model::BaseModel;
use loraplex::store::Durable;
use loraplex::train::loss::{BuiltinLoss, LossConfig};
use loraplex::train::Datum;
use loraplex::util::SplitMix64;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn model() -> Arc<BaseModel> {
    Arc::new(tiny(DType::F32))
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

/// Bytes of one resident adapter of [`lora`] on the tiny model.
fn one_adapter(m: &BaseModel) -> u64 {
    entry_bytes(&lora(0), &m.config)
}

/// An engine persisting under `dir`, with `budget` bytes of adapter memory.
fn engine(m: &Arc<BaseModel>, dir: &Path, budget: u64, auto_every: Option<u64>) -> Engine {
    engine_and_store(m, dir, budget, auto_every).0
}

fn engine_and_store(
    m: &Arc<BaseModel>,
    dir: &Path,
    budget: u64,
    auto_every: Option<u64>,
) -> (Engine, Arc<Durable>) {
    let name = m.name.clone();
    std::fs::create_dir_all(dir).unwrap();
    // Opening blocks on the database: off the async workers.
    let durable =
        tokio::task::block_in_place(|| Durable::open(dir, &name, auto_every)).expect("store");
    let store = durable.clone();
    let mm = m.clone();
    let loader: ModelLoader = Arc::new(move || Ok(mm.clone()));
    let cfg = EngineConfig {
        adapter_memory: budget,
        ..EngineConfig::default()
    };
    let persist: Arc<dyn loraplex::jobs::registry::Persist> = durable;
    let e = Engine::start_bases(
        cfg,
        vec![(name, loader)],
        Arc::new(MemoryFutureStore::default()),
        Some(persist),
    )
    .expect("engine");
    (e, store)
}

fn adam() -> AdamParams {
    AdamParams {
        learning_rate: 0.05,
        ..Default::default()
    }
}

fn batch(rng: &mut SplitMix64, vocab: usize) -> Vec<Datum> {
    (0..2)
        .map(|_| Datum::next_token(&tokens(rng, 9, vocab), 0))
        .collect()
}

fn fb(data: Vec<Datum>) -> Op {
    Op::ForwardBackward(FbRequest {
        data,
        loss: Arc::new(BuiltinLoss::CrossEntropy),
        loss_config: LossConfig::new(),
    })
}

/// A forward pass: work that leaves no gradient behind (an adapter holding gradients not
/// yet applied is never evicted).
fn fwd(data: Vec<Datum>) -> Op {
    match fb(data) {
        Op::ForwardBackward(r) => Op::Forward(r),
        _ => unreachable!(),
    }
}

fn loss_of(out: &JobOutput) -> f64 {
    match out {
        JobOutput::ForwardBackward(r) => r.loss,
        o => panic!("not a forward_backward output: {o:?}"),
    }
}

fn bits(w: &LoraWeights) -> Vec<u32> {
    w.pairs
        .values()
        .flat_map(|p| [flat(&p.a), flat(&p.b)])
        .flatten()
        .map(f32::to_bits)
        .collect()
}

/// One training step (forward_backward then optim_step) on `id`; its loss.
async fn step(e: &Engine, t: &TenantId, id: &AdapterId, data: Vec<Datum>) -> f64 {
    let f = e.submit(t, id, None, fb(data)).await.expect("submit");
    let loss = loss_of(&e.result(t, &f, T).await.expect("fb"));
    let f = e
        .submit(t, id, None, Op::OptimStep(adam()))
        .await
        .expect("submit");
    e.result(t, &f, T).await.expect("step");
    loss
}

/// Two tenants' adapters trained in turns for `steps` steps; the losses and final weights
/// of both.
async fn train_in_turns(e: &Engine, steps: usize) -> Vec<(Vec<f64>, Vec<u32>)> {
    let m = e.base_model().await.unwrap();
    let ts = [TenantId::from("ann"), TenantId::from("bob")];
    let mut ids = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        ids.push(e.create_model(t, lora(11 + i as u64)).await.unwrap());
    }
    let mut rngs = [SplitMix64::new(1), SplitMix64::new(2)];
    let mut losses = vec![Vec::new(), Vec::new()];
    for _ in 0..steps {
        for i in 0..2 {
            let d = batch(&mut rngs[i], m.config.vocab_size);
            losses[i].push(step(e, &ts[i], &ids[i], d).await);
            let r = e.residency();
            assert!(r.bytes <= r.budget, "{r:?}");
        }
    }
    let mut out = Vec::new();
    for (i, l) in losses.into_iter().enumerate() {
        let w = e.adapter_weights(&ts[i], &ids[i]).await.unwrap();
        out.push((l, bits(&w)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_evicted_between_every_step_trains_bit_identically() {
    let m = model();
    for auto_every in [None, Some(3)] {
        let dir = tempfile::tempdir().unwrap();
        let resident = engine(&m, &dir.path().join("a"), 1 << 30, auto_every);
        let want = train_in_turns(&resident, 7).await;
        let r = resident.registry().residency();
        assert_eq!(
            r.stats.evictions.load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        // Room for one adapter: each step of one evicts the other.
        let budget = one_adapter(&m);
        let tight = engine(&m, &dir.path().join("b"), budget, auto_every);
        let got = train_in_turns(&tight, 7).await;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.0, w.0, "losses of adapter {i}, auto every {auto_every:?}");
            assert!(
                g.1 == w.1,
                "weights of adapter {i}, auto every {auto_every:?}"
            );
        }
        let res = tight.registry().residency();
        let evictions = res
            .stats
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed);
        let write_backs = res
            .stats
            .write_backs
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(evictions >= 13, "evictions {evictions}");
        match auto_every {
            // Every step is in its automatic checkpoint: eviction writes nothing.
            None => assert_eq!(write_backs, 0),
            // Steps between automatic checkpoints are written back on eviction.
            Some(_) => assert!(write_backs > 0, "no write-back"),
        }
        let snap = tight.residency();
        assert!(snap.peak_bytes <= budget, "{snap:?}");
        assert_eq!(snap.resident, 1);
    }
}

/// Wait until `f` holds (it is about state that changes by itself only one way).
async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_adapters_filling_the_budget_make_new_work_wait_then_complete() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let budget = one_adapter(&m);
    let e = engine(&m, dir.path(), budget, None);
    let (ta, tb) = (TenantId::from("ann"), TenantId::from("bob"));
    let a = e.create_model(&ta, lora(1)).await.unwrap();
    let b = e.create_model(&tb, lora(2)).await.unwrap();
    let mut rng = SplitMix64::new(5);
    let v = m.config.vocab_size;
    // Seq 1 before seq 0: a's queue has work (so its adapter is loaded and pinned) that
    // cannot run yet.
    let a1 = e
        .submit(&ta, &a, Some(1), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    until(|| e.residency().pinned == 1).await;
    // The budget is full of a pinned adapter: b's work waits in the queue.
    let b0 = e
        .submit(&tb, &b, Some(0), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    let rec = e.future(&tb, &b0).unwrap();
    assert!(
        matches!(rec.state, JobState::Pending),
        "b ran without memory: {:?}",
        rec.state
    );
    assert!(e.tenant_metrics(&tb).queued >= 1);
    assert!(!e.registry().residency().is_resident(&b));
    // a's missing request arrives: a's work runs, its pin goes, b loads and completes.
    let a0 = e
        .submit(&ta, &a, Some(0), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    for (t, f) in [(&ta, &a0), (&ta, &a1), (&tb, &b0)] {
        e.result(t, f, T).await.expect("completes");
    }
    let snap = e.residency();
    assert!(snap.peak_bytes <= budget, "{snap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_tenant_waiting_for_its_load_does_not_hold_up_resident_work() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let budget = 2 * one_adapter(&m);
    let e = engine(&m, dir.path(), budget, None);
    let (ta, tr, tc) = (
        TenantId::from("ann"),
        TenantId::from("res"),
        TenantId::from("cold"),
    );
    let a = e.create_model(&ta, lora(1)).await.unwrap();
    let r = e.create_model(&tr, lora(2)).await.unwrap();
    let c = e.create_model(&tc, lora(3)).await.unwrap();
    let mut rng = SplitMix64::new(9);
    let v = m.config.vocab_size;
    // a and r: resident and pinned by work waiting for an earlier seq_id (r: two gaps, so
    // it stays pinned after its first work runs).
    let a1 = e
        .submit(&ta, &a, Some(1), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    let r1 = e
        .submit(&tr, &r, Some(1), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    let r3 = e
        .submit(&tr, &r, Some(3), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    until(|| e.residency().pinned == 2).await;
    // The cold tenant's load starts and waits for memory (on its loader thread).
    let c0 = e
        .submit(&tc, &c, Some(0), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    // The resident tenant's work runs to completion meanwhile.
    let r0 = e
        .submit(&tr, &r, Some(0), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    e.result(&tr, &r0, T).await.expect("r0");
    e.result(&tr, &r1, T).await.expect("r1");
    let rec = e.future(&tc, &c0).unwrap();
    assert!(
        matches!(rec.state, JobState::Pending),
        "the cold tenant ran before there was memory for it: {:?}",
        rec.state
    );
    assert!(!e.registry().residency().is_resident(&c));
    // Then the cold tenant's work completes too, once there is memory.
    let a0 = e
        .submit(&ta, &a, Some(0), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    let r2 = e
        .submit(&tr, &r, Some(2), fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    for (t, f) in [(&tc, &c0), (&ta, &a0), (&ta, &a1), (&tr, &r2), (&tr, &r3)] {
        e.result(t, f, T).await.expect("completes");
    }
    assert!(e.residency().peak_bytes <= budget);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_runs_are_listed_without_loading_and_continue_exactly() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let n = 24;
    let v = m.config.vocab_size;
    let t = TenantId::from("ann");
    let mut ids = Vec::new();
    let mut next_loss = Vec::new();
    {
        let e = engine(&m, dir.path(), 1 << 30, None);
        for i in 0..n {
            let id = e.create_model(&t, lora(100 + i)).await.unwrap();
            let mut rng = SplitMix64::new(i);
            step(&e, &t, &id, batch(&mut rng, v)).await;
            // What the next forward pass gives, to compare after the restart.
            let f = e
                .submit(&t, &id, None, fwd(batch(&mut rng, v)))
                .await
                .unwrap();
            next_loss.push(loss_of(&e.result(&t, &f, T).await.unwrap()));
            ids.push(id);
        }
    }
    let (e, durable) = engine_and_store(&m, dir.path(), 1 << 30, None);
    e.base_model().await.unwrap();
    let (d, e2) = (durable.clone(), e.clone());
    let restored = tokio::task::spawn_blocking(move || d.restore(&e2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored.models, n as usize);
    assert_eq!(e.registry().num_adapters(), n as usize);
    let snap = e.residency();
    assert_eq!(snap.resident, 0, "restore loaded adapters: {snap:?}");
    assert_eq!(snap.bytes, 0);
    for id in &ids {
        assert_eq!(e.registry().adapter(&t, id).unwrap().step(), 1);
    }
    // The first job of one run loads that run only, at its step.
    let i = 5;
    let mut rng = SplitMix64::new(i as u64);
    batch(&mut rng, v);
    let f = e
        .submit(&t, &ids[i], None, fwd(batch(&mut rng, v)))
        .await
        .unwrap();
    let loss = loss_of(&e.result(&t, &f, T).await.unwrap());
    assert_eq!(loss, next_loss[i]);
    let snap = e.residency();
    assert_eq!(snap.resident, 1, "{snap:?}");
    assert_eq!(
        e.registry()
            .residency()
            .stats
            .loads
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// Greedy continuation of a fixed prompt on session `s`: tokens and their logprobs' bits.
async fn greedy(e: &Engine, t: &TenantId, s: &SessionId) -> (Vec<u32>, Vec<u32>) {
    use loraplex::sample::SamplingParams;
    let params = SamplingParams {
        max_tokens: 6,
        temperature: 0.0,
        ..Default::default()
    };
    let req = SampleRequest::new(vec![1, 2, 3, 4, 5], params);
    let f = e.sample(t, s, req).await.expect("sample");
    match &*e.result(t, &f, T).await.expect("sampled") {
        JobOutput::Sample(o) => (
            o.sequences[0].tokens.clone(),
            o.sequences[0]
                .logprobs
                .iter()
                .map(|x| x.to_bits())
                .collect(),
        ),
        o => panic!("not a sample: {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_snapshots_share_the_budget_leave_memory_and_sample_identically() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    // Room for one training adapter; a snapshot (weights only) takes a quarter of that.
    let budget = one_adapter(&m);
    let e = engine(&m, dir.path(), budget, None);
    let t = TenantId::from("ann");
    let a = e.create_model(&t, lora(3)).await.unwrap();
    let v = m.config.vocab_size;
    let mut rng = SplitMix64::new(4);
    step(&e, &t, &a, batch(&mut rng, v)).await;
    let s1 = e.sampling_session(&t, &a, None, T).await.unwrap();
    let res = e.registry().residency().clone();
    let first = greedy(&e, &t, &s1).await;
    assert_eq!(first.0.len(), 6);
    assert!(res.is_snapshot_resident(&s1));
    assert_eq!(e.residency().snapshots, 1);
    let snapshot_of = |s: &SessionId| {
        e.registry()
            .session(&t, s)
            .unwrap()
            .weights
            .clone()
            .unwrap()
    };
    let before = bits(&snapshot_of(&s1).resident_weights().unwrap());

    // Training again needs the adapter's memory: the idle snapshot leaves, written to disk.
    step(&e, &t, &a, batch(&mut rng, v)).await;
    step(&e, &t, &a, batch(&mut rng, v)).await;
    assert!(!res.is_snapshot_resident(&s1), "{:?}", e.residency());
    let spilled = dir.path().join("snapshots").join("ann").join(s1.as_str());
    assert!(spilled.exists(), "no spilled copy at {}", spilled.display());

    // Read back, its weights are bit-identical and it samples as before (the prompt's
    // KV now comes from the prefix cache, so logprobs may differ in the last bit).
    let again = greedy(&e, &t, &s1).await;
    assert!(res.is_snapshot_resident(&s1));
    assert_eq!(bits(&snapshot_of(&s1).resident_weights().unwrap()), before);
    assert_eq!(again.0, first.0);
    for (x, y) in again.1.iter().zip(&first.1) {
        let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
    let s2 = e.sampling_session(&t, &a, None, T).await.unwrap();
    let newer = greedy(&e, &t, &s2).await;
    assert_ne!(
        newer.1, first.1,
        "the second session samples the trained weights"
    );
    let snap = e.residency();
    assert!(snap.peak_bytes <= budget, "{snap:?}");

    // Ending the session deletes its spilled copy and frees its memory.
    e.registry().remove_session(&t, &s1).unwrap();
    assert!(!spilled.exists());
    assert!(!res.is_snapshot_resident(&s1));
    let r = e.residency();
    assert!(r.bytes <= budget, "{r:?}");
}

/// Two tenants interleave forward_backward calls and apply them with one optim_step each
/// at the end: with room for one adapter, each call evicts the other adapter holding
/// gradients not yet applied. Returns the losses and the final weights.
async fn accumulate_in_turns(e: &Engine) -> Vec<(Vec<f64>, Vec<u32>)> {
    let m = e.base_model().await.unwrap();
    let ts = [TenantId::from("ann"), TenantId::from("bob")];
    let mut ids = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        ids.push(e.create_model(t, lora(21 + i as u64)).await.unwrap());
    }
    let mut rngs = [SplitMix64::new(7), SplitMix64::new(8)];
    let mut losses = vec![Vec::new(), Vec::new()];
    for _ in 0..3 {
        for i in 0..2 {
            let d = batch(&mut rngs[i], m.config.vocab_size);
            let f = e.submit(&ts[i], &ids[i], None, fb(d)).await.unwrap();
            losses[i].push(loss_of(&e.result(&ts[i], &f, T).await.expect("fb")));
        }
    }
    let mut out = Vec::new();
    for i in 0..2 {
        let f = e
            .submit(&ts[i], &ids[i], None, Op::OptimStep(adam()))
            .await
            .unwrap();
        e.result(&ts[i], &f, T).await.expect("step");
        let w = e.adapter_weights(&ts[i], &ids[i]).await.unwrap();
        out.push((std::mem::take(&mut losses[i]), bits(&w)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradients_not_yet_applied_leave_memory_with_their_adapter() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let resident = engine(&m, &dir.path().join("a"), 1 << 30, None);
    let want = accumulate_in_turns(&resident).await;
    let budget = one_adapter(&m);
    let tight = engine(&m, &dir.path().join("b"), budget, None);
    let got = accumulate_in_turns(&tight).await;
    assert_eq!(got, want, "losses and weights with and without eviction");
    let res = tight.registry().residency();
    let evictions = res
        .stats
        .evictions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(evictions >= 5, "evictions {evictions}");
    let snap = tight.residency();
    assert!(snap.peak_bytes <= budget, "{snap:?}");
    // Nothing is left in the gradient folder once they were applied.
    let left = std::fs::read_dir(dir.path().join("b").join("grads"))
        .unwrap()
        .flat_map(|t| std::fs::read_dir(t.unwrap().path()).unwrap())
        .count();
    assert_eq!(left, 0);
}
