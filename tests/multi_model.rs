//! Several base models in one server. Two tiny random models of different shapes (base
//! "tiny-a": 2 layers, width 16, 64 tokens, untied head; base "tiny-b": 3 layers, width 32,
//! 48 tokens, tied head), each with a one-character-per-token tokenizer, are written as
//! Hugging Face directories and served together, as `loraplex serve --model NAME=PATH`
//! builds them:
//! - capabilities, health and `/metrics` list both (weights' bytes checked against the
//!   size their configs imply);
//! - runs and sampling sessions pick their base by name, and an unknown name is a 400
//!   that names it and lists the served ones;
//! - each run's logprobs, each sampling session's greedy tokens and token-id checks are
//!   those of its own base (checked against the library on that base alone);
//! - a checkpoint loads only into a run of its own base;
//! - work on both bases submitted together never shares a batch (it would not even run);
//! - a restart brings each run back on its own base, and a run whose base is no longer
//!   served stays a record, listed with its base.
//!
//! One model, served as before (`--model-path`, `--model-name`), and the official SDK
//! training an adapter on each of two bases of a real `loraplex serve`, are here too.

mod common;

use axum::Router;
use candle_core::{DType, Device};
use common::http::{f32_tensor, Resp};
use common::http::{fb_result, get, i64_tensor, post, retrieve, send_fb, text_datum, A};
use loraplex::api::proto;
use loraplex::api::Shared;
use loraplex::config::{BaseDtype, EngineConfig, ModelArgs, ModelSpec, ServeConfig, ServedModels};
use loraplex::jobs::{AdapterId, Engine, FbRequest, JobOutput, Op, TenantId};
use loraplex::lora::LoraConfig;
use loraplex::model::weights::TokenizerSource;
use loraplex::model::{BaseModel, LlamaConfig, TextTokenizer};
use loraplex::sample::{generate, GenerateRequest, SamplingParams};
use loraplex::train::loss::BuiltinLoss;
use loraplex::train::{check_data, forward_backward, Datum, Work};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const NAME_A: &str = "tiny-a";
const NAME_B: &str = "tiny-b";
const CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,";
/// Token ids valid on both bases (B has 48).
const SEQ: [i32; 10] = [3, 17, 40, 5, 22, 9, 31, 12, 44, 7];

fn config_a() -> LlamaConfig {
    LlamaConfig::tiny()
}

fn config_b() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 48,
        hidden_size: 32,
        intermediate_size: 40,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 8,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        ..LlamaConfig::tiny()
    }
}

/// A random model with a tokenizer of one character per token id.
fn with_chars(config: LlamaConfig, seed: u64) -> BaseModel {
    let mut m = BaseModel::random(config, seed, DType::F32).expect("random model");
    let chars: Vec<String> = CHARS
        .chars()
        .take(m.config.vocab_size)
        .map(String::from)
        .collect();
    assert_eq!(chars.len(), m.config.vocab_size);
    let src = TokenizerSource {
        gguf_tokens: Some(chars),
        gguf_merges: Some(vec![]),
        ..Default::default()
    };
    m.tokenizer = Some(TextTokenizer::from_source(&src).expect("tokenizer"));
    m
}

/// Both bases as Hugging Face directories, written once per test binary.
fn base_dirs() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("loraplex-bases-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        with_chars(config_a(), 7).save_hf_dir(&a).expect("save a");
        with_chars(config_b(), 11).save_hf_dir(&b).expect("save b");
        (a, b)
    })
}

/// A base as the server loads it (from its directory), for reference values.
fn load(name: &str) -> BaseModel {
    let (a, b) = base_dirs();
    let dir = if name == NAME_A { a } else { b };
    BaseModel::load(dir, name, &Device::Cpu, DType::F32).expect("load base")
}

fn both() -> Vec<ModelSpec> {
    let (a, b) = base_dirs();
    vec![
        ModelSpec {
            name: NAME_A.into(),
            path: a.clone(),
            base_dtype: None,
        },
        ModelSpec {
            name: NAME_B.into(),
            path: b.clone(),
            base_dtype: None,
        },
    ]
}

