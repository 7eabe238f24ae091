//! The HTTP API as clients see it, on the shipped SmolLM2: bad input answered with a 4xx and
//! a JSON body naming the problem, tenants isolated from each other, the Tinker protocol
//! over raw HTTP (protobuf in and out, futures, idempotent seq_ids), plugins over HTTP, the
//! OpenAPI document against the router, metrics, and the seed's REST workflow with N = 4
//! users at once against the same users one after another.

mod common;

use common::http::*;

use axum::http::{Method, StatusCode};
use axum::Router;
use loraplex::api::proto::{self, chunk};
use loraplex::api::Shared;
use loraplex::config::EngineConfig;
use loraplex::jobs::{Engine, FutureStoreConfig, MemoryFutureStore};
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_a_json_body_naming_the_problem() {
    let (app, _) = app_with(64 * 1024);
    // No key, unknown route, malformed JSON, empty body, wrong field type.
    call(
        &app,
        Method::POST,
        "/api/v1/create_session",
        None,
        "application/json",
        b"{}".to_vec(),
    )
    .await
    .assert_error(401, "X-API-Key");
    get(&app, "/api/v1/no_such_route", A)
        .await
        .assert_error(404, "no route");
    call(
        &app,
        Method::POST,
        "/api/v1/create_session",
        Some(A),
        "application/json",
        b"{not json".to_vec(),
    )
    .await
    .assert_error(400, "invalid JSON");
    call(
        &app,
        Method::POST,
        "/api/v1/create_session",
        Some(A),
        "application/json",
        Vec::new(),
    )
    .await
    .assert_error(400, "empty body");
    let (session, model) = tinker_model(&app, A).await;
    post(
        &app,
        "/api/v1/create_model",
        A,
        json!({"session_id": session, "model_seq_id": "one", "base_model": "x"}),
    )
    .await
    .assert_error(400, "model_seq_id");
    post(
        &app,
        "/api/v1/create_model",
        A,
        json!({"session_id": session, "model_seq_id": 1, "base_model": "gpt-5"}),
    )
    .await
    .assert_error(400, "not served here");
    post(&app, "/api/v1/create_model", A, json!({"session_id": session, "model_seq_id": 1, "base_model": loraplex::config::DEFAULT_MODEL_NAME, "lora_config": {"rank": 0}}))
        .await
        .assert_error(400, "rank");
    // Oversized body (the limit here is 64 KiB).
    call(
        &app,
        Method::POST,
        "/api/v1/create_session",
        Some(A),
        "application/json",
        vec![b' '; 100 * 1024],
    )
    .await
    .assert_error(413, "larger than the limit");
    // Malformed protobuf; ragged int32 bytes; unknown model.
    call(
        &app,
        Method::POST,
        "/api/v1/forward_backward",
        Some(A),
        "application/x-protobuf",
        vec![0xff, 0xff, 0xff],
    )
    .await
    .assert_error(400, "invalid protobuf");
    let mut d = ce_datum();
    if let Some(chunk::Chunk::EncodedText(t)) = &mut d.model_input[0].chunk {
        t.tokens.push(7);
    }
    let r = fb(&app, A, &model, 1, "cross_entropy", vec![d], HashMap::new()).await;
    assert_eq!(
        r.status, 200,
        "a refused request keeps its seq_id and fails as a future"
    );
    let f = retrieve(&app, A, r.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert_eq!(f["category"], "user");
    assert!(
        f["error"].as_str().unwrap().contains("data[0].model_input"),
        "{f}"
    );
    fb(
        &app,
        A,
        "nobody:train:0",
        1,
        "cross_entropy",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await
    .assert_error(404, "not found");
    // A target outside the vocabulary fails its future naming the field; the next seq runs.
    let mut d = ce_datum();
    d.loss_fn_inputs.insert(
        "target_tokens".into(),
        i64_tensor(
            &[1; 10]
                .iter()
                .chain([99_999i64].iter())
                .copied()
                .collect::<Vec<_>>(),
        ),
    );
    let r = fb(&app, A, &model, 2, "cross_entropy", vec![d], HashMap::new()).await;
    let f = retrieve(&app, A, r.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert_eq!(f["category"], "user");
    assert!(
        f["error"].as_str().unwrap().contains("target_tokens"),
        "{f}"
    );
    assert!(f["error"].as_str().unwrap().contains("vocabulary"), "{f}");
    let r = fb(
        &app,
        A,
        &model,
        3,
        "no_such_loss",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await;
    let f = retrieve(&app, A, r.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert!(f["error"].as_str().unwrap().contains("no_such_loss"), "{f}");
    let r = fb(
        &app,
        A,
        &model,
        4,
        "cross_entropy",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await;
    let ok = retrieve(&app, A, r.json()["request_id"].as_str().unwrap()).await;
    assert_eq!(
        ok.headers["content-type"], "application/x-protobuf",
        "later work still runs"
    );
    // Sampling: a prompt token outside the vocabulary, a bad stop token.
    let sc = post(&app, "/api/v1/create_sampling_session", A, json!({"session_id": session, "sampling_session_seq_id": 0, "base_model": loraplex::config::DEFAULT_MODEL_NAME})).await;
    let sid = sc.json()["sampling_session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    post(&app, "/api/v1/asample", A, json!({"sampling_session_id": sid, "seq_id": 0, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 123456]}]}, "sampling_params": {"max_tokens": 2}}))
        .await
        .assert_error(400, "prompt");
    post(&app, "/api/v1/asample", A, json!({"sampling_session_id": sid, "seq_id": 1, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2, "stop": [-4]}}))
        .await
        .assert_error(400, "sampling_params.stop");
    post(&app, "/api/v1/asample", A, json!({"sampling_session_id": sid, "seq_id": 2, "num_samples": 1,
        "prompt": {"chunks": [{"type": "image", "data": "", "format": "png"}]}, "sampling_params": {}}))
        .await
        .assert_error(400, "text-only");
    post(
        &app,
        "/api/v1/retrieve_future",
        A,
        json!({"request_id": "future-nope"}),
    )
    .await
    .assert_error(404, "not found");
    let r = post(
        &app,
        "/api/v1/load_weights",
        A,
        json!({"model_id": model, "seq_id": 5, "path": "s3://elsewhere"}),
    )
    .await;
    let f = retrieve(&app, A, r.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert!(f["error"].as_str().unwrap().contains("tinker://"), "{f}");
    // REST: unknown model, no conversations.
    post(&app, "/fwdbwd", A, json!({"model_id": "model-nope", "data": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}))
        .await
        .assert_error(404, "not found");
    post(&app, "/fwdbwd", A, json!({"model_id": model, "data": []}))
        .await
        .assert_error(400, "data");
    post(
        &app,
        "/fwdbwd",
        A,
        json!({"model_id": model, "data": [[{"role": "user", "content": "no answer"}]]}),
    )
    .await
    .assert_error(400, "assistant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_touch_only_their_own_things() {
    let (app, _) = app();
    let (session, model) = tinker_model(&app, A).await;
    let r = fb(
        &app,
        A,
        &model,
        1,
        "cross_entropy",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await;
    let fut = r.json()["request_id"].as_str().unwrap().to_owned();
    retrieve(&app, A, &fut).await;
    let saved = post(
        &app,
        "/api/v1/save_weights",
        A,
        json!({"model_id": model, "path": "c1", "seq_id": 2}),
    )
    .await;
    let path = retrieve(&app, A, saved.json()["request_id"].as_str().unwrap())
        .await
        .json()["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let plugin = call(
        &app,
        Method::POST,
        "/api/v1/plugins",
        Some(A),
        "application/wasm",
        common::component("ppo-clip"),
    )
    .await;
    assert_eq!(
        plugin.status,
        200,
        "{}",
        String::from_utf8_lossy(&plugin.body)
    );
    let pid = plugin.json()["plugin_id"].as_str().unwrap().to_owned();

    // Bob sees none of it: every lookup is a 404 (410 for a heartbeat), never a 403.
    post(&app, "/api/v1/get_info", B, json!({"model_id": model}))
        .await
        .assert_error(404, "not found");
    post(
        &app,
        "/api/v1/retrieve_future",
        B,
        json!({"request_id": fut}),
    )
    .await
    .assert_error(404, "not found");
    fb(
        &app,
        B,
        &model,
        2,
        "cross_entropy",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await
    .assert_error(404, "not found");
    get(
        &app,
        &format!("/api/v1/training_runs/{model}/checkpoints"),
        B,
    )
    .await
    .assert_error(404, "not found");
    get(&app, &format!("/api/v1/training_runs/{model}"), B)
        .await
        .assert_error(404, "not found");
    post(
        &app,
        "/api/v1/create_sampling_session",
        B,
        json!({"session_id": session, "sampling_session_seq_id": 9, "model_path": path}),
    )
    .await
    .assert_error(404, "not found");
    post(
        &app,
        "/api/v1/weights_info",
        B,
        json!({"tinker_path": path}),
    )
    .await
    .assert_error(404, "not found");
    assert_eq!(
        post(
            &app,
            "/api/v1/session_heartbeat",
            B,
            json!({"session_id": session})
        )
        .await
        .status,
        410
    );
    assert_eq!(
        get(&app, "/api/v1/plugins", B).await.json()["plugins"],
        json!([])
    );
    get(&app, &format!("/api/v1/plugins/{pid}"), B)
        .await
        .assert_error(404, "not found");
    assert_eq!(
        call(
            &app,
            Method::DELETE,
            &format!("/api/v1/plugins/{pid}"),
            Some(B),
            "",
            vec![]
        )
        .await
        .status,
        404
    );
    post(&app, "/fwdbwd", B, json!({"model_id": model, "data": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}))
        .await
        .assert_error(404, "not found");
    post(&app, "/remove_lora", B, json!({"model_id": model}))
        .await
        .assert_error(404, "not found");
    assert_eq!(
        get(&app, "/api/v1/training_runs", B).await.json()["training_runs"],
        json!([])
    );
    // Bob's own model cannot use Alice's plugin as its loss.
    let (_, bob_model) = tinker_model(&app, B).await;
    let mut cfg = HashMap::new();
    cfg.insert(
        "plugin".to_owned(),
        proto::LossConfigValue {
            value: Some(proto::loss_config_value::Value::Text(pid.clone())),
        },
    );
    let r = fb(&app, B, &bob_model, 1, "custom", vec![ce_datum()], cfg).await;
    let f = retrieve(&app, B, r.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert!(f["error"].as_str().unwrap().contains("not found"), "{f}");
    // Alice still has everything.
    assert_eq!(
        post(&app, "/api/v1/get_info", A, json!({"model_id": model}))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&app, "/api/v1/plugins", A).await.json()["plugins"][0]["plugin_id"],
        json!(pid)
    );
}

/// Tinker's wire protocol by hand: protobuf results, idempotent resubmission, training
/// through optim_step, a loss plugin matching the built-in, checkpoints and sampling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinker_protocol_over_raw_http() {
    let (app, _) = app();
    let cfg = post(
        &app,
        "/api/v1/client/config",
        A,
        json!({"sdk_version": "0.38.0"}),
    )
    .await
    .json();
    assert_eq!(cfg["custom_loss_server_side"], false);
    let (session, model) = tinker_model(&app, A).await;
    let info = post(
        &app,
        "/api/v1/get_info",
        A,
        json!({"model_id": model, "type": "get_info"}),
    )
    .await
    .json();
    assert_eq!(
        info["model_data"]["model_name"],
        loraplex::config::DEFAULT_MODEL_NAME
    );
    assert_eq!(info["lora_rank"], 4);

    // forward_backward; the same seq_id again returns the same future.
    let r1 = fb(
        &app,
        A,
        &model,
        1,
        "cross_entropy",
        vec![ce_datum(), ce_datum()],
        HashMap::new(),
    )
    .await;
    let r1b = fb(
        &app,
        A,
        &model,
        1,
        "cross_entropy",
        vec![ce_datum(), ce_datum()],
        HashMap::new(),
    )
    .await;
    assert_eq!(
        r1.json()["request_id"],
        r1b.json()["request_id"],
        "idempotent on (model, seq_id)"
    );
    let out = retrieve(&app, A, r1.json()["request_id"].as_str().unwrap()).await;
    assert_eq!(out.headers["content-type"], "application/x-protobuf");
    let o = proto::ForwardBackwardOutput::decode(out.body.clone()).expect("ForwardBackwardOutput");
    let rec = &o.loss_fn_outputs[0];
    assert_eq!(rec.num_datums, 2);
    let lp = &rec.fields["logprobs"];
    let offsets = proto::read_i64("offsets", &lp.offsets).unwrap();
    assert_eq!(
        offsets,
        vec![0, 44, 88],
        "N + 1 byte offsets of 11 float32 logprobs each"
    );
    let lps = proto::read_f32("data", &lp.data).unwrap();
    let loss0 = o.metrics["loss:sum"];
    assert!(
        (loss0 + lps.iter().map(|&x| x as f64).sum::<f64>()).abs() < 1e-3,
        "loss:sum = -sum(logprobs)"
    );
    assert!(
        o.metrics.keys().all(|k| k.matches(':').count() == 1),
        "{:?}",
        o.metrics.keys()
    );

    // optim_step then forward: lower loss.
    let s = post(&app, "/api/v1/optim_step", A, json!({"model_id": model, "seq_id": 2, "adam_params": {"learning_rate": 0.003}, "type": "optim_step"})).await;
    let step = retrieve(&app, A, s.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert_eq!(step["metrics"]["step:max"], 1.0);
    let mut fwd = proto::ForwardBackwardRequest {
        model_id: model.clone(),
        seq_id: 3,
        data: vec![ce_datum(), ce_datum()],
        loss_fn: "cross_entropy".into(),
        forward_only: true,
        ..Default::default()
    };
    let r = send_fb(&app, A, &fwd).await;
    let o = fb_result(&app, A, &r).await;
    assert!(
        o.metrics["loss:sum"] < loss0,
        "{} < {loss0}",
        o.metrics["loss:sum"]
    );

    // A wasm loss named in the request gives the built-in ppo's loss on the same data.
    let up = call(
        &app,
        Method::POST,
        "/api/v1/plugins",
        Some(A),
        "application/wasm",
        common::component("ppo-clip"),
    )
    .await;
    let pid = up.json()["plugin_id"].as_str().unwrap().to_owned();
    assert_eq!(up.json()["kind"], "loss");
    let n = SEQ.len() - 1;
    let rl = text_datum(
        &SEQ[..n],
        &[
            (
                "target_tokens",
                i64_tensor(&SEQ[1..].iter().map(|&t| t as i64).collect::<Vec<_>>()),
            ),
            ("logprobs", f32_tensor(&vec![-3.0; n])),
            (
                "advantages",
                f32_tensor(
                    &(0..n)
                        .map(|i| i as f32 / n as f32 - 0.4)
                        .collect::<Vec<_>>(),
                ),
            ),
        ],
    );
    fwd.seq_id = 4;
    fwd.data = vec![rl.clone()];
    fwd.loss_fn = "ppo".into();
    let r = send_fb(&app, A, &fwd).await;
    let builtin = fb_result(&app, A, &r).await;
    fwd.seq_id = 5;
    fwd.loss_fn = format!("plugin:{pid}");
    let r = send_fb(&app, A, &fwd).await;
    let plugin = fb_result(&app, A, &r).await;
    let (a, b) = (builtin.metrics["loss:sum"], plugin.metrics["loss:sum"]);
    assert!(
        (a - b).abs() < 1e-4 * a.abs().max(1.0),
        "plugin ppo {b} vs built-in {a}"
    );
    // Garbage is refused as a plugin; a deleted plugin can no longer be named.
    call(
        &app,
        Method::POST,
        "/api/v1/plugins",
        Some(A),
        "application/wasm",
        b"\0asm garbage".to_vec(),
    )
    .await
    .assert_error(400, "plugin");
    assert_eq!(
        call(
            &app,
            Method::DELETE,
            &format!("/api/v1/plugins/{pid}"),
            Some(A),
            "",
            vec![]
        )
        .await
        .status,
        200
    );
    fwd.seq_id = 6;
    let r = send_fb(&app, A, &fwd).await;
    let f = retrieve(&app, A, r.json()["request_id"].as_str().unwrap())
        .await
        .json();
    assert!(f["error"].as_str().unwrap().contains("not found"), "{f}");

    // Save for the sampler, sample from it (protobuf), list checkpoints.
    let sv = post(
        &app,
        "/api/v1/save_weights_for_sampler",
        A,
        json!({"model_id": model, "path": "s1", "seq_id": 7, "kind": "snapshot"}),
    )
    .await;
    let path = retrieve(&app, A, sv.json()["request_id"].as_str().unwrap())
        .await
        .json()["path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(path, format!("tinker://{model}/sampler_weights/s1"));
    let sc = post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": session, "sampling_session_seq_id": 0, "model_path": path}),
    )
    .await
    .json();
    let sid = sc["sampling_session_id"].as_str().unwrap().to_owned();
    let again = post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": session, "sampling_session_seq_id": 0, "model_path": path}),
    )
    .await
    .json();
    assert_eq!(
        again["sampling_session_id"],
        json!(sid),
        "idempotent on (session, sampling_session_seq_id)"
    );
    assert_eq!(
        get(&app, &format!("/api/v1/samplers/{sid}"), A)
            .await
            .json()["model_path"],
        json!(path)
    );
    let body = json!({"sampling_session_id": sid, "seq_id": 0, "num_samples": 3,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": SEQ[..5]}]},
        "sampling_params": {"max_tokens": 4, "temperature": 0.0, "stop": []}, "prompt_logprobs": true, "topk_sample_logprobs": 2});
    let a = post(&app, "/api/v1/asample", A, body.clone()).await.json();
    let ids = a["sample_sequence_ids"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        post(&app, "/api/v1/asample", A, body).await.json()["request_id"],
        a["request_id"],
        "idempotent on (session, seq_id)"
    );
    let out = retrieve(&app, A, a["request_id"].as_str().unwrap()).await;
    let sr = proto::SampleResponse::decode(out.body).expect("SampleResponse");
    assert_eq!(sr.sequences.len(), 3);
    let t0 = proto::read_i32("t", &sr.sequences[0].tokens).unwrap();
    assert_eq!(t0.len(), 4);
    assert_eq!(
        sr.sequences[0].stop_reason,
        proto::StopReason::Length as i32
    );
    let plp = proto::read_f32("p", sr.prompt_logprobs.as_ref().unwrap()).unwrap();
    assert_eq!(plp.len(), 5);
    assert!(plp[0].is_nan() && plp[1..].iter().all(|x| x.is_finite() && *x <= 0.0));
    let topk = sr.sequences[0].topk_sampled_logprobs.as_ref().unwrap();
    assert_eq!((topk.k, topk.length), (2, 4));
    // The checkpoint as a PEFT archive.
    let peft = format!("/api/v1/training_runs/{model}/checkpoints/sampler_weights/s1/peft");
    let tar = get(&app, &peft, A).await;
    assert_eq!(tar.status, 200);
    assert_eq!(tar.headers["content-type"], "application/x-tar");
    let body = String::from_utf8_lossy(&tar.body);
    for needle in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "\"peft_type\"",
        "self_attn.q_proj.lora_A.weight",
    ] {
        assert!(body.contains(needle), "PEFT archive lacks {needle}");
    }
    get(&app, &peft, B).await.assert_error(404, "not found");
    let cks = get(
        &app,
        &format!("/api/v1/training_runs/{model}/checkpoints"),
        A,
    )
    .await
    .json();
    assert_eq!(cks["checkpoints"][0]["checkpoint_id"], "sampler_weights/s1");
    assert_eq!(cks["checkpoints"][0]["checkpoint_type"], "sampler");
    // Finishing the session releases its model.
    assert_eq!(
        post(
            &app,
            &format!("/api/v1/sessions/{session}/finish"),
            A,
            json!({"reason": {"type": "success"}})
        )
        .await
        .status,
        200
    );
    post(&app, "/api/v1/get_info", A, json!({"model_id": model}))
        .await
        .assert_error(404, "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route_and_each_is_routed() {
    let (app, _) = app();
    let doc = call(&app, Method::GET, "/openapi.json", None, "", vec![])
        .await
        .json();
    assert_eq!(doc["openapi"], "3.1.0");
    let ops: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(
        ops,
        loraplex::api::routes::ROUTES.len(),
        "one operation per route"
    );
    for route in loraplex::api::routes::ROUTES {
        let (method, path) = (route.verb.as_str(), route.path);
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} in the document");
        assert_eq!(op["security"].is_null(), route.public, "{method} {path}");
        // Answered by its handler, not the 404 fallback; a key is needed unless public.
        let concrete = path
            .replace("{id}", "x")
            .replace("{kind}", "weights")
            .replace("{name}", "n");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = call(&app, m, &concrete, None, "application/json", b"{}".to_vec()).await;
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if r.status == StatusCode::NOT_FOUND {
            assert_ne!(
                r.json()["error"]["type"],
                "no_route",
                "{method} {path} is not routed"
            );
        }
        assert_eq!(
            r.status == StatusCode::UNAUTHORIZED,
            !route.public,
            "{method} {path}: public is {} but answered {} without a key",
            route.public,
            r.status
        );
    }
    // A path outside the table is the JSON 404 fallback.
    let r = call(&app, Method::GET, "/api/v1/nowhere", Some(A), "", vec![]).await;
    assert_eq!(r.json()["error"]["type"], "no_route");
    // Metrics after some traffic.
    let (_, _model) = tinker_model(&app, A).await;
    let m = call(&app, Method::GET, "/metrics", None, "", vec![]).await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    for needle in [
        "loraplex_http_requests_total{route=\"/api/v1/create_model\",status=\"200\"} 1",
        "loraplex_queue_depth",
        "loraplex_tenant_jobs{tenant=\"dev-",
        "loraplex_jobs_submitted_total",
        "loraplex_plugin_failures_total 0",
        "loraplex_models 1",
        "loraplex_tokens_per_second",
        "loraplex_resident_adapters ",
        "loraplex_resident_adapter_bytes ",
        "loraplex_adapter_memory_budget_bytes ",
        "loraplex_adapter_loads_total ",
        "loraplex_adapter_evictions_total ",
        "loraplex_adapter_load_seconds_bucket{le=\"+Inf\"} ",
        "loraplex_adapter_load_seconds_count ",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
}

/// The seed's workflow: each user creates an adapter, does 3 x (fwdbwd + optim_step) on a
/// chat conversation, then samples. N = 4 users at once, then the same users one after
/// another; all succeed and each user's loss falls. Prints the speed-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_rest_workflow_four_users_at_once() {
    let (app, _) = app();
    // "base" names the served model, as on the Flask server; another name is refused.
    post(
        &app,
        "/add_lora",
        A,
        json!({"base_model": "gpt-5", "rank": 8}),
    )
    .await
    .assert_error(400, "not served here");
    async fn user(app: Router, i: usize) -> (Vec<f64>, String) {
        let key = format!("tml-user-{i}");
        let add = post(
            &app,
            "/add_lora",
            &key,
            json!({"base_model": "base", "rank": 8, "alpha": 16}),
        )
        .await;
        assert_eq!(add.status, 200, "{}", String::from_utf8_lossy(&add.body));
        let model = add.json()["model_id"].as_str().unwrap().to_owned();
        let created = wait_rest(&app, &key, add.json()["request_id"].as_str().unwrap()).await;
        assert_eq!(created["model_id"], json!(model));
        let conv = json!([[{"role": "user", "content": format!("What is user {i}'s favourite colour?")},
                           {"role": "assistant", "content": format!("User {i} likes the colour number {}.", i * 7)}]]);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let f = post(
                &app,
                "/fwdbwd",
                &key,
                json!({"model_id": model, "data": conv, "loss_fn": "cross_entropy"}),
            )
            .await;
            assert_eq!(f.status, 200, "{}", String::from_utf8_lossy(&f.body));
            let o = post(
                &app,
                "/optim_step",
                &key,
                json!({"model_id": model, "adam_params": {"learning_rate": 0.002}}),
            )
            .await;
            losses.push(
                wait_rest(&app, &key, f.json()["request_id"].as_str().unwrap()).await["loss"]
                    .as_f64()
                    .unwrap(),
            );
            wait_rest(&app, &key, o.json()["request_id"].as_str().unwrap()).await;
        }
        let s = post(&app, "/api/v1/sample", &key, json!({"model_id": model, "prompts": ["The colour is"], "sampling_params": {"max_tokens": 8, "temperature": 0.0}})).await;
        assert_eq!(s.status, 200, "{}", String::from_utf8_lossy(&s.body));
        let text = s.json()["generated_text"][0].as_str().unwrap().to_owned();
        (losses, text)
    }
    async fn wait_rest(app: &Router, key: &str, id: &str) -> Value {
        for _ in 0..300 {
            let r = post(app, "/retrieve_future", key, json!({"request_id": id})).await;
            match r.status.as_u16() {
                200 => return r.json(),
                202 => assert_eq!(r.json()["status"], "pending"),
                s => panic!(
                    "future {id} failed: {s} {}",
                    String::from_utf8_lossy(&r.body)
                ),
            }
        }
        panic!("future {id} never finished");
    }
    // Warm up (first-touch allocations) outside the timings.
    user(app.clone(), 99).await;
    let t = Instant::now();
    let handles: Vec<_> = (0..4).map(|i| tokio::spawn(user(app.clone(), i))).collect();
    let mut together = Vec::new();
    for h in handles {
        together.push(h.await.expect("user task"));
    }
    let concurrent = t.elapsed();
    let t = Instant::now();
    for i in 4..8 {
        user(app.clone(), i).await;
    }
    let sequential = t.elapsed();
    for (i, (losses, text)) in together.iter().enumerate() {
        assert!(
            losses[2] < losses[0],
            "user {i}: loss should fall: {losses:?}"
        );
        assert!(!text.is_empty(), "user {i} sampled nothing");
    }
    println!(
        "seed REST workflow, 4 users: at once {:.2} s, one after another {:.2} s, speed-up {:.2}x",
        concurrent.as_secs_f64(),
        sequential.as_secs_f64(),
        sequential.as_secs_f64() / concurrent.as_secs_f64()
    );
}

/// An app whose futures expire fast (fetched: 300 ms; unfetched: 2 s; at most 64 held),
/// whose metrics keep 4 tenants apart and which allows 3 sessions per tenant.
fn bounded_app() -> (Router, Shared, Arc<MemoryFutureStore>) {
    let model = common::http::smollm2_arc();
    let store = Arc::new(MemoryFutureStore::new(FutureStoreConfig {
        result_ttl: Duration::from_millis(300),
        unread_ttl: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        max_records: 64,
        ..Default::default()
    }));
    let engine_cfg = EngineConfig {
        max_metric_tenants: 4,
        ..Default::default()
    };
    let engine = Engine::start_with_store(
        engine_cfg,
        Arc::new(move || Ok(model.clone())),
        store.clone(),
    )
    .expect("engine");
    let (app, state) = common::http::app_on(engine, |c| c.max_sessions_per_tenant = 3);
    (app, state, store)
}

/// Poll a REST future until it is no longer pending; its final answer.
async fn rest_result(app: &Router, key: &str, id: &str) -> Resp {
    for _ in 0..300 {
        let r = post(app, "/retrieve_future", key, json!({"request_id": id})).await;
        if r.status != StatusCode::ACCEPTED {
            return r;
        }
    }
    panic!("future {id} never finished");
}

fn request_id(r: &Resp) -> String {
    r.json()["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no request_id: {}", String::from_utf8_lossy(&r.body)))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn futures_expire_and_the_store_stays_bounded() {
    let (app, state, store) = bounded_app();
    let add = post(&app, "/add_lora", A, json!({"rank": 2})).await;
    let model = add.json()["model_id"].as_str().unwrap().to_owned();
    assert_eq!(rest_result(&app, A, &request_id(&add)).await.status, 200);
    // Many jobs, each fetched once: the store never holds more than its cap.
    let mut first = None;
    for i in 0..150 {
        let o = post(&app, "/optim_step", A, json!({"model_id": model})).await;
        assert_eq!(o.status, 200, "{}", String::from_utf8_lossy(&o.body));
        let id = request_id(&o);
        let r = rest_result(&app, A, &id).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["step"], json!(i + 1));
        first.get_or_insert(id);
        assert!(store.len() <= 64, "{} futures held", store.len());
    }
    // One job nobody fetches.
    let unread = request_id(&post(&app, "/optim_step", A, json!({"model_id": model})).await);
    // Long-polls of unknown futures leave no wake-up behind.
    for i in 0..50 {
        post(
            &app,
            "/api/v1/retrieve_future",
            A,
            json!({"request_id": format!("future-nope-{i}")}),
        )
        .await
        .assert_error(404, "not found");
    }
    assert_eq!(state.engine.waiting_futures(), 0);
    // Past both times to live, everything is gone, and says so as a JSON 404.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    store.expire();
    assert_eq!(store.len(), 0, "every finished future expired");
    let first = first.unwrap();
    for (path, id) in [
        ("/api/v1/retrieve_future", &first),
        ("/retrieve_future", &first),
        ("/api/v1/retrieve_future", &unread),
    ] {
        let r = post(&app, path, A, json!({"request_id": id})).await;
        r.assert_error(404, "not found");
        assert_eq!(r.json()["error"]["type"], "not_found", "{}", r.json());
    }
    assert_eq!(state.engine.waiting_futures(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_models_and_tenants_leave_nothing_behind() {
    let (app, state, _) = bounded_app();
    // Twelve tenants come and go; per-tenant counters stay at the cap, totals stay right.
    for i in 0..12 {
        let key = format!("tml-passing-{i}");
        let add = post(&app, "/add_lora", &key, json!({"rank": 2})).await;
        assert_eq!(rest_result(&app, &key, &request_id(&add)).await.status, 200);
        let model = add.json()["model_id"].as_str().unwrap().to_owned();
        let rm = post(&app, "/remove_lora", &key, json!({"model_id": model})).await;
        assert_eq!(rm.status, 200);
    }
    let tenants = state.engine.all_tenant_metrics();
    assert!(tenants.len() <= 4, "{} tenants kept", tenants.len());
    let done: u64 = tenants.iter().map(|(_, m)| m.done).sum::<u64>()
        + state.engine.folded_tenant_metrics().done;
    assert_eq!(done, 12, "no job lost from the totals");
    let metrics = get(&app, "/metrics", A).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("tenant=\"_other\""), "{text}");
    assert_eq!(state.engine.registry().num_adapters(), 0);

    // A Tinker session: a model made and unloaded, an ephemeral sampler, a sampling
    // session with samples. Finishing the session leaves nothing.
    let (session, model) = tinker_model(&app, A).await;
    let un = post(&app, "/api/v1/unload_model", A, json!({"model_id": model})).await;
    assert_eq!(retrieve(&app, A, &request_id(&un)).await.status, 200);
    let s = get(&app, &format!("/api/v1/sessions/{session}"), A)
        .await
        .json();
    assert_eq!(
        s["training_run_ids"],
        json!([]),
        "an unloaded model leaves its session"
    );
    let c = post(
        &app,
        "/api/v1/create_model",
        A,
        json!({"session_id": session, "model_seq_id": 1, "base_model": loraplex::config::DEFAULT_MODEL_NAME,
               "lora_config": {"rank": 2}}),
    )
    .await;
    let m2 = retrieve(&app, A, &request_id(&c)).await.json()["model_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The ephemeral sampler's future is never read: the session still releases it.
    let eph = post(
        &app,
        "/api/v1/save_weights_for_sampler",
        A,
        json!({"model_id": m2, "seq_id": 1, "sampling_session_seq_id": 0}),
    )
    .await;
    assert_eq!(eph.status, 200, "{}", String::from_utf8_lossy(&eph.body));
    let sc = post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": session, "sampling_session_seq_id": 1,
               "base_model": loraplex::config::DEFAULT_MODEL_NAME}),
    )
    .await
    .json();
    let sid = sc["sampling_session_id"].as_str().unwrap().to_owned();
    for seq in 0..3 {
        let a = post(
            &app,
            "/api/v1/asample",
            A,
            json!({"sampling_session_id": sid, "seq_id": seq,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": SEQ[..4]}]},
            "sampling_params": {"max_tokens": 1, "temperature": 0.0}}),
        )
        .await;
        assert_eq!(retrieve(&app, A, &request_id(&a)).await.status, 200);
    }
    // A sample on a checkpoint path alone makes a sampling session only for itself.
    let base = post(
        &app,
        "/api/v1/asample",
        A,
        json!({"base_model": loraplex::config::DEFAULT_MODEL_NAME,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": SEQ[..4]}]},
        "sampling_params": {"max_tokens": 1}}),
    )
    .await;
    assert_eq!(retrieve(&app, A, &request_id(&base)).await.status, 200);
    // The ephemeral sampler's job runs on its own; wait for it without reading it.
    let t = Instant::now();
    while state.engine.registry().num_sessions() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "ephemeral sampler never made"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state.tinker.samples.len(), 1);
    assert_eq!(state.engine.registry().num_sessions(), 2);
    let fin = post(
        &app,
        &format!("/api/v1/sessions/{session}/finish"),
        A,
        json!({}),
    )
    .await;
    assert_eq!(fin.status, 200);
    assert_eq!(
        state.engine.registry().num_sessions(),
        0,
        "samplers released"
    );
    assert_eq!(state.engine.registry().num_adapters(), 0, "models released");
    assert!(state.tinker.samples.is_empty() && state.tinker.sampler_paths.is_empty());
    assert!(state.tinker.sessions.is_empty());
    let usage = get(&app, "/api/v1/usage", A).await.json();
    assert_eq!(
        usage["sampling_sessions"]["used"], 0,
        "released samplers leave the tenant's quota: {usage}"
    );

    // Sessions are capped per tenant, and so is what a session keeps.
    for _ in 0..3 {
        let r = post(&app, "/api/v1/create_session", B, json!({})).await;
        assert_eq!(r.status, 200);
    }
    post(&app, "/api/v1/create_session", B, json!({}))
        .await
        .assert_error(400, "LORAPLEX_MAX_SESSIONS_PER_TENANT = 3");
    let big = "x".repeat(20_000);
    post(
        &app,
        "/api/v1/create_session",
        A,
        json!({"user_metadata": {"note": big}}),
    )
    .await
    .assert_error(400, "at most 16384");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_run_takes_its_ephemeral_samplers_with_it() {
    let (app, _) = app();
    let (_, model) = tinker_model(&app, A).await;
    // Two ephemeral samplers of the run (save_weights_and_get_sampling_client).
    let mut samplers = Vec::new();
    for seq in 1..=2 {
        let eph = post(
            &app,
            "/api/v1/save_weights_for_sampler",
            A,
            json!({"model_id": model, "seq_id": seq, "sampling_session_seq_id": seq}),
        )
        .await;
        let out = retrieve(&app, A, &request_id(&eph)).await.json();
        samplers.push(
            out["sampling_session_id"]
                .as_str()
                .expect("sampler")
                .to_owned(),
        );
    }
    let used = |u: Value| u["sampling_sessions"]["used"].as_u64();
    assert_eq!(used(get(&app, "/api/v1/usage", A).await.json()), Some(2));
    let un = post(&app, "/api/v1/unload_model", A, json!({"model_id": model})).await;
    assert_eq!(retrieve(&app, A, &request_id(&un)).await.status, 200);
    assert_eq!(
        used(get(&app, "/api/v1/usage", A).await.json()),
        Some(0),
        "the run's ephemeral samplers went with it"
    );
    get(&app, &format!("/api/v1/samplers/{}", samplers[0]), A)
        .await
        .assert_error(404, "not found");
}

/// asample's prompt extras over raw HTTP on SmolLM2: sparse target ids come back sparse,
/// alternative draws as `[len(prompt) - 1, k]` tensors, top-k prompt rows before
/// `prompt_logprobs_last_n` (and at position 0) are the SDK's empty slots (token 0,
/// -99999), a repeated prompt reports its cache hits; and every bad size or shape is a 400
/// naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asample_prompt_extras_and_their_refusals() {
    let (app, _) = app();
    let s = post(&app, "/api/v1/create_session", A, json!({}))
        .await
        .json();
    let session = s["session_id"].as_str().unwrap().to_owned();
    let sc = post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": session, "sampling_session_seq_id": 0,
               "base_model": loraplex::config::DEFAULT_MODEL_NAME}),
    )
    .await
    .json();
    let sid = sc["sampling_session_id"].as_str().unwrap().to_owned();
    let prompt = &SEQ[..8];
    let body = |extra: Value| {
        let mut b = json!({"sampling_session_id": sid, "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0.0, "stop": []}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let target = json!({"data": [7, 8], "dtype": "int64", "shape": [7, 2],
        "sparse_crow_indices": [0, 0, 0, 0, 0, 0, 1, 2], "sparse_col_indices": [1, 0]});
    let ok = body(json!({"prompt_logprobs": true, "topk_prompt_logprobs": 2,
        "prompt_logprobs_last_n": 2, "target_prompt_logprobs": target, "prompt_alt_tokens_k": 3}));
    let decode = |r: Resp| proto::SampleResponse::decode(r.body).expect("SampleResponse");
    let a = post(&app, "/api/v1/asample", A, ok.clone()).await.json();
    let sr = decode(retrieve(&app, A, a["request_id"].as_str().unwrap()).await);
    let t = sr.target_prompt_logprobs.expect("target_prompt_logprobs");
    assert_eq!(t.shape, vec![7, 2]);
    let Some(proto::tensor::Encoding::SparseCsr(c)) = t.encoding else {
        panic!("sparse in, sparse out")
    };
    assert_eq!(
        proto::read_i64("c", &c.crow_indices).unwrap(),
        vec![0, 0, 0, 0, 0, 0, 1, 2]
    );
    assert_eq!(proto::read_i64("c", &c.col_indices).unwrap(), vec![1, 0]);
    let vals = proto::read_f32("v", &c.values).unwrap();
    assert!(vals.len() == 2 && vals.iter().all(|v| v.is_finite() && *v < 0.0));
    let alt = sr.prompt_alt_tokens.expect("prompt_alt_tokens");
    let (toks, lps) = (alt.tokens.unwrap(), alt.logprobs.unwrap());
    assert_eq!((toks.shape, lps.shape), (vec![7, 3], vec![7, 3]));
    assert_eq!(toks.dtype, proto::DType::Int64 as i32);
    let top = sr.topk_prompt_logprobs.expect("topk_prompt_logprobs");
    assert_eq!((top.k, top.length), (2, 8));
    let ids = proto::read_i32("t", &top.token_ids).unwrap();
    let tl = proto::read_f32("t", &top.logprobs).unwrap();
    for row in 0..8 {
        let empty = (0..2).all(|j| ids[row * 2 + j] == 0 && tl[row * 2 + j] == -99999.0);
        assert_eq!(empty, row < 6, "row {row}: {:?}", &tl[row * 2..row * 2 + 2]);
    }
    // The same request again: its prompt up to the scored suffix comes from the cache.
    let b = post(
        &app,
        "/api/v1/asample",
        A,
        body(json!({"prompt_logprobs": true,
        "prompt_logprobs_last_n": 2})),
    )
    .await
    .json();
    let again = decode(retrieve(&app, A, b["request_id"].as_str().unwrap()).await);
    assert_eq!(again.prompt_cache_hit_tokens, 5);
    // Refusals, each naming its field.
    let refused = [
        (
            json!({"target_prompt_logprobs": {"data": [1.5], "dtype": "float32", "shape": [7, 1]}}),
            "target_prompt_logprobs",
        ),
        (
            json!({"target_prompt_logprobs": {"data": vec![1; 6], "dtype": "int64", "shape": [6, 1]}}),
            "target_prompt_logprobs",
        ),
        (
            json!({"target_prompt_logprobs": {"data": [1], "dtype": "int64", "shape": [7, 1u64 << 40],
            "sparse_crow_indices": [0, 0, 0, 0, 0, 0, 0, 1], "sparse_col_indices": [0]}}),
            "target_prompt_logprobs",
        ),
        (
            json!({"target_prompt_logprobs": {"data": [-5, 1, 1, 1, 1, 1, 1], "dtype": "int64", "shape": [7, 1]}}),
            "target_prompt_logprobs",
        ),
        (
            json!({"target_prompt_logprobs": {"data": [1, 2], "dtype": "int64", "shape": [7, 2],
            "sparse_crow_indices": [0, 2, 1, 1, 1, 1, 1, 2], "sparse_col_indices": [0, 1]}}),
            "target_prompt_logprobs",
        ),
        (
            json!({"target_prompt_logprobs": {"data": vec![-1; 7], "dtype": "int64", "shape": [7, 1]}}),
            "target_prompt_logprobs",
        ),
        (
            json!({"target_prompt_logprobs": {"data": vec![49152; 7], "dtype": "int64", "shape": [7, 1]}}),
            "target_prompt_logprobs",
        ),
        (json!({"prompt_alt_tokens_k": 65}), "prompt_alt_tokens_k"),
        (
            json!({"prompt_logprobs": true, "prompt_logprobs_last_n": 8}),
            "prompt_logprobs_last_n",
        ),
        (
            json!({"prompt_logprobs": true, "prompt_logprobs_last_n": 0}),
            "prompt_logprobs_last_n",
        ),
    ];
    for (extra, field) in refused {
        post(&app, "/api/v1/asample", A, body(extra.clone()))
            .await
            .assert_error(400, field);
    }
}
