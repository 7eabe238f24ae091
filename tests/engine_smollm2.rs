//! The job engine end to end on the shipped SmolLM2: two tenants train at once, then sample
//! from their snapshots with a stop string decoded by the real tokenizer.

mod common;

use common::*;
use loraplex::config::EngineConfig;
use loraplex::jobs::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::LoraConfig;
use loraplex::model::BaseModel;
use loraplex::sample::{SamplingParams, StopReason};
use loraplex::train::loss::{BuiltinLoss, LossConfig};
use loraplex::train::Datum;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_train_and_sample_with_stop_strings_on_smollm2() {
    let loader: ModelLoader = Arc::new(|| {
        Ok(Arc::new(BaseModel::load(
            &model_path(),
            loraplex::config::DEFAULT_MODEL_NAME,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )?))
    });
    let e = Engine::start(EngineConfig::default(), loader).unwrap();
    let base = e.base_model().await.unwrap();
    let tk = base.tokenizer().unwrap();
    let text = "The capital of France is Paris. The capital of Italy is Rome.";
    let toks = tk.encode(text).unwrap();
    let mut tasks = Vec::new();
    for i in 0..2u64 {
        let e = e.clone();
        let toks = toks.clone();
        tasks.push(tokio::spawn(async move {
            let t = TenantId(format!("tenant{i}"));
            let cfg = LoraConfig::from_tinker(8, i, true, true, false).unwrap();
            let id = e.create_model(&t, cfg).await.unwrap();
            let op = Op::ForwardBackward(FbRequest {
                data: vec![Datum::next_token(&toks, 0)],
                loss: Arc::new(BuiltinLoss::CrossEntropy),
                loss_config: LossConfig::new(),
            });
            let f1 = e.submit(&t, &id, Some(0), op).await.unwrap();
            let adam = AdamParams {
                learning_rate: 1e-3,
                ..Default::default()
            };
            let f2 = e
                .submit(&t, &id, Some(1), Op::OptimStep(adam))
                .await
                .unwrap();
            let JobOutput::ForwardBackward(r) = &*e.result(&t, &f1, T).await.unwrap() else {
                panic!("not a forward_backward output")
            };
            assert!(r.loss.is_finite() && r.loss > 0.0);
            e.result(&t, &f2, T).await.unwrap();
            let s = e.sampling_session(&t, &id, Some(2), T).await.unwrap();
            (t, s)
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap());
    }
    let (t, s) = &sessions[0];
    let prompt = tk.encode("The capital of France is").unwrap();
    let greedy = SamplingParams {
        max_tokens: 12,
        temperature: 0.0,
        ..Default::default()
    };
    let run = |stops: Vec<String>| {
        let mut r = SampleRequest::new(prompt.clone(), greedy.clone());
        r.stop_strings = stops;
        let e = e.clone();
        async move {
            let f = e.sample(t, s, r).await.unwrap();
            match &*e.result(t, &f, T).await.unwrap() {
                JobOutput::Sample(o) => o.sequences[0].clone(),
                o => panic!("not a sample: {o:?}"),
            }
        }
    };
    let full = run(vec![]).await;
    assert_eq!(full.tokens.len(), 12);
    let text = tk.decode(&full.tokens, false).unwrap();
    // A stop string made of the text the 4th and 5th tokens produce.
    let a = tk.decode(&full.tokens[..3], false).unwrap().len();
    let b = tk.decode(&full.tokens[..5], false).unwrap().len();
    let stop = text[a..b].to_string();
    let end = (1..=12)
        .find(|&n| tk.decode(&full.tokens[..n], false).unwrap().contains(&stop))
        .unwrap();
    let got = run(vec![stop.clone()]).await;
    assert_eq!(got.tokens, full.tokens[..end], "stop {stop:?} in {text:?}");
    assert_eq!(got.stop_reason, StopReason::Stop);
    assert_eq!(e.tenant_metrics(t).failed, 0);
}
