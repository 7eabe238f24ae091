//! What a hostile tenant sends, answered as a user error and costing nobody anything:
//! tensors whose shapes claim more memory than the request could legally use (the 100-byte
//! sparse tensor of shape `[1, 2^40]` that used to abort the whole process), every dtype,
//! dense and sparse; sampling requests over the configured size; conversations and prompts
//! too long for the context; plugins over the size cap. After each, the same tenant's good
//! requests still work.

mod common;

use common::http::*;
use loraplex::api::proto::{self, tensor};
use prost::Message;
use serde_json::json;
use std::collections::HashMap;

fn csr(dtype: proto::DType, shape: &[i64], crow: &[i64], col: &[i64], nnz: usize) -> proto::Tensor {
    let values = match dtype {
        proto::DType::Float32 => proto::write_f32(vec![1.0; nnz]),
        proto::DType::Int32 => proto::write_i32(vec![1; nnz]),
        _ => proto::write_i64(vec![1; nnz]),
    };
    proto::Tensor {
        encoding: Some(tensor::Encoding::SparseCsr(proto::SparseCsr {
            crow_indices: proto::write_i64(crow.iter().copied()),
            col_indices: proto::write_i64(col.iter().copied()),
            values,
        })),
        dtype: dtype as i32,
        shape: shape.to_vec(),
    }
}

fn dense(dtype: proto::DType, shape: &[i64], values: usize) -> proto::Tensor {
    let bytes = match dtype {
        proto::DType::Float32 => proto::write_f32(vec![1.0; values]),
        proto::DType::Int32 => proto::write_i32(vec![1; values]),
        _ => proto::write_i64(vec![1; values]),
    };
    proto::Tensor {
        encoding: Some(tensor::Encoding::Dense(bytes)),
        dtype: dtype as i32,
        shape: shape.to_vec(),
    }
}

