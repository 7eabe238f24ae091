//! The HTTP API in process: the router on the shipped SmolLM2 with a fresh engine, and
//! small clients for JSON and protobuf requests and Tinker futures.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use loraplex::api::proto::{self, chunk, tensor};
use loraplex::api::{AppState, Shared};
use loraplex::auth::Auth;
use loraplex::config::{EngineConfig, PluginLimits, ServeConfig};
use loraplex::jobs::Engine;
use loraplex::model::BaseModel;
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tower::ServiceExt;

pub const A: &str = "tml-alice";
pub const B: &str = "tml-bob";

pub fn app_with(max_body: usize) -> (Router, Shared) {
    app_with_cfg(|c| c.max_body_bytes = max_body)
}

/// The shipped SmolLM2, loaded once per test binary and shared by its engines.
pub fn smollm2_arc() -> Arc<BaseModel> {
    static M: std::sync::OnceLock<Arc<BaseModel>> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        loraplex::config::init_compute_threads();
        Arc::new(
            BaseModel::load(
                &super::model_path(),
                loraplex::config::DEFAULT_MODEL_NAME,
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )
            .expect("load SmolLM2 (run scripts/fetch-model.sh)"),
        )
    })
    .clone()
}

/// The router on a fresh engine, with the test defaults changed by `f`.
pub fn app_with_cfg(f: impl FnOnce(&mut ServeConfig)) -> (Router, Shared) {
    let engine = Engine::with_model(EngineConfig::default(), smollm2_arc()).expect("engine");
    app_on(engine, f)
}

/// The router on `engine` (in memory, development keys), with the test defaults changed
/// by `f`.
pub fn app_on(engine: Engine, f: impl FnOnce(&mut ServeConfig)) -> (Router, Shared) {
    let dir = std::env::temp_dir().join(format!(
        "loraplex-api-{}-{}",
        std::process::id(),
        loraplex::jobs::FutureId::generate()
    ));
    let mut cfg = ServeConfig::for_tests(dir);
    cfg.long_poll_ms = 2_000;
    f(&mut cfg);
    let state = AppState::new(
        engine,
        cfg,
        Auth::Development,
        PluginLimits::default(),
        None,
    )
    .expect("state");
    (loraplex::api::router(state.clone()), state)
}

pub fn app() -> (Router, Shared) {
    app_with(32 << 20)
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn ok(&self) -> Value {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    /// A refusal of `kind` with `status` whose message names `quota` and its `limit`.
    pub fn assert_quota(&self, status: u16, kind: &str, quota: &str, limit: u64) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["error"]["type"], kind, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(quota) && msg.contains(&format!("limited to {limit} ")),
            "message {msg:?} should name {quota} and its limit {limit}"
        );
        if status == 429 {
            let secs: u64 = self
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("a 429 carries Retry-After");
            assert!(secs >= 1);
            assert!(self.headers.contains_key("retry-after-ms"));
        } else {
            assert!(!self.headers.contains_key("retry-after"));
        }
    }

    /// A 4xx whose JSON body names the problem (and carries a Content-Length).
    pub fn assert_error(&self, status: u16, needle: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "error message {msg:?} should mention {needle:?}"
        );
        assert_eq!(v["detail"].as_str(), Some(msg));
        assert!(
            self.headers.contains_key("content-length"),
            "errors carry Content-Length"
        );
    }
}