/// f32 bytes of a Llama model's weights, from its config alone.
fn expected_weight_bytes(c: &LlamaConfig) -> usize {
    let (v, h, i) = (c.vocab_size, c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let layer = h + (q + 2 * kv) * h + h * q + h + 2 * i * h + h * i;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    4 * (v * h + c.num_layers * layer + h + head)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "loraplex-multi-{tag}-{}-{}",
        std::process::id(),
        loraplex::jobs::FutureId::generate()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A server on a data directory, built as `loraplex serve` builds it, on a runtime of its
/// own so that it can be dropped and built again (a restart).
struct Server {
    rt: tokio::runtime::Runtime,
    app: Router,
    state: Shared,
}

fn server(data: &Path, models: impl Into<ServedModels>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = ServeConfig::for_tests(data.to_owned());
    cfg.long_poll_ms = 2_000;
    let (state, app) = rt
        .block_on(loraplex::api::build(cfg, models, EngineConfig::default()))
        .expect("build");
    Server { rt, app, state }
}

fn ce_datum(tokens: &[i32]) -> proto::Datum {
    let n = tokens.len() - 1;
    let targets: Vec<i64> = tokens[1..].iter().map(|&t| t as i64).collect();
    text_datum(
        &tokens[..n],
        &[
            ("target_tokens", i64_tensor(&targets)),
            ("weights", f32_tensor(&vec![1.0; n])),
        ],
    )
}

fn fb_req(model: &str, seq: i32, tokens: &[i32]) -> proto::ForwardBackwardRequest {
    proto::ForwardBackwardRequest {
        model_id: model.into(),
        seq_id: seq,
        data: vec![ce_datum(tokens)],
        loss_fn: "cross_entropy".into(),
        forward_only: false,
        ..Default::default()
    }
}

fn logprobs(o: &proto::ForwardBackwardOutput) -> Vec<f32> {
    proto::read_f32("logprobs", &o.loss_fn_outputs[0].fields["logprobs"].data).expect("logprobs")
}

/// Target logprobs of `tokens` under `model` alone: what a run with a fresh adapter
/// (B = 0) on that base computes.
fn reference_logprobs(model: &BaseModel, tokens: &[i32]) -> Vec<f32> {
    let t: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let data = check_data(model, vec![Datum::next_token(&t, 1)]).expect("data");
    let cfg = Default::default();
    let work = [Work {
        adapter: None,
        data: &data,
        loss: &BuiltinLoss::CrossEntropy,
        config: &cfg,
    }];
    let (mut r, _) = forward_backward(model, &[], &work, true).expect("forward");
    r.remove(0).expect("result").logprobs.remove(0)
}

/// Greedy tokens of `prompt` under `model` alone.
fn reference_greedy(model: &BaseModel, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let params = SamplingParams {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    generate(
        model,
        &[],
        &[GenerateRequest {
            prompt,
            adapter: None,
            params,
            ..Default::default()
        }],
    )
    .expect("generate")
    .remove(0)
    .tokens
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "{what}: max |diff| {d}: {a:?} vs {b:?}");
}

async fn session(app: &Router) -> String {
    post(
        app,
        "/api/v1/create_session",
        A,
        json!({"tags": [], "sdk_version": "0.38.0", "type": "create_session"}),
    )
    .await
    .ok()["session_id"]
        .as_str()
        .expect("session id")
        .to_owned()
}

/// A Tinker run on `base`; its id.
async fn create_run(app: &Router, session: &str, n: u64, base: &str) -> String {
    let r = post(
        app,
        "/api/v1/create_model",
        A,
        json!({"session_id": session, "model_seq_id": n, "base_model": base,
               "lora_config": {"rank": 4}}),
    )
    .await
    .ok();
    let done = retrieve(app, A, r["request_id"].as_str().expect("request id"))
        .await
        .ok();
    done["model_id"].as_str().expect("model id").to_owned()
}

/// A future's JSON once finished.
async fn finished(app: &Router, r: &Resp) -> Value {
    retrieve(app, A, r.json()["request_id"].as_str().expect("request id"))
        .await
        .json()
}

/// The refusal of an unknown base: a 400 naming the field, the name and every served one.
fn assert_unknown_base(r: &Resp, name: &str, served: &[&str]) {
    r.assert_error(400, &format!("{name:?} is not served here"));
    let msg = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("base_model"), "names the field: {msg}");
    for s in served {
        assert!(msg.contains(&format!("{s:?}")), "{msg} should list {s}");
    }
}

fn metric(text: &str, name: &str, base: &str) -> f64 {
    let key = format!("{name}{{base=\"{base}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /metrics"))
}

