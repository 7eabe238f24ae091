//! Tenants' wasm plugins through the job engine: a `ppo-clip` component named in a
//! forward_backward gives the same loss as the built-in `ppo` submitted by another tenant in
//! the same batch; a wasm sampler decodes like the built-in one; hostile components fail
//! only their own request.

mod common;

use candle_core::DType;
use common::*;
use loraplex::config::EngineConfig;
use loraplex::jobs::*;
use loraplex::lora::{LoraConfig, Target};
use loraplex::plugins::{PluginHost, PluginLimits, PluginLoss};
use loraplex::train::loss::{BuiltinLoss, ConfigValue, LossConfig, LossFunction, TensorIn};
use loraplex::train::Datum;
use loraplex::util::SplitMix64;
use loraplex::Error;
use std::sync::Arc;
use std::time::Duration;

fn rl_data(rng: &mut SplitMix64, vocab: usize) -> Vec<Datum> {
    (0..2)
        .map(|_| {
            let mut d = Datum::next_token(&tokens(rng, 9, vocab), 0);
            let q: Vec<f32> = (0..8).map(|_| -(rng.uniform() as f32) * 4.0).collect();
            let a: Vec<f32> = (0..8).map(|_| rng.normal()).collect();
            d.loss_fn_inputs
                .insert("logprobs".into(), TensorIn::f32(vec![8], q));
            d.loss_fn_inputs
                .insert("advantages".into(), TensorIn::f32(vec![8], a));
            d
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_loss_trains_through_the_engine_beside_builtin_and_hostile_ones() {
    let m = Arc::new(tiny(DType::F32));
    let e = Engine::with_model(EngineConfig::default(), m.clone()).expect("engine");
    let host = PluginHost::new(PluginLimits::default(), None).expect("host");
    let load = |name: &str| PluginLoss {
        host: host.clone(),
        id: host.load(&component(name)).expect("load").0,
    };
    let (ppo, hostile) = (load("ppo-clip"), load("hostile-loss"));
    let mut rng = SplitMix64::new(17);
    let data = rl_data(&mut rng, m.config.vocab_size);
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed: 3,
        targets: Target::ALL.to_vec(),
        train_unembed: false,
    };
    let tenants = [
        TenantId::from("wasm"),
        TenantId::from("native"),
        TenantId::from("hostile"),
    ];
    let mut models = Vec::new();
    for t in &tenants {
        models.push(e.create_model(t, lora.clone()).await.unwrap());
    }
    let mut trap = LossConfig::new();
    trap.insert("mode".into(), ConfigValue::Text("panic".into()));
    let losses: [(Arc<dyn LossFunction>, LossConfig); 3] = [
        (Arc::new(ppo), LossConfig::new()),
        (Arc::new(BuiltinLoss::Ppo), LossConfig::new()),
        (Arc::new(hostile), trap),
    ];
    let mut futures = Vec::new();
    for ((t, id), (loss, cfg)) in tenants.iter().zip(&models).zip(losses) {
        let op = Op::ForwardBackward(FbRequest {
            data: data.clone(),
            loss,
            loss_config: cfg,
        });
        futures.push(e.submit(t, id, Some(0), op).await.unwrap());
    }
    let wait = Duration::from_secs(60);
    let loss_of = |o: &JobOutput| match o {
        JobOutput::ForwardBackward(r) => r.loss,
        o => panic!("not a forward_backward output: {o:?}"),
    };
    let wasm = loss_of(&e.result(&tenants[0], &futures[0], wait).await.unwrap());
    let native = loss_of(&e.result(&tenants[1], &futures[1], wait).await.unwrap());
    assert!(
        (wasm - native).abs() <= 1e-5 * (1.0 + native.abs()),
        "wasm {wasm} vs native {native}"
    );
    match e.result(&tenants[2], &futures[2], wait).await {
        Err(Error::JobFailed { message, .. }) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("the hostile plugin's request must fail: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_samplers_decode_in_the_engine_and_a_hostile_one_fails_alone() {
    use loraplex::plugins::PluginSampler;
    use loraplex::sample::SamplingParams;
    let m = Arc::new(tiny(DType::F32));
    let e = Engine::with_model(EngineConfig::default(), m.clone()).expect("engine");
    let host = PluginHost::new(PluginLimits::default(), None).expect("host");
    let sampler = |name: &str, cfg: &[(&str, ConfigValue)]| -> Arc<dyn TokenSampler> {
        Arc::new(PluginSampler {
            host: host.clone(),
            id: host.load(&component(name)).expect("load").0,
            config: cfg
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        })
    };
    let t = TenantId::from("t");
    let s = e.base_sampling_session(&t).await.unwrap();
    let params = SamplingParams {
        max_tokens: 8,
        temperature: 0.0,
        ..Default::default()
    };
    let prompt = vec![3, 1, 4, 1, 5];
    let plain = SampleRequest::new(prompt.clone(), params.clone());
    let mut greedy = SampleRequest::new(prompt.clone(), params.clone());
    greedy.sampler = Some(sampler(
        "min-p",
        &[("temperature", ConfigValue::Number(0.0))],
    ));
    let mut hostile = SampleRequest::new(prompt.clone(), params.clone());
    hostile.sampler = Some(sampler(
        "hostile-sampler",
        &[("mode", ConfigValue::Text("panic".into()))],
    ));
    let mut early = SampleRequest::new(prompt, params);
    early.sampler = Some(sampler(
        "min-p",
        &[
            ("temperature", ConfigValue::Number(0.0)),
            ("max_tokens", ConfigValue::Number(3.0)),
        ],
    ));
    let fp = e.sample(&t, &s, plain).await.unwrap();
    let fg = e.sample(&t, &s, greedy).await.unwrap();
    let fh = e.sample(&t, &s, hostile).await.unwrap();
    let fe = e.sample(&t, &s, early).await.unwrap();
    let wait = Duration::from_secs(60);
    let seq = |o: &JobOutput| match o {
        JobOutput::Sample(s) => s.sequences[0].clone(),
        o => panic!("not a sample output: {o:?}"),
    };
    let native = seq(&e.result(&t, &fp, wait).await.unwrap());
    let wasm = seq(&e.result(&t, &fg, wait).await.unwrap());
    assert_eq!(
        wasm.tokens, native.tokens,
        "wasm greedy equals the built-in greedy"
    );
    assert_eq!(wasm.logprobs, native.logprobs);
    let cut = seq(&e.result(&t, &fe, wait).await.unwrap());
    assert_eq!(
        cut.tokens,
        native.tokens[..3],
        "the plugin's own stop ends the sequence"
    );
    assert_eq!(cut.stop_reason, loraplex::sample::StopReason::Stop);
    match e.result(&t, &fh, wait).await {
        Err(Error::JobFailed { message, .. }) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("the hostile sampler's request must fail: {other:?}"),
    }
}