pub async fn call(
    app: &Router,
    method: Method,
    path: &str,
    key: Option<&str>,
    ct: &str,
    body: Vec<u8>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    if !ct.is_empty() {
        req = req.header("content-type", ct);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn post(app: &Router, path: &str, key: &str, v: Value) -> Resp {
    call(
        app,
        Method::POST,
        path,
        Some(key),
        "application/json",
        v.to_string().into_bytes(),
    )
    .await
}

pub async fn get(app: &Router, path: &str, key: &str) -> Resp {
    call(app, Method::GET, path, Some(key), "", Vec::new()).await
}

/// Long-poll a Tinker future until it is no longer `try_again`.
pub async fn retrieve(app: &Router, key: &str, id: &str) -> Resp {
    for _ in 0..100 {
        let r = post(
            app,
            "/api/v1/retrieve_future",
            key,
            json!({"request_id": id, "allow_metadata_only": false}),
        )
        .await;
        let is_proto = r
            .headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-protobuf"));
        if is_proto || r.status != StatusCode::OK || r.json()["type"] != "try_again" {
            return r;
        }
    }
    panic!("future {id} never finished");
}

pub fn text_datum(tokens: &[i32], inputs: &[(&str, proto::Tensor)]) -> proto::Datum {
    proto::Datum {
        model_input: vec![proto::Chunk {
            chunk: Some(chunk::Chunk::EncodedText(proto::EncodedTextChunk {
                tokens: proto::write_i32(tokens.iter().copied()),
            })),
        }],
        loss_fn_inputs: inputs
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect(),
        ..Default::default()
    }
}

pub fn f32_tensor(v: &[f32]) -> proto::Tensor {
    proto::Tensor {
        encoding: Some(tensor::Encoding::Dense(proto::write_f32(v.iter().copied()))),
        dtype: proto::DType::Float32 as i32,
        shape: vec![v.len() as i64],
    }
}

pub fn i64_tensor(v: &[i64]) -> proto::Tensor {
    proto::Tensor {
        encoding: Some(tensor::Encoding::Dense(proto::write_i64(v.iter().copied()))),
        dtype: proto::DType::Int64 as i32,
        shape: vec![v.len() as i64],
    }
}

pub const SEQ: [i32; 12] = [504, 2365, 314, 260, 1345, 28, 2365, 314, 260, 6152, 30, 378];

pub fn ce_datum() -> proto::Datum {
    let n = SEQ.len() - 1;
    text_datum(
        &SEQ[..n],
        &[
            (
                "target_tokens",
                i64_tensor(&SEQ[1..].iter().map(|&t| t as i64).collect::<Vec<_>>()),
            ),
            ("weights", f32_tensor(&vec![1.0; n])),
        ],
    )
}

pub async fn fb(
    app: &Router,
    key: &str,
    model: &str,
    seq: i32,
    loss: &str,
    data: Vec<proto::Datum>,
    cfg: HashMap<String, proto::LossConfigValue>,
) -> Resp {
    let req = proto::ForwardBackwardRequest {
        model_id: model.into(),
        seq_id: seq,
        data,
        loss_fn: loss.into(),
        loss_fn_config_v2: cfg,
        forward_only: false,
        ..Default::default()
    };
    send_fb(app, key, &req).await
}

pub async fn send_fb(app: &Router, key: &str, req: &proto::ForwardBackwardRequest) -> Resp {
    call(
        app,
        Method::POST,
        "/api/v1/forward_backward",
        Some(key),
        "application/x-protobuf",
        req.encode_to_vec(),
    )
    .await
}

/// The protobuf result of a forward_backward submitted as `r`.
pub async fn fb_result(app: &Router, key: &str, r: &Resp) -> proto::ForwardBackwardOutput {
    let id = r.json()["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    proto::ForwardBackwardOutput::decode(retrieve(app, key, &id).await.body)
        .expect("ForwardBackwardOutput")
}

/// A session and a trained-from-zero model; returns (session, model id).
pub async fn tinker_model(app: &Router, key: &str) -> (String, String) {
    let s = post(
        app,
        "/api/v1/create_session",
        key,
        json!({"tags": [], "sdk_version": "0.38.0", "type": "create_session"}),
    )
    .await;
    assert_eq!(s.status, 200);
    let session = s.json()["session_id"]
        .as_str()
        .expect("session id")
        .to_owned();
    let c = post(
        app,
        "/api/v1/create_model",
        key,
        json!({"session_id": session, "model_seq_id": 0, "base_model": loraplex::config::DEFAULT_MODEL_NAME,
               "lora_config": {"rank": 4, "train_mlp": true, "train_attn": true, "train_unembed": false}, "type": "create_model"}),
    )
    .await;
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    let f = c.json()["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    let r = retrieve(app, key, &f).await.json();
    let model = r["model_id"].as_str().expect("model id").to_owned();
    assert_eq!(model, format!("{session}:train:0"));
    (session, model)
}

/// A fresh directory under the system's temp dir, unique per process and call.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "loraplex-{tag}-{}-{}",
        std::process::id(),
        loraplex::jobs::FutureId::generate()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server on a data directory (database, checkpoint files), as `loraplex serve` builds
/// it, on a runtime of its own so that it can be dropped and built again (a restart).
pub struct DurableApp {
    pub rt: tokio::runtime::Runtime,
    pub app: Router,
    pub state: Shared,
}

pub fn durable_app(data: &std::path::Path, f: impl FnOnce(&mut ServeConfig)) -> DurableApp {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut serve = ServeConfig::for_tests(data.to_owned());
    serve.long_poll_ms = 2_000;
    f(&mut serve);
    let model = loraplex::config::ModelArgs {
        model_path: super::model_path(),
        model_name: loraplex::config::DEFAULT_MODEL_NAME.into(),
        base_dtype: Default::default(),
    };
    let (state, app) = rt
        .block_on(loraplex::api::build(serve, model, EngineConfig::default()))
        .expect("build");
    DurableApp { rt, app, state }
}