#[test]
fn served_models_come_from_repeated_flags_or_the_single_model() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        models: ServedModels,
    }
    // A dtype after `@` is the model's own; the others take --base-dtype.
    let cli = Cli::try_parse_from([
        "serve",
        "--base-dtype",
        "f32",
        "--model",
        "a=/m/a.gguf@bf16",
        "--model",
        "org/b=/m/b dir",
        "--model",
        "c=/m/c@home.gguf",
    ])
    .expect("parse");
    let specs = cli.models.specs().expect("specs");
    assert_eq!(
        specs,
        vec![
            ModelSpec {
                name: "a".into(),
                path: "/m/a.gguf".into(),
                base_dtype: Some(BaseDtype::Bf16),
            },
            ModelSpec {
                name: "org/b".into(),
                path: "/m/b dir".into(),
                base_dtype: Some(BaseDtype::F32),
            },
            ModelSpec {
                name: "c".into(),
                path: "/m/c@home.gguf".into(),
                base_dtype: Some(BaseDtype::F32),
            },
        ]
    );
    // Without --model: the single model of --model-path / --model-name.
    let cli = Cli::try_parse_from(["serve", "--model-path", "/m/x.gguf", "--model-name", "x"])
        .expect("parse");
    assert_eq!(
        cli.models.specs().expect("specs"),
        vec![ModelSpec {
            name: "x".into(),
            path: "/m/x.gguf".into(),
            base_dtype: Some(BaseDtype::AsStored),
        }]
    );
    // A name twice, or no `=`, is refused.
    let twice =
        Cli::try_parse_from(["serve", "--model", "a=/1", "--model", "a=/2"]).expect("parse");
    let e = twice.models.specs().expect_err("a name twice");
    assert!(e.to_string().contains("\"a\" is named twice"), "{e}");
    assert!(Cli::try_parse_from(["serve", "--model", "/no/name"]).is_err());
    assert!(Cli::try_parse_from(["serve", "--model", "=/no/name"]).is_err());
}

