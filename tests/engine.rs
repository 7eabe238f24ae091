//! The job engine as tenants see it: many models training at once give the same results as
//! each model alone; seq_id order and idempotency; failures stay with their request; big
//! requests are split without starving others; admission control; tenant isolation;
//! reproducible, batched sampling with stop tokens and strings.

mod common;

use candle_core::{DType, Device};
use common::*;
use loraplex::config::EngineConfig;
use loraplex::error::Category;
use loraplex::jobs::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::{LoraConfig, LoraWeights, Target};
use loraplex::model::BaseModel;
use loraplex::sample::{SamplingParams, StopReason};
use loraplex::train::loss::{BuiltinLoss, LossConfig, LossDatum, LossFunction, LossOutput};
use loraplex::train::{check_data, forward_backward, Datum, TrainableAdapter, Work};
use loraplex::util::SplitMix64;
use loraplex::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn model() -> Arc<BaseModel> {
    Arc::new(tiny(DType::F32))
}

fn engine(m: &Arc<BaseModel>, cfg: EngineConfig) -> Engine {
    Engine::with_model(cfg, m.clone()).expect("engine")
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

fn adam() -> AdamParams {
    AdamParams {
        learning_rate: 0.05,
        ..Default::default()
    }
}

fn data(rng: &mut SplitMix64, rows: usize, len: usize, vocab: usize) -> Vec<Datum> {
    (0..rows)
        .map(|_| Datum::next_token(&tokens(rng, len + 1, vocab), 0))
        .collect()
}

fn fb(data: Vec<Datum>, loss: Arc<dyn LossFunction>) -> Op {
    Op::ForwardBackward(FbRequest {
        data,
        loss,
        loss_config: LossConfig::new(),
    })
}

fn ce() -> Arc<dyn LossFunction> {
    Arc::new(BuiltinLoss::CrossEntropy)
}

fn fb_loss(out: &JobOutput) -> f64 {
    match out {
        JobOutput::ForwardBackward(r) => r.loss,
        o => panic!("not a forward_backward output: {o:?}"),
    }
}

fn weights_of(w: &LoraWeights) -> Vec<f32> {
    w.pairs
        .values()
        .flat_map(|p| [flat(&p.a), flat(&p.b)])
        .flatten()
        .collect()
}

/// Run the same steps on one adapter directly, without the engine.
fn alone(
    model: &BaseModel,
    cfg: &LoraConfig,
    steps: &[Vec<Datum>],
    loss: &dyn LossFunction,
) -> (Vec<f64>, LoraWeights) {
    let w = LoraWeights::init(cfg, &model.config, &Device::Cpu).unwrap();
    let mut a = TrainableAdapter::new(w);
    let mut losses = Vec::new();
    let lc = LossConfig::new();
    for d in steps {
        let (r, g) = forward_backward(
            model,
            &[&a.weights],
            &[Work {
                adapter: Some(0),
                data: &check_data(model, d.clone()).unwrap(),
                loss,
                config: &lc,
            }],
            false,
        )
        .unwrap();
        losses.push(r.into_iter().next().unwrap().unwrap().loss);
        a.accumulate(g.into_iter().next().unwrap()).unwrap();
        a.optim_step(&adam()).unwrap();
    }
    (losses, a.weights)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_model_loads_once_however_many_callers_race() {
    let loads = Arc::new(AtomicUsize::new(0));
    let l = loads.clone();
    let loader: ModelLoader = Arc::new(move || {
        l.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        Ok(Arc::new(tiny(DType::F32)))
    });
    let e = Engine::start(EngineConfig::default(), loader).unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move {
                let t = TenantId::from(format!("t{i}").as_str());
                e.create_model(&t, lora(i)).await.unwrap();
                e.base_model().await.unwrap()
            })
        })
        .collect();
    let mut models = Vec::new();
    for t in tasks {
        models.push(t.await.unwrap());
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(e.registry().load_count(), 1);
    assert!(models.iter().all(|m| Arc::ptr_eq(m, &models[0])));
    assert_eq!(e.registry().num_adapters(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_training_at_once_equal_each_run_alone() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let v = m.config.vocab_size;
    let n = 4;
    let mut rng = SplitMix64::new(11);
    // Tenant i: 3 steps of 1 + i rows, different lengths per tenant.
    let plans: Vec<Vec<Vec<Datum>>> = (0..n)
        .map(|i| {
            (0..3)
                .map(|_| data(&mut rng, 1 + i, 6 + 2 * i, v))
                .collect()
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, plan) in plans.iter().cloned().enumerate() {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let t = TenantId::from(format!("tenant{i}").as_str());
            let id = e.create_model(&t, lora(100 + i as u64)).await.unwrap();
            let mut losses = Vec::new();
            let mut seq = 0;
            for d in plan {
                // Pipelined like a Tinker client: both requests before waiting.
                let f1 = e.submit(&t, &id, Some(seq), fb(d, ce())).await.unwrap();
                let f2 = e
                    .submit(&t, &id, Some(seq + 1), Op::OptimStep(adam()))
                    .await
                    .unwrap();
                seq += 2;
                losses.push(fb_loss(&e.result(&t, &f1, T).await.unwrap()));
                e.result(&t, &f2, T).await.unwrap();
            }
            let w = e
                .registry()
                .adapter(&t, &id)
                .unwrap()
                .weights()
                .expect("resident");
            (losses, w)
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let (losses, w) = task.await.unwrap();
        let (ref_losses, ref_w) = alone(
            &m,
            &lora(100 + i as u64),
            &plans[i],
            &BuiltinLoss::CrossEntropy,
        );
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "tenant {i}: loss {a} vs alone {b}"
            );
        }
        let d = max_abs_diff(&weights_of(&w), &weights_of(&ref_w));
        assert!(
            d < 1e-5,
            "tenant {i}: weights differ from running alone by {d}"
        );
    }
    let metrics = e.tenant_metrics(&TenantId::from("tenant3"));
    assert_eq!(metrics.done, 6);
    assert_eq!(metrics.queued + metrics.running, 0);
    assert_eq!(metrics.train_tokens, 3 * 4 * 12);
}

/// Records each call's tag, in call order, and computes cross-entropy.
struct Recording {
    tag: &'static str,
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl LossFunction for Recording {
    fn compute(&self, data: &[LossDatum], config: &LossConfig) -> loraplex::Result<LossOutput> {
        self.log.lock().unwrap().push(self.tag);
        BuiltinLoss::CrossEntropy.compute(data, config)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_requests_run_in_seq_order_and_duplicates_run_once() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("alice");
    let id = e.create_model(&t, lora(1)).await.unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut rng = SplitMix64::new(5);
    let d: Vec<Vec<Datum>> = (0..3)
        .map(|_| data(&mut rng, 1, 8, m.config.vocab_size))
        .collect();
    let rec = |tag| -> Arc<dyn LossFunction> {
        Arc::new(Recording {
            tag,
            log: log.clone(),
        })
    };
    // seq: 0 fb(a), 1 step, 2 fb(b), 3 step, 4 fb(c); submitted last to first.
    let ops = [
        fb(d[0].clone(), rec("a")),
        Op::OptimStep(adam()),
        fb(d[1].clone(), rec("b")),
        Op::OptimStep(adam()),
        fb(d[2].clone(), rec("c")),
    ];
    let mut futs = vec![None; 5];
    for (seq, op) in ops.into_iter().enumerate().rev() {
        futs[seq] = Some(e.submit(&t, &id, Some(seq as u64), op).await.unwrap());
        if seq == 2 {
            // A retry of seq 2 before it ran: the same future, run once.
            let again = e
                .submit(&t, &id, Some(2), fb(d[1].clone(), rec("b")))
                .await
                .unwrap();
            assert_eq!(Some(again), futs[2]);
        }
    }
    let futs: Vec<FutureId> = futs.into_iter().flatten().collect();
    let mut losses = Vec::new();
    for (seq, f) in futs.iter().enumerate() {
        let out = e.result(&t, f, T).await.unwrap();
        match (&*out, seq) {
            (JobOutput::OptimStep(r), 1) => assert_eq!(r.step, 1),
            (JobOutput::OptimStep(r), 3) => assert_eq!(r.step, 2),
            (o, _) => losses.push(fb_loss(o)),
        }
    }
    assert_eq!(*log.lock().unwrap(), vec!["a", "b", "c"]);
    // A retry after it ran still returns the first future.
    let again = e
        .submit(&t, &id, Some(2), fb(d[1].clone(), rec("b")))
        .await
        .unwrap();
    assert_eq!(again, futs[2]);
    assert_eq!(log.lock().unwrap().len(), 3);
    // Same numbers as the steps in order: fb a, step, fb b, step, fb c (no final step).
    let (ref_losses, _) = alone(&m, &lora(1), &d, &BuiltinLoss::CrossEntropy);
    for (a, b) in losses.iter().zip(&ref_losses) {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_seq_id_holds_back_only_its_model_then_fails_its_work() {
    let m = model();
    let cfg = EngineConfig {
        seq_timeout_ms: 400,
        ..Default::default()
    };
    let e = engine(&m, cfg);
    let (ta, tb) = (TenantId::from("a"), TenantId::from("b"));
    let a = e.create_model(&ta, lora(1)).await.unwrap();
    let b = e.create_model(&tb, lora(2)).await.unwrap();
    let mut rng = SplitMix64::new(3);
    let v = m.config.vocab_size;
    // Model a never gets seq 0.
    let fa = e
        .submit(&ta, &a, Some(1), fb(data(&mut rng, 1, 8, v), ce()))
        .await
        .unwrap();
    let fb_ = e
        .submit(&tb, &b, Some(0), fb(data(&mut rng, 1, 8, v), ce()))
        .await
        .unwrap();
    let rb = e.wait(&tb, &fb_, T).await.unwrap();
    assert_eq!(rb.state, JobState::Done);
    assert_eq!(e.future(&ta, &fa).unwrap().state, JobState::Pending);
    let ra = e.wait(&ta, &fa, T).await.unwrap();
    assert_eq!(ra.state, JobState::Failed);
    let f = ra.failure.unwrap();
    assert_eq!(f.category, Category::User);
    assert!(f.message.contains("seq_id 0"), "{}", f.message);
    // The model carries on after the failed work.
    let f2 = e
        .submit(&ta, &a, Some(2), fb(data(&mut rng, 1, 8, v), ce()))
        .await
        .unwrap();
    assert_eq!(e.wait(&ta, &f2, T).await.unwrap().state, JobState::Done);
}

struct Panics;
impl LossFunction for Panics {
    fn compute(&self, _: &[LossDatum], _: &LossConfig) -> loraplex::Result<LossOutput> {
        panic!("hostile plugin")
    }
}

struct WrongShape;
impl LossFunction for WrongShape {
    fn compute(&self, _: &[LossDatum], _: &LossConfig) -> loraplex::Result<LossOutput> {
        Ok(LossOutput {
            loss: f64::NAN,
            grads: vec![],
            metrics: Default::default(),
            elementwise: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_fails_alone() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let v = m.config.vocab_size;
    let mut rng = SplitMix64::new(9);
    let good_data = data(&mut rng, 2, 8, v);
    let ts: Vec<TenantId> = ["good", "panics", "wrong", "badinput"]
        .iter()
        .map(|s| TenantId::from(*s))
        .collect();
    let mut ids = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        ids.push(e.create_model(t, lora(i as u64)).await.unwrap());
    }
    // Hold every model back on seq 0 so all their work lands in one batch.
    let good = e
        .submit(&ts[0], &ids[0], Some(1), fb(good_data.clone(), ce()))
        .await
        .unwrap();
    let p = e
        .submit(
            &ts[1],
            &ids[1],
            Some(1),
            fb(data(&mut rng, 1, 8, v), Arc::new(Panics)),
        )
        .await
        .unwrap();
    let w = e
        .submit(
            &ts[2],
            &ids[2],
            Some(1),
            fb(data(&mut rng, 1, 8, v), Arc::new(WrongShape)),
        )
        .await
        .unwrap();
    // Bad input without a seq_id is refused at the door, naming the field; with one it
    // keeps its place in the model's order and fails there, and later work still runs.
    let mut bad = data(&mut rng, 1, 8, v);
    bad[0].model_input[3] = v as u32 + 5;
    match e.submit(&ts[3], &ids[3], None, fb(bad.clone(), ce())).await {
        Err(Error::InvalidInput { field, .. }) => assert!(field.contains("model_input"), "{field}"),
        r => panic!("expected invalid input, got {r:?}"),
    }
    let refused = e
        .submit(&ts[3], &ids[3], Some(0), fb(bad, ce()))
        .await
        .unwrap();
    let after = e
        .submit(&ts[3], &ids[3], Some(1), fb(data(&mut rng, 1, 8, v), ce()))
        .await
        .unwrap();
    match e.result(&ts[3], &refused, T).await {
        Err(Error::JobFailed { message, category }) => {
            assert!(message.contains("model_input"), "{message}");
            assert_eq!(category, loraplex::error::Category::User);
        }
        r => panic!("expected a refused job, got {r:?}"),
    }
    e.result(&ts[3], &after, T)
        .await
        .expect("work after a refused seq_id runs");
    for i in 0..3 {
        e.submit(
            &ts[i],
            &ids[i],
            Some(0),
            Op::SaveState {
                name: "s".into(),
                ttl: None,
                user_metadata: None,
            },
        )
        .await
        .unwrap();
    }
    let r = e.result(&ts[0], &good, T).await.unwrap();
    for (t, f) in [(&ts[1], &p), (&ts[2], &w)] {
        let rec = e.wait(t, f, T).await.unwrap();
        assert_eq!(rec.state, JobState::Failed);
        assert_eq!(rec.failure.unwrap().category, Category::User);
    }
    // The good request's result equals running it alone.
    let lc = LossConfig::new();
    let wts = LoraWeights::init(&lora(0), &m.config, &Device::Cpu).unwrap();
    let (alone_r, _) = forward_backward(
        &m,
        &[&wts],
        &[Work {
            adapter: Some(0),
            data: &check_data(&m, good_data).unwrap(),
            loss: &BuiltinLoss::CrossEntropy,
            config: &lc,
        }],
        false,
    )
    .unwrap();
    let alone_loss = alone_r[0].as_ref().unwrap().loss;
    assert!(
        (fb_loss(&r) - alone_loss).abs() < 1e-5,
        "{} vs {alone_loss}",
        fb_loss(&r)
    );
    // The failed models got no gradient: a step leaves their weights unchanged.
    let before = weights_of(
        &e.registry()
            .adapter(&ts[1], &ids[1])
            .unwrap()
            .weights()
            .expect("resident"),
    );
    let s = e
        .submit(&ts[1], &ids[1], Some(2), Op::OptimStep(adam()))
        .await
        .unwrap();
    e.result(&ts[1], &s, T).await.unwrap();
    let after = weights_of(
        &e.registry()
            .adapter(&ts[1], &ids[1])
            .unwrap()
            .weights()
            .expect("resident"),
    );
    assert_eq!(max_abs_diff(&before, &after), 0.0);
    assert_eq!(e.tenant_metrics(&ts[1]).failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_request_is_split_and_does_not_starve_others() {
    let m = model();
    let cfg = EngineConfig {
        max_batch_tokens: 32,
        ..Default::default()
    };
    let e = engine(&m, cfg);
    let v = m.config.vocab_size;
    let (tbig, tsmall) = (TenantId::from("big"), TenantId::from("small"));
    let big = e.create_model(&tbig, lora(1)).await.unwrap();
    let small = e.create_model(&tsmall, lora(2)).await.unwrap();
    let mut rng = SplitMix64::new(21);
    let big_data = data(&mut rng, 40, 8, v); // 320 tokens, 10+ batches
    let small_data = data(&mut rng, 1, 8, v);
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = |tag| -> Arc<dyn LossFunction> {
        Arc::new(Recording {
            tag,
            log: log.clone(),
        })
    };
    let fbig = e
        .submit(&tbig, &big, Some(0), fb(big_data.clone(), rec("big")))
        .await
        .unwrap();
    let fsmall = e
        .submit(&tsmall, &small, Some(0), fb(small_data, rec("small")))
        .await
        .unwrap();
    let rbig = e.result(&tbig, &fbig, T).await.unwrap();
    e.result(&tsmall, &fsmall, T).await.unwrap();
    let log = log.lock().unwrap().clone();
    let pieces = log.iter().filter(|t| **t == "big").count();
    assert!(pieces >= 8, "the big request ran in {pieces} pieces");
    let small_at = log.iter().position(|t| *t == "small").unwrap();
    assert!(
        small_at < 3,
        "the small request waited behind the big one: {log:?}"
    );
    // Pieces add up to the whole request run at once.
    let lc = LossConfig::new();
    let w = LoraWeights::init(&lora(1), &m.config, &Device::Cpu).unwrap();
    let (whole, grads) = forward_backward(
        &m,
        &[&w],
        &[Work {
            adapter: Some(0),
            data: &check_data(&m, big_data).unwrap(),
            loss: &BuiltinLoss::CrossEntropy,
            config: &lc,
        }],
        false,
    )
    .unwrap();
    let whole = whole.into_iter().next().unwrap().unwrap();
    let JobOutput::ForwardBackward(r) = &*rbig else {
        panic!()
    };
    assert!((r.loss - whole.loss).abs() < 1e-4 * whole.loss.abs());
    assert_eq!(r.logprobs.len(), 40);
    assert!(max_abs_diff(&r.logprobs.concat(), &whole.logprobs.concat()) < 1e-5);
    assert_eq!(e.future(&tbig, &fbig).unwrap().progress.tokens_done, 320);
    // The accumulated gradient is the whole request's: one step gives the same weights.
    let mut a = TrainableAdapter::new(w);
    a.accumulate(grads.into_iter().next().unwrap()).unwrap();
    a.optim_step(&adam()).unwrap();
    let s = e
        .submit(&tbig, &big, Some(1), Op::OptimStep(adam()))
        .await
        .unwrap();
    e.result(&tbig, &s, T).await.unwrap();
    let got = e
        .registry()
        .adapter(&tbig, &big)
        .unwrap()
        .weights()
        .expect("resident");
    assert!(max_abs_diff(&weights_of(&got), &weights_of(&a.weights)) < 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_refuse_work_as_busy() {
    let m = model();
    let cfg = EngineConfig {
        max_queued_per_model: 2,
        retry_after_ms: 250,
        ..Default::default()
    };
    let e = engine(&m, cfg);
    let t = TenantId::from("t");
    let id = e.create_model(&t, lora(1)).await.unwrap();
    // seq 0 missing: these stay queued.
    e.submit(&t, &id, Some(1), Op::OptimStep(adam()))
        .await
        .unwrap();
    e.submit(&t, &id, Some(2), Op::OptimStep(adam()))
        .await
        .unwrap();
    let err = e
        .submit(&t, &id, Some(3), Op::OptimStep(adam()))
        .await
        .unwrap_err();
    assert_eq!(err.retry_after_ms(), Some(250), "{err}");
    assert_eq!(err.category(), Category::User);
    // Another model is not affected.
    let other = e.create_model(&t, lora(2)).await.unwrap();
    let f = e
        .submit(&t, &other, Some(0), Op::OptimStep(adam()))
        .await
        .unwrap();
    e.result(&t, &f, T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_see_each_others_ids_and_delete_is_isolated() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let (a, b) = (TenantId::from("a"), TenantId::from("b"));
    let ma = e.create_model(&a, lora(1)).await.unwrap();
    let mb = e.create_model(&b, lora(2)).await.unwrap();
    let f = e
        .submit(&a, &ma, None, Op::OptimStep(adam()))
        .await
        .unwrap();
    assert!(matches!(e.future(&b, &f), Err(Error::NotFound { .. })));
    assert!(matches!(
        e.submit(&b, &ma, None, Op::OptimStep(adam())).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        e.delete_model(&b, &ma).await,
        Err(Error::NotFound { .. })
    ));
    e.result(&a, &f, T).await.unwrap();
    // Delete a model with queued work while another model trains.
    let mut rng = SplitMix64::new(1);
    let queued = e
        .submit(&a, &ma, Some(10), Op::OptimStep(adam()))
        .await
        .unwrap();
    let fbb = e
        .submit(
            &b,
            &mb,
            None,
            fb(data(&mut rng, 2, 8, m.config.vocab_size), ce()),
        )
        .await
        .unwrap();
    e.delete_model(&a, &ma).await.unwrap();
    let r = e.wait(&a, &queued, T).await.unwrap();
    assert_eq!(r.state, JobState::Failed);
    assert!(matches!(
        e.submit(&a, &ma, None, Op::OptimStep(adam())).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(e.wait(&b, &fbb, T).await.unwrap().state, JobState::Done);
}

fn sample_out(o: &JobOutput) -> &SampleOutput {
    match o {
        JobOutput::Sample(s) => s,
        o => panic!("not a sample: {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_matches_the_plain_loop() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let params = SamplingParams {
        max_tokens: 12,
        temperature: 1.0,
        top_k: 20,
        seed: Some(42),
        ..Default::default()
    };
    let mut req = SampleRequest::new(vec![1, 2, 3, 4], params.clone());
    req.num_samples = 3;
    req.top_logprobs = 2;
    req.prompt_logprobs = true;
    req.prompt_top_logprobs = 3;
    let f1 = e.sample(&t, &s, req.clone()).await.unwrap();
    let f2 = e.sample(&t, &s, req.clone()).await.unwrap();
    let o1 = e.result(&t, &f1, T).await.unwrap();
    let o2 = e.result(&t, &f2, T).await.unwrap();
    let (a, b) = (sample_out(&o1), sample_out(&o2));
    assert_eq!(a.sequences.len(), 3);
    for (x, y) in a.sequences.iter().zip(&b.sequences) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.tokens.len(), 12);
        assert_eq!(x.top_logprobs.len(), 12);
        assert!(x.top_logprobs[0][0].1 >= x.top_logprobs[0][1].1);
    }
    assert_ne!(
        a.sequences[0].tokens, a.sequences[1].tokens,
        "samples should differ"
    );
    let plp = a.prompt_logprobs.as_ref().unwrap();
    assert_eq!(plp.len(), 3);
    let top = a.prompt_top_logprobs.as_ref().unwrap();
    assert_eq!(top.len(), 3);
    for (j, t) in top.iter().enumerate() {
        assert_eq!(t.len(), 3);
        assert!(t[0].1 >= t[1].1 && t[1].1 >= t[2].1);
        // The best token is at least as likely as the actual prompt token...
        assert!(t[0].1 >= plp[j] - 1e-5);
        // ...and where the actual token is listed, its logprob agrees.
        if let Some(&(_, lp)) = t.iter().find(|(id, _)| *id == [1u32, 2, 3, 4][j + 1]) {
            assert!((lp - plp[j]).abs() < 1e-4, "{lp} vs {}", plp[j]);
        }
    }
    // Sequence 0 uses the seed itself: the same as the plain generation loop.
    let plain = loraplex::sample::generate(
        &m,
        &[],
        &[loraplex::sample::GenerateRequest {
            prompt: &[1, 2, 3, 4],
            adapter: None,
            params,
            ..Default::default()
        }],
    )
    .unwrap();
    assert_eq!(a.sequences[0].tokens, plain[0].tokens);
}

/// A 64-token vocabulary of single characters, so stop strings can be tested on the tiny model.
fn tiny_with_tokenizer() -> Arc<BaseModel> {
    let mut m = tiny(DType::F32);
    let chars: Vec<String> = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,"
        .chars()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(chars.len(), m.config.vocab_size);
    let src = loraplex::model::weights::TokenizerSource {
        gguf_tokens: Some(chars),
        gguf_merges: Some(vec![]),
        ..Default::default()
    };
    m.tokenizer = Some(loraplex::model::TextTokenizer::from_source(&src).unwrap());
    Arc::new(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_tokens_and_stop_strings_end_sequences() {
    let m = tiny_with_tokenizer();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let greedy = SamplingParams {
        max_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    let prompt = vec![5, 9, 13];
    let run = |params: SamplingParams, stops: Vec<String>| {
        let e = e.clone();
        let (t, s, prompt) = (t.clone(), s.clone(), prompt.clone());
        async move {
            let mut r = SampleRequest::new(prompt, params);
            r.stop_strings = stops;
            let f = e.sample(&t, &s, r).await.unwrap();
            sample_out(&e.result(&t, &f, T).await.unwrap()).sequences[0].clone()
        }
    };
    let full = run(greedy.clone(), vec![]).await;
    assert_eq!(full.tokens.len(), 16);
    assert_eq!(full.stop_reason, StopReason::Length);
    // Stop token: the first occurrence of the 5th token ends the sequence, included.
    let stop = full.tokens[4];
    let first = full.tokens.iter().position(|&x| x == stop).unwrap();
    let got = run(
        SamplingParams {
            stop_tokens: vec![stop],
            ..greedy.clone()
        },
        vec![],
    )
    .await;
    assert_eq!(got.tokens, full.tokens[..=first]);
    assert_eq!(got.stop_reason, StopReason::Stop);
    // Stop string: two characters the model writes at tokens 6 and 7.
    let tk = m.tokenizer().unwrap();
    let text = tk.decode(&full.tokens, false).unwrap();
    assert_eq!(text.len(), 16);
    let stop_s = text[6..8].to_string();
    let end = (1..=16)
        .find(|&n| {
            tk.decode(&full.tokens[..n], false)
                .unwrap()
                .contains(&stop_s)
        })
        .unwrap();
    let got = run(greedy.clone(), vec![stop_s.clone()]).await;
    assert_eq!(
        got.tokens,
        full.tokens[..end],
        "stop string {stop_s:?} in {text:?}"
    );
    assert_eq!(got.stop_reason, StopReason::Stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_runs_the_engines_decode_step_stop_strings_included() {
    use loraplex::sample::{generate, GenerateRequest};
    let m = tiny_with_tokenizer();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let prompt = vec![5, 9, 13];
    let engine_run = |params: SamplingParams, stops: Vec<String>| {
        let e = e.clone();
        let (t, s, prompt) = (t.clone(), s.clone(), prompt.clone());
        async move {
            let mut r = SampleRequest::new(prompt, params);
            r.stop_strings = stops;
            let f = e.sample(&t, &s, r).await.unwrap();
            sample_out(&e.result(&t, &f, T).await.unwrap()).sequences[0].clone()
        }
    };
    let gen = |params: &SamplingParams, stops: &[String]| GenerateRequest {
        prompt: &prompt,
        adapter: None,
        params: params.clone(),
        stop_strings: stops.to_vec(),
    };
    let greedy = SamplingParams {
        max_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    let seeded = SamplingParams {
        max_tokens: 16,
        temperature: 1.0,
        seed: Some(11),
        ..Default::default()
    };
    // The same sequence (the engine's may have batched or cached its prompt differently,
    // so logprobs agree to rounding).
    let same = |a: &SampledSeq, b: &SampledSeq| {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.stop_reason, b.stop_reason);
        assert!(
            max_abs_diff(&a.logprobs, &b.logprobs) < 1e-5,
            "{a:?} vs {b:?}"
        );
    };
    // Without stops: what the engine samples, greedy or seeded.
    let full = engine_run(greedy.clone(), vec![]).await;
    assert_eq!(full.tokens.len(), 16);
    let drawn = engine_run(seeded.clone(), vec![]).await;
    let out = generate(&m, &[], &[gen(&greedy, &[]), gen(&seeded, &[])]).unwrap();
    same(&out[0], &full);
    same(&out[1], &drawn);
    // A stop string the greedy output writes at tokens 6 and 7 ends it at the token that
    // completes it, as in the engine; the other sequence of the batch runs on.
    let tk = m.tokenizer().unwrap();
    let text = tk.decode(&full.tokens, false).unwrap();
    let stop = text[6..8].to_string();
    let end = (1..=16)
        .find(|&n| tk.decode(&full.tokens[..n], false).unwrap().contains(&stop))
        .unwrap();
    let stops = [stop.clone()];
    let out = generate(&m, &[], &[gen(&seeded, &[]), gen(&greedy, &stops)]).unwrap();
    assert_eq!(out[1].tokens, full.tokens[..end], "{stop:?} in {text:?}");
    assert_eq!(out[1].stop_reason, StopReason::Stop);
    same(&out[1], &engine_run(greedy.clone(), vec![stop]).await);
    same(&out[0], &drawn);
    // Stop strings need a tokenizer.
    let bare = model();
    let err = generate(&bare, &[], &[gen(&greedy, &stops)]).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_of_many_adapters_decode_together_as_they_would_alone() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let mut sessions = vec![e.base_sampling_session(&t).await.unwrap()];
    for i in 0..3 {
        let id = e.create_model(&t, lora(i)).await.unwrap();
        // Give each adapter a non-zero B with a few steps so it changes outputs.
        let mut rng = SplitMix64::new(i);
        for k in 0..2 {
            e.submit(
                &t,
                &id,
                Some(2 * k),
                fb(data(&mut rng, 1, 8, m.config.vocab_size), ce()),
            )
            .await
            .unwrap();
            e.submit(&t, &id, Some(2 * k + 1), Op::OptimStep(adam()))
                .await
                .unwrap();
        }
        sessions.push(e.sampling_session(&t, &id, Some(4), T).await.unwrap());
    }
    let req = |i: usize| {
        SampleRequest::new(
            vec![1, 7, 3],
            SamplingParams {
                max_tokens: 4 + 3 * i,
                temperature: 0.0,
                ..Default::default()
            },
        )
    };
    // Alone, one after another.
    let mut solo = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let f = e.sample(&t, s, req(i)).await.unwrap();
        solo.push(
            sample_out(&e.result(&t, &f, T).await.unwrap()).sequences[0]
                .tokens
                .clone(),
        );
    }
    // All at once: they join and leave the decode batch at different steps.
    let mut futs = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        futs.push(e.sample(&t, s, req(i)).await.unwrap());
    }
    for (i, f) in futs.iter().enumerate() {
        let got = sample_out(&e.result(&t, f, T).await.unwrap()).sequences[0]
            .tokens
            .clone();
        assert_eq!(got.len(), 4 + 3 * i);
        assert_eq!(got, solo[i], "session {i}");
    }
    assert!(
        solo[1..].iter().any(|s| s[..4] != solo[0][..4]),
        "trained adapters should change some output: {solo:?}"
    );
}

/// A sampler plugin that always picks one token.
struct Always(u32);
impl TokenSampler for Always {
    fn start(
        &self,
        _: &[u32],
        _: &SamplingParams,
        _: usize,
    ) -> loraplex::Result<Box<dyn SequenceSampler>> {
        Ok(Box::new(AlwaysSeq(self.0)))
    }
}
struct AlwaysSeq(u32);
impl SequenceSampler for AlwaysSeq {
    fn step(&mut self, _: &[f32], _: &[u32], _: &mut SplitMix64) -> loraplex::Result<Option<u32>> {
        Ok(Some(self.0))
    }
}

/// A hostile sampler plugin: panics once prompt and output pass 4 tokens.
struct Hostile;
impl TokenSampler for Hostile {
    fn start(
        &self,
        prompt: &[u32],
        _: &SamplingParams,
        _: usize,
    ) -> loraplex::Result<Box<dyn SequenceSampler>> {
        Ok(Box::new(HostileSeq(prompt.len())))
    }
}
struct HostileSeq(usize);
impl SequenceSampler for HostileSeq {
    fn step(
        &mut self,
        _: &[f32],
        generated: &[u32],
        _: &mut SplitMix64,
    ) -> loraplex::Result<Option<u32>> {
        if self.0 + generated.len() > 4 {
            panic!("hostile sampler");
        }
        Ok(Some(1))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampler_plugins_choose_tokens_and_a_hostile_one_fails_alone() {
    let m = model();
    let e = engine(&m, EngineConfig::default());
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let params = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let mut fixed = SampleRequest::new(vec![1, 2, 3], params.clone());
    fixed.sampler = Some(Arc::new(Always(7)));
    let mut hostile = SampleRequest::new(vec![1, 2, 3], params.clone());
    hostile.sampler = Some(Arc::new(Hostile));
    let mut out_of_range = SampleRequest::new(vec![1, 2, 3], params.clone());
    out_of_range.sampler = Some(Arc::new(Always(10_000)));
    let plain = SampleRequest::new(vec![1, 2, 3], params);
    let ff = e.sample(&t, &s, fixed).await.unwrap();
    let fh = e.sample(&t, &s, hostile).await.unwrap();
    let fo = e.sample(&t, &s, out_of_range).await.unwrap();
    let fp = e.sample(&t, &s, plain).await.unwrap();
    let got = e.result(&t, &ff, T).await.unwrap();
    let seq = &sample_out(&got).sequences[0];
    assert_eq!(seq.tokens, vec![7; 6]);
    assert!(seq.logprobs.iter().all(|lp| lp.is_finite() && *lp < 0.0));
    for f in [&fh, &fo] {
        let r = e.wait(&t, f, T).await.unwrap();
        assert_eq!(r.state, JobState::Failed);
        let fail = r.failure.unwrap();
        assert_eq!(fail.category, Category::User);
        assert!(fail.message.contains("sampler"), "{}", fail.message);
    }
    let r = e.result(&t, &fp, T).await.unwrap();
    assert_eq!(sample_out(&r).sequences[0].tokens.len(), 6);
    assert_eq!(e.tenant_metrics(&t).failed, 2);
    assert_eq!(e.tenant_metrics(&t).done, 2);
}

/// A tenant's many-sample request cannot hold the whole decode batch: with room for two
/// sequences, tenant B's single sample joins at the first free slot instead of waiting
/// behind all six of tenant A's, and so finishes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_batch_admits_tenants_fairly() {
    let m = model();
    let cfg = EngineConfig {
        max_decode_batch: 2,
        ..EngineConfig::default()
    };
    let e = engine(&m, cfg);
    let (a, b) = (TenantId::from("a"), TenantId::from("b"));
    let (sa, sb) = (
        e.base_sampling_session(&a).await.unwrap(),
        e.base_sampling_session(&b).await.unwrap(),
    );
    let params = SamplingParams {
        max_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    let mut big = SampleRequest::new(vec![1, 2, 3], params.clone());
    big.num_samples = 6;
    let fa = e.sample(&a, &sa, big).await.unwrap();
    let fb_ = e
        .sample(&b, &sb, SampleRequest::new(vec![4, 5, 6], params))
        .await
        .unwrap();
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (o1, o2) = (order.clone(), order.clone());
    let (e1, e2) = (e.clone(), e.clone());
    let ja = tokio::spawn(async move {
        e1.result(&a, &fa, T).await.unwrap();
        o1.lock().push("a");
    });
    let jb = tokio::spawn(async move {
        e2.result(&b, &fb_, T).await.unwrap();
        o2.lock().push("b");
    });
    ja.await.unwrap();
    jb.await.unwrap();
    assert_eq!(
        *order.lock(),
        vec!["b", "a"],
        "B's one sample should not wait for A's six"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_data_is_bounded_and_given_back() {
    let m = model();
    let cfg = EngineConfig {
        max_queued_bytes: 1,
        ..Default::default()
    };
    let e = engine(&m, cfg);
    let (ta, tb) = (TenantId::from("a"), TenantId::from("b"));
    let a = e.create_model(&ta, lora(1)).await.unwrap();
    let b = e.create_model(&tb, lora(2)).await.unwrap();
    let mut rng = SplitMix64::new(5);
    let v = m.config.vocab_size;
    // seq 0 has not come: seq 1 waits, holding its data.
    let f1 = e
        .submit(&ta, &a, Some(1), fb(data(&mut rng, 2, 8, v), ce()))
        .await
        .unwrap();
    let held = e.queued_bytes();
    assert!(held >= 2 * 8 * 4, "the waiting request is counted: {held}");
    // Over the budget: refused as busy (429), for any tenant, until the data is gone.
    let err = e
        .submit(&tb, &b, Some(0), fb(data(&mut rng, 1, 8, v), ce()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Busy { what, .. } if what.contains("memory")),
        "{err}"
    );
    let f0 = e
        .submit(&ta, &a, Some(0), Op::OptimStep(adam()))
        .await
        .unwrap();
    assert_eq!(e.wait(&ta, &f0, T).await.unwrap().state, JobState::Done);
    assert_eq!(e.wait(&ta, &f1, T).await.unwrap().state, JobState::Done);
    for _ in 0..100 {
        if e.queued_bytes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.queued_bytes(), 0, "given back once the jobs ran");
    let fb_ = e
        .submit(&tb, &b, Some(0), fb(data(&mut rng, 1, 8, v), ce()))
        .await
        .unwrap();
    assert_eq!(e.wait(&tb, &fb_, T).await.unwrap().state, JobState::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_kv_budget_decodes_one_sequence_at_a_time_with_the_same_results() {
    let m = model();
    let params = SamplingParams {
        max_tokens: 8,
        temperature: 1.0,
        seed: Some(7),
        ..Default::default()
    };
    let mut req = SampleRequest::new(vec![1, 2, 3, 4], params);
    req.num_samples = 4;
    let mut outs = Vec::new();
    // 12 positions a sequence: a budget of 20 admits one at a time.
    for max_kv_tokens in [262_144, 20] {
        let e = engine(
            &m,
            EngineConfig {
                max_kv_tokens,
                ..Default::default()
            },
        );
        let t = TenantId::from("t");
        let s = e.base_sampling_session(&t).await.unwrap();
        let f = e.sample(&t, &s, req.clone()).await.unwrap();
        let o = e.result(&t, &f, T).await.unwrap();
        outs.push(
            sample_out(&o)
                .sequences
                .iter()
                .map(|q| q.tokens.clone())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(outs[0].len(), 4);
    assert_eq!(outs[0], outs[1], "the budget changes when, not what");

    // A request over the per-request bound is refused, naming it.
    let e = engine(
        &m,
        EngineConfig {
            max_sample_tokens: 40,
            ..Default::default()
        },
    );
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let err = e.sample(&t, &s, req.clone()).await.unwrap_err();
    assert!(
        err.to_string().contains("LORAPLEX_MAX_SAMPLE_TOKENS") && err.to_string().contains("48"),
        "{err}"
    );
}
