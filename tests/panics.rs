//! A panic fails only what it happened in. Failpoints (`loraplex::failpoint`) inject one in
//! a request handler, a training batch, a decoding step and a job that runs as its own task;
//! each time the request or job fails (500 JSON body; future failed with category
//! `server`) and the next request of the same kind, on the same lane, succeeds.
//!
//! Failpoints are process-wide, so this binary holds a single test that arms them in turn.

mod common;

use common::http::*;
use loraplex::failpoint;
use serde_json::json;
use std::collections::HashMap;

/// Submit a sample of 2 tokens on `sampler` at `seq`; its future's answer.
async fn sample(app: &axum::Router, sampler: &str, seq: u64) -> Resp {
    let r = post(
        app,
        "/api/v1/asample",
        A,
        json!({"sampling_session_id": sampler, "seq_id": seq, "num_samples": 1,
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": [504, 2365, 314]}]},
               "sampling_params": {"max_tokens": 2}, "type": "sample"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["request_id"].as_str().expect("id").to_owned();
    retrieve(app, A, &id).await
}

fn is_proto(r: &Resp) -> bool {
    r.headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-protobuf"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_its_own_request_or_job_and_everything_goes_on() {
    let (app, _) = app();
    let (session, model) = tinker_model(&app, A).await;

    // 1. A handler: 500 with a JSON body, then the same request is answered.
    failpoint::arm("api.request", 1);
    let r = get(&app, "/api/v1/sessions", A).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "internal", "{}", r.json());
    assert_eq!(failpoint::remaining("api.request"), 0);
    assert_eq!(get(&app, "/api/v1/sessions", A).await.status, 200);
    let m = call(
        &app,
        axum::http::Method::GET,
        "/metrics",
        None,
        "",
        Vec::new(),
    )
    .await;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    assert!(
        text.contains("route=\"/api/v1/sessions\",status=\"500\"} 1"),
        "the 500 is counted"
    );

    // 2. A training batch on the worker lane: the future fails as a server error, then
    //    the lane runs the model's next request.
    failpoint::arm("job.batch", 1);
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
    let id = r.json()["request_id"].as_str().expect("id").to_owned();
    let f = retrieve(&app, A, &id).await.json();
    assert_eq!(f["category"], "server", "{f}");
    let r = fb(
        &app,
        A,
        &model,
        2,
        "cross_entropy",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await;
    let out = fb_result(&app, A, &r).await;
    assert!(!out.loss_fn_outputs.is_empty(), "the lane kept working");

    // 3. A decoding step of the sampling lane.
    let c = post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": session, "sampling_session_seq_id": 0,
               "base_model": loraplex::config::DEFAULT_MODEL_NAME}),
    )
    .await;
    let sampler = c.json()["sampling_session_id"]
        .as_str()
        .expect("sampler")
        .to_owned();
    failpoint::arm("job.sample_step", 1);
    let r = sample(&app, &sampler, 0).await;
    assert!(!is_proto(&r));
    assert_eq!(r.json()["category"], "server", "{}", r.json());
    let r = sample(&app, &sampler, 1).await;
    assert!(
        is_proto(&r),
        "the sampling lane kept working: {}",
        String::from_utf8_lossy(&r.body)
    );

    // 4. A job that runs as its own task (creating a model).
    failpoint::arm("job.task", 1);
    let create = |seq: u64| {
        json!({"session_id": session, "model_seq_id": seq, "base_model": loraplex::config::DEFAULT_MODEL_NAME,
               "lora_config": {"rank": 2}})
    };
    let c = post(&app, "/api/v1/create_model", A, create(1)).await;
    let id = c.json()["request_id"].as_str().expect("id").to_owned();
    assert_eq!(retrieve(&app, A, &id).await.json()["category"], "server");
    let c = post(&app, "/api/v1/create_model", A, create(2)).await;
    let id = c.json()["request_id"].as_str().expect("id").to_owned();
    let v = retrieve(&app, A, &id).await.json();
    assert!(v["model_id"].is_string(), "{v}");
}