#[test]
fn two_bases_train_and_sample_apart() {
    let data = temp_dir("apart");
    let srv = server(&data, both());
    let (ma, mb) = (load(NAME_A), load(NAME_B));
    srv.rt.block_on(async {
        let app = &srv.app;
        // Both listed, the default first, with their own context lengths.
        let caps = get(app, "/api/v1/get_server_capabilities", A).await.ok();
        let models = caps["supported_models"].as_array().expect("models");
        let names: Vec<&str> = models.iter().filter_map(|m| m["model_name"].as_str()).collect();
        assert_eq!(names, [NAME_A, NAME_B]);
        assert_eq!(models[0]["max_context_length"], 64);
        assert_eq!(models[1]["max_context_length"], 128);
        let health = get(app, "/healthz", A).await.ok();
        assert_eq!(health["model"], NAME_A);
        assert_eq!(health["model_loaded"], true);
        assert_eq!(health["models"][1], json!({"name": NAME_B, "loaded": true}));

        let s = session(app).await;
        let r = post(app, "/api/v1/create_model", A,
            json!({"session_id": s, "model_seq_id": 9, "base_model": "Qwen/Qwen3-8B"})).await;
        assert_unknown_base(&r, "Qwen/Qwen3-8B", &[NAME_A, NAME_B]);
        let run_a = create_run(app, &s, 0, NAME_A).await;
        let run_b = create_run(app, &s, 1, NAME_B).await;
        for (run, base) in [(&run_a, NAME_A), (&run_b, NAME_B)] {
            let info = post(app, "/api/v1/get_info", A, json!({"model_id": run})).await.ok();
            assert_eq!(info["model_data"]["model_name"], base);
            let listed = get(app, &format!("/api/v1/training_runs/{run}"), A).await.ok();
            assert_eq!(listed["base_model"], base);
        }

        // Both runs' work submitted together: each computes on its own base.
        let fa = send_fb(app, A, &fb_req(&run_a, 1, &SEQ)).await;
        let fbb = send_fb(app, A, &fb_req(&run_b, 1, &SEQ)).await;
        let (oa, ob) = (fb_result(app, A, &fa).await, fb_result(app, A, &fbb).await);
        let (lpa, lpb) = (logprobs(&oa), logprobs(&ob));
        assert_close(&lpa, &reference_logprobs(&ma, &SEQ), "run on tiny-a");
        assert_close(&lpb, &reference_logprobs(&mb, &SEQ), "run on tiny-b");
        assert!(
            lpa.iter().zip(&lpb).any(|(x, y)| (x - y).abs() > 1e-3),
            "the two bases give different logprobs"
        );
        // Token 50 is in tiny-a's vocabulary, not in tiny-b's.
        let wide = [3, 50, 7, 9];
        let bad = finished(app, &send_fb(app, A, &fb_req(&run_b, 2, &wide)).await).await;
        assert!(bad["error"].as_str().unwrap_or_default().contains("vocabulary"), "{bad}");
        let ok = fb_result(app, A, &send_fb(app, A, &fb_req(&run_a, 2, &wide)).await).await;
        assert_close(&logprobs(&ok), &reference_logprobs(&ma, &wide), "token 50 on tiny-a");

        // A checkpoint loads only into a run of its own base.
        let saved = post(app, "/api/v1/save_weights", A,
            json!({"model_id": run_a, "path": "ck", "seq_id": 3})).await;
        let path = finished(app, &saved).await["path"].as_str().expect("path").to_owned();
        let cross = post(app, "/api/v1/load_weights", A,
            json!({"model_id": run_b, "seq_id": 3, "path": path})).await;
        let f = finished(app, &cross).await;
        assert!(
            f["error"].as_str().unwrap_or_default().contains("was trained on base model \"tiny-a\""),
            "{f}"
        );
        post(app, "/api/v1/load_weights", A,
            json!({"session_id": s, "model_seq_id": 2, "path": path, "base_model": NAME_B}))
            .await
            .assert_error(400, "was trained on \"tiny-a\"");
        let from_ck = post(app, "/api/v1/load_weights", A,
            json!({"session_id": s, "model_seq_id": 3, "path": path})).await;
        let run_c = finished(app, &from_ck).await["model_id"].as_str().expect("model").to_owned();
        let info = post(app, "/api/v1/get_info", A, json!({"model_id": run_c})).await.ok();
        assert_eq!(info["model_name"], NAME_A, "a run from a checkpoint is on its base");

        // Sampling sessions pick their base by name.
        let bad = post(app, "/api/v1/create_sampling_session", A,
            json!({"session_id": s, "sampling_session_seq_id": 9, "base_model": "nope"})).await;
        assert_unknown_base(&bad, "nope", &[NAME_A, NAME_B]);
        let prompt: Vec<u32> = vec![4, 8, 15, 16];
        for (i, (base, m)) in [(NAME_A, &ma), (NAME_B, &mb)].into_iter().enumerate() {
            let sc = post(app, "/api/v1/create_sampling_session", A,
                json!({"session_id": s, "sampling_session_seq_id": i, "base_model": base})).await.ok();
            let sid = sc["sampling_session_id"].as_str().expect("sampler").to_owned();
            let d = get(app, &format!("/api/v1/samplers/{sid}"), A).await.ok();
            assert_eq!(d["base_model"], base);
            let a = post(app, "/api/v1/asample", A, json!({"sampling_session_id": sid, "seq_id": 0,
                "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
                "sampling_params": {"max_tokens": 6, "temperature": 0.0, "stop": []}})).await.ok();
            let out = retrieve(app, A, a["request_id"].as_str().expect("request")).await;
            use prost::Message;
            let sr = proto::SampleResponse::decode(out.body).expect("SampleResponse");
            let got: Vec<u32> = proto::read_i32("t", &sr.sequences[0].tokens)
                .expect("tokens")
                .into_iter()
                .map(|t| t as u32)
                .collect();
            assert_eq!(got, reference_greedy(m, &prompt, 6), "greedy on {base}");
        }
        // The REST routes too: text in, decoded by the tokenizer of the base that sampled.
        let r = post(app, "/api/v1/sample", A, json!({"model_id": NAME_B, "prompts": ["abcd"],
            "sampling_params": {"max_tokens": 5, "temperature": 0.0, "stop": []}})).await.ok();
        let tok = mb.tokenizer().expect("tokenizer");
        let want = reference_greedy(&mb, &tok.encode("abcd").expect("encode"), 5);
        let got: Vec<u32> = serde_json::from_value(r["outputs"][0]["tokens"].clone()).expect("tokens");
        assert_eq!(got, want);
        assert_eq!(r["generated_text"][0], tok.decode(&want, true).expect("decode"));
        let r = post(app, "/add_lora", A, json!({"base_model": "nope"})).await;
        assert_unknown_base(&r, "nope", &[NAME_A, NAME_B]);
        let rest_b = post(app, "/add_lora", A, json!({"base_model": NAME_B})).await.ok();
        let rest_b = rest_b["model_id"].as_str().expect("model").to_owned();
        let r = post(app, "/api/v1/sample", A, json!({"model_id": rest_b, "prompts": ["abcd"],
            "sampling_params": {"max_tokens": 5, "temperature": 0.0, "stop": []}})).await.ok();
        let got: Vec<u32> = serde_json::from_value(r["outputs"][0]["tokens"].clone()).expect("tokens");
        assert_eq!(got, want, "a fresh REST adapter on tiny-b samples like tiny-b");

        // Memory per base: the weights' bytes, as their configs imply.
        let m = common::http::call(app, axum::http::Method::GET, "/metrics", None, "", vec![]).await;
        let text = String::from_utf8_lossy(&m.body).to_string();
        let wa = metric(&text, "loraplex_base_model_weight_bytes", NAME_A);
        let wb = metric(&text, "loraplex_base_model_weight_bytes", NAME_B);
        assert_eq!(wa as usize, expected_weight_bytes(&config_a()));
        assert_eq!(wb as usize, expected_weight_bytes(&config_b()));
        assert_eq!(metric(&text, "loraplex_base_model_training_runs", NAME_A), 2.0);
        assert_eq!(metric(&text, "loraplex_base_model_training_runs", NAME_B), 2.0);
    });
    drop(srv);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn a_restart_brings_each_run_back_on_its_base() {
    let data = temp_dir("restart");
    let (run_a, run_b, lp_a, lp_b) = {
        let srv = server(&data, both());
        srv.rt.block_on(async {
            let app = &srv.app;
            let s = session(app).await;
            let run_a = create_run(app, &s, 0, NAME_A).await;
            let run_b = create_run(app, &s, 1, NAME_B).await;
            let mut after = Vec::new();
            for run in [&run_a, &run_b] {
                fb_result(app, A, &send_fb(app, A, &fb_req(run, 1, &SEQ)).await).await;
                let step = post(
                    app,
                    "/api/v1/optim_step",
                    A,
                    json!({"model_id": run, "seq_id": 2,
                    "adam_params": {"learning_rate": 0.05}}),
                )
                .await;
                finished(app, &step).await;
                let o = fb_result(app, A, &send_fb(app, A, &fb_req(run, 3, &SEQ)).await).await;
                after.push(logprobs(&o));
            }
            (run_a, run_b, after[0].clone(), after[1].clone())
        })
    };
    // Both bases served again: each run back on its own, with its trained weights.
    {
        let srv = server(&data, both());
        srv.rt.block_on(async {
            let app = &srv.app;
            for (run, base, before) in [(&run_a, NAME_A, &lp_a), (&run_b, NAME_B, &lp_b)] {
                let info = post(app, "/api/v1/get_info", A, json!({"model_id": run}))
                    .await
                    .ok();
                assert_eq!(info["model_name"], base);
                let mut req = fb_req(run, 4, &SEQ);
                req.forward_only = true;
                let o = fb_result(app, A, &send_fb(app, A, &req).await).await;
                assert_close(&logprobs(&o), before, &format!("{base} after the restart"));
            }
        });
    }
    // Only tiny-a served: the run on tiny-b stays a record, listed with its base.
    let (a, _) = base_dirs();
    let only_a = ModelArgs {
        model_path: a.clone(),
        model_name: NAME_A.into(),
        base_dtype: Default::default(),
    };
    let srv = server(&data, only_a);
    srv.rt.block_on(async {
        let app = &srv.app;
        assert!(srv
            .state
            .engine
            .registry()
            .exists(&AdapterId(run_a.clone())));
        assert!(!srv
            .state
            .engine
            .registry()
            .exists(&AdapterId(run_b.clone())));
        let listed = get(app, &format!("/api/v1/training_runs/{run_b}"), A)
            .await
            .ok();
        assert_eq!(listed["base_model"], NAME_B);
        let s = session(app).await;
        let r = post(
            app,
            "/api/v1/create_model",
            A,
            json!({"session_id": s, "model_seq_id": 0, "base_model": NAME_B}),
        )
        .await;
        assert_unknown_base(&r, NAME_B, &[NAME_A]);
    });
    drop(srv);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn one_model_is_served_as_before() {
    let data = temp_dir("one");
    let (a, _) = base_dirs();
    let srv = server(
        &data,
        ModelArgs {
            model_path: a.clone(),
            model_name: "solo".into(),
            base_dtype: Default::default(),
        },
    );
    let m = load(NAME_A);
    srv.rt.block_on(async {
        let app = &srv.app;
        let caps = get(app, "/api/v1/get_server_capabilities", A).await.ok();
        assert_eq!(caps["supported_models"].as_array().map(Vec::len), Some(1));
        assert_eq!(caps["supported_models"][0]["model_name"], "solo");
        let s = session(app).await;
        let r = post(
            app,
            "/api/v1/create_model",
            A,
            json!({"session_id": s, "model_seq_id": 5, "base_model": NAME_A}),
        )
        .await;
        assert_unknown_base(&r, NAME_A, &["solo"]);
        let run = create_run(app, &s, 0, "solo").await;
        let o = fb_result(app, A, &send_fb(app, A, &fb_req(&run, 1, &SEQ)).await).await;
        assert_close(&logprobs(&o), &reference_logprobs(&m, &SEQ), "the one base");
        // The REST routes' "base" names the one model.
        let rest = post(app, "/add_lora", A, json!({"base_model": "base"}))
            .await
            .ok();
        assert!(rest["model_id"].as_str().is_some());
        let r = post(
            app,
            "/api/v1/sample",
            A,
            json!({"prompts": ["abc"],
            "sampling_params": {"max_tokens": 3, "temperature": 0.0, "stop": []}}),
        )
        .await
        .ok();
        let want = reference_greedy(
            &m,
            &m.tokenizer().expect("tok").encode("abc").expect("enc"),
            3,
        );
        let got: Vec<u32> =
            serde_json::from_value(r["outputs"][0]["tokens"].clone()).expect("tokens");
        assert_eq!(got, want);
    });
    drop(srv);
    let _ = std::fs::remove_dir_all(&data);
}

/// Fresh adapters on two bases, submitted at once with a long gather window: were they
/// batched together, one base's pass would meet the other's adapter shapes and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_batch_only_with_their_own_base() {
    let (ma, mb) = (Arc::new(load(NAME_A)), Arc::new(load(NAME_B)));
    let cfg = EngineConfig {
        batch_wait_ms: 300,
        ..Default::default()
    };
    let e = Engine::with_models(cfg, vec![ma.clone(), mb.clone()]).expect("engine");
    assert_eq!(e.registry().base_names(), [NAME_A, NAME_B]);
    let t = TenantId::from("t");
    let lora = LoraConfig::from_tinker(4, 1, true, true, false).expect("lora");
    let mut runs = Vec::new();
    for base in [NAME_A, NAME_B, NAME_A, NAME_B] {
        let id = e
            .create_model_on(&t, Some(base), lora.clone())
            .await
            .expect("create");
        runs.push((id, base));
    }
    assert!(e
        .create_model_on(&t, Some("nope"), lora.clone())
        .await
        .is_err());
    let tokens: Vec<u32> = SEQ.iter().map(|&t| t as u32).collect();
    let mut futures = Vec::new();
    for (id, base) in &runs {
        let op = Op::ForwardBackward(FbRequest {
            data: vec![Datum::next_token(&tokens, 1)],
            loss: Arc::new(BuiltinLoss::CrossEntropy),
            loss_config: Default::default(),
        });
        futures.push((e.submit(&t, id, Some(0), op).await.expect("submit"), *base));
    }
    for (f, base) in futures {
        let out = e
            .result(&t, &f, Duration::from_secs(60))
            .await
            .unwrap_or_else(|err| panic!("work on {base} failed: {err}"));
        let JobOutput::ForwardBackward(r) = &*out else {
            panic!("not a forward_backward output")
        };
        let m = if base == NAME_A { &ma } else { &mb };
        assert_close(&r.logprobs[0], &reference_logprobs(m, &SEQ), base);
    }
}

/// The official SDK against a real `loraplex serve --model tiny-a=... --model tiny-b=...`:
/// an adapter trained on each base (tests/sdk/multi_model.py).
#[test]
fn official_sdk_trains_an_adapter_on_each_of_two_bases() {
    let python = common::server::sdk_python();
    assert!(
        python.exists(),
        "no Python with the tinker SDK at {}: run ./scripts/setup-sdk.sh or set LORAPLEX_SDK_PYTHON",
        python.display()
    );
    let (a, b) = base_dirs();
    let data = temp_dir("sdk");
    let (ma, mb) = (
        format!("{NAME_A}={}", a.display()),
        format!("{NAME_B}={}", b.display()),
    );
    let (_server, port) =
        common::server::start_server_cmd(&data, &["--model", &ma, "--model", &mb], &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/multi_model.py");
    let status = std::process::Command::new(&python)
        .arg(&script)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .env("TINKER_TELEMETRY", "0")
        .status()
        .expect("run the SDK script");
    let _ = std::fs::remove_dir_all(&data);
    assert!(status.success(), "the SDK script failed: {status}");
}