/// A forward_backward whose one datum has `name` replaced by `t`.
fn hostile_fb(
    model: &str,
    seq: i32,
    name: &str,
    t: proto::Tensor,
) -> proto::ForwardBackwardRequest {
    let mut d = ce_datum();
    d.loss_fn_inputs.insert(name.to_owned(), t);
    proto::ForwardBackwardRequest {
        model_id: model.into(),
        seq_id: seq,
        data: vec![d],
        loss_fn: "cross_entropy".into(),
        forward_only: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_claiming_huge_shapes_fail_their_own_future_and_nothing_else() {
    let (app, _) = app();
    let (_, model) = tinker_model(&app, A).await;
    let n = (SEQ.len() - 1) as i64;
    use proto::DType::{Float32, Int32, Int64};

    // The report: about 100 bytes, shape [1, 2^40], no entries. Alone on the wire.
    let tiny = proto::ForwardBackwardRequest {
        model_id: model.clone(),
        seq_id: 1,
        data: vec![text_datum(
            &[504],
            &[("weights", csr(Float32, &[1, 1 << 40], &[0, 0], &[], 0))],
        )],
        loss_fn: "cross_entropy".into(),
        ..Default::default()
    };
    assert!(tiny.encode_to_vec().len() < 128, "the request stays tiny");
    let r = send_fb(&app, A, &tiny).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["request_id"].as_str().expect("id").to_owned();
    let f = retrieve(&app, A, &id).await.json();
    assert_eq!(f["category"], "user", "{f}");
    let msg = f["error"].as_str().unwrap_or_default();
    assert!(msg.contains("data[0].loss_fn_inputs.weights"), "{msg}");
    assert!(msg.contains("LORAPLEX_MAX_LOSS_INPUT_COLUMNS"), "{msg}");

    // Its family: every dtype, dense and sparse, overflowing and merely too large.
    let cases: Vec<(&str, proto::Tensor, &str)> = vec![
        (
            "weights",
            csr(Int64, &[n, 1 << 40], &vec![0; n as usize + 1], &[], 0),
            "values",
        ),
        (
            "weights",
            csr(Int32, &[n, 1 << 40], &vec![0; n as usize + 1], &[], 0),
            "values",
        ),
        (
            "weights",
            csr(Float32, &[1 << 32, 1 << 32], &[0, 0], &[], 0),
            "values",
        ),
        (
            "weights",
            csr(Float32, &[i64::MAX, 2], &[0, 0], &[], 0),
            "values",
        ),
        (
            "weights",
            csr(Float32, &[n, 2000], &vec![0; n as usize + 1], &[], 0),
            "values",
        ),
        (
            "target_tokens",
            csr(Int64, &[n, 1 << 33], &vec![0; n as usize + 1], &[], 0),
            "values",
        ),
        (
            "weights",
            dense(Float32, &[1 << 32, 1 << 32, 1 << 32], 0),
            "values",
        ),
        ("weights", dense(Float32, &[n, 1 << 40], 0), "values"),
        ("target_tokens", dense(Int64, &[n, 1 << 31], 0), "values"),
        ("target_tokens", dense(Int32, &[n, 1 << 31], 0), "values"),
        ("weights", dense(Float32, &[n, -1], 0), "negative"),
        (
            "weights",
            dense(Float32, &[1, 1, 1, 1, n], n as usize),
            "dimensions",
        ),
        (
            "weights",
            dense(Float32, &[n + 1], n as usize),
            "does not match",
        ),
        ("weights", csr(Float32, &[n, 4], &[0, 5], &[0], 1), "CSR"),
        (
            "weights",
            csr(Float32, &[n, 4], &vec![0; n as usize + 1], &[-1], 0),
            "CSR",
        ),
        (
            "weights",
            proto::Tensor {
                encoding: Some(tensor::Encoding::Dense(vec![0; 8])),
                dtype: 9,
                shape: vec![2],
            },
            "dtype",
        ),
    ];
    let mut seq = 2;
    for (name, t, needle) in cases {
        let shape = t.shape.clone();
        let r = send_fb(&app, A, &hostile_fb(&model, seq, name, t)).await;
        seq += 1;
        assert_eq!(
            r.status,
            200,
            "{shape:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let id = r.json()["request_id"].as_str().expect("id").to_owned();
        let f = retrieve(&app, A, &id).await.json();
        assert_eq!(f["category"], "user", "{shape:?}: {f}");
        let msg = f["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{shape:?}: {msg:?} should mention {needle:?}"
        );
        assert!(msg.contains(name), "{shape:?}: {msg:?} should name {name}");
    }

    // The model's order went on: a good request right after trains.
    let r = fb(
        &app,
        A,
        &model,
        seq,
        "cross_entropy",
        vec![ce_datum()],
        HashMap::new(),
    )
    .await;
    let out = fb_result(&app, A, &r).await;
    assert!(
        !out.loss_fn_outputs.is_empty(),
        "the good request after them ran"
    );

    // A legal sparse [N, K] target still densifies.
    let k = 2i64;
    let mut crow = vec![0i64];
    let mut col = Vec::new();
    for i in 0..n {
        col.push(i % k);
        crow.push(i + 1);
    }
    let mut d = ce_datum();
    d.loss_fn_inputs.insert(
        "weights".into(),
        csr(Float32, &[n, 1], &crow, &vec![0; n as usize], n as usize),
    );
    let req = proto::ForwardBackwardRequest {
        model_id: model.clone(),
        seq_id: seq + 1,
        data: vec![d],
        loss_fn: "cross_entropy".into(),
        ..Default::default()
    };
    let r = send_fb(&app, A, &req).await;
    let out = fb_result(&app, A, &r).await;
    assert!(
        !out.loss_fn_outputs.is_empty(),
        "a legal sparse input works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cannot_decode_past_the_configured_total() {
    let (app, state) = app_with_cfg(|c| {
        c.max_loss_input_values = 20;
    });
    assert_eq!(state.cfg.max_loss_input_values, 20);
    let (_, model) = tinker_model(&app, A).await;
    // Two datums of 11 tokens, two inputs each: 44 values > 20.
    let req = proto::ForwardBackwardRequest {
        model_id: model.clone(),
        seq_id: 1,
        data: vec![ce_datum(), ce_datum()],
        loss_fn: "cross_entropy".into(),
        ..Default::default()
    };
    let r = send_fb(&app, A, &req).await;
    let id = r.json()["request_id"].as_str().expect("id").to_owned();
    let f = retrieve(&app, A, &id).await.json();
    assert_eq!(f["category"], "user", "{f}");
    let msg = f["error"].as_str().unwrap_or_default();
    assert!(msg.contains("LORAPLEX_MAX_LOSS_INPUT_VALUES"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_text_and_plugin_sizes_are_bounded_and_named() {
    let (app, _) = app();
    // num_samples × (prompt + max_tokens) over LORAPLEX_MAX_SAMPLE_TOKENS (262144):
    // 128 × (6 + 2100) = 269568.
    let s = post(
        &app,
        "/api/v1/create_session",
        A,
        json!({"tags": [], "sdk_version": "0.38.0", "type": "create_session"}),
    )
    .await;
    let session = s.json()["session_id"].as_str().expect("session").to_owned();
    let c = post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": session, "sampling_session_seq_id": 0,
               "base_model": loraplex::config::DEFAULT_MODEL_NAME, "type": "create_sampling_session"}),
    )
    .await;
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    let sampler = c.json()["sampling_session_id"]
        .as_str()
        .expect("sampler")
        .to_owned();
    let big = post(
        &app,
        "/api/v1/asample",
        A,
        json!({"sampling_session_id": sampler, "seq_id": 0, "num_samples": 128,
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": [504, 2365, 314, 260, 1345, 28]}]},
               "sampling_params": {"max_tokens": 2100, "temperature": 1.0}, "type": "sample"}),
    )
    .await;
    let v = if big.status == 200 {
        let id = big.json()["request_id"].as_str().expect("id").to_owned();
        let f = retrieve(&app, A, &id).await.json();
        assert_eq!(f["category"], "user", "{f}");
        f["error"].as_str().unwrap_or_default().to_owned()
    } else {
        big.assert_error(400, "LORAPLEX_MAX_SAMPLE_TOKENS");
        big.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        v.contains("LORAPLEX_MAX_SAMPLE_TOKENS") && v.contains("262144"),
        "{v}"
    );

    // REST: a conversation of too many messages, a prompt longer than the context could
    // hold, too many prompts.
    let add = post(&app, "/add_lora", A, json!({"rank": 4})).await;
    assert_eq!(add.status, 200);
    let model = add.json()["model_id"].as_str().expect("model").to_owned();
    let msgs: Vec<_> = (0..300)
        .map(|i| json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": "hi"}))
        .collect();
    post(
        &app,
        "/fwdbwd",
        A,
        json!({"model_id": model, "data": [msgs]}),
    )
    .await
    .assert_error(400, "at most 256");
    let long = "a".repeat(9 << 20);
    post(
        &app,
        "/fwdbwd",
        A,
        json!({"model_id": model, "data": [[{"role": "user", "content": long}]]}),
    )
    .await
    .assert_error(400, "cannot fit the context");
    post(
        &app,
        "/api/v1/sample",
        A,
        json!({"prompts": [long], "sampling_params": {"max_tokens": 1}}),
    )
    .await
    .assert_error(400, "prompts[0]");
    let many: Vec<&str> = vec!["hi"; 129];
    post(
        &app,
        "/api/v1/sample",
        A,
        json!({"prompts": many, "sampling_params": {"max_tokens": 1}}),
    )
    .await
    .assert_error(400, "at most 128");

    // A plugin over the cap is a JSON 413 naming the limit.
    let r = call(
        &app,
        axum::http::Method::POST,
        "/api/v1/plugins",
        Some(A),
        "application/wasm",
        vec![0u8; (32 << 20) + 1],
    )
    .await;
    r.assert_error(413, &(32usize << 20).to_string());

    // The same tenant's ordinary work still runs.
    let ok = post(
        &app,
        "/fwdbwd",
        A,
        json!({"model_id": model, "data": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]}),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
}
