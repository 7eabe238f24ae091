//! Operability: `/healthz`, Prometheus metrics at `/metrics`, and the OpenAPI document at
//! `/openapi.json`, built from [`ROUTES`], the one table of every route (a test checks
//! that each entry is really routed, so the document cannot drift from the router).

use super::Shared;
use crate::jobs::JobKind;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Every route: method, path, body kind, summary.
pub const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("post", "/api/v1/client/config", "json", "SDK feature flags"),
    (
        "post",
        "/api/v1/client/dynamic_config",
        "json",
        "SDK dynamic settings",
    ),
    (
        "post",
        "/api/v1/create_session",
        "json",
        "Open a Tinker session",
    ),
    (
        "post",
        "/api/v1/session_heartbeat",
        "json",
        "Keep a session alive (410 once closed)",
    ),
    (
        "post",
        "/api/v1/sessions/{id}/finish",
        "json",
        "Close a session and release its models",
    ),
    (
        "get",
        "/api/v1/sessions",
        "none",
        "The tenant's open sessions",
    ),
    (
        "get",
        "/api/v1/sessions/{id}",
        "none",
        "A session's models and samplers",
    ),
    ("post", "/api/v1/telemetry", "json", "Accepted and dropped"),
    (
        "get",
        "/api/v1/get_server_capabilities",
        "none",
        "Served base models",
    ),
    ("get", "/api/v1/healthz", "none", "Liveness"),
    (
        "post",
        "/api/v1/create_model",
        "json",
        "Create a LoRA training model (future)",
    ),
    (
        "post",
        "/api/v1/get_info",
        "json",
        "A training model's description",
    ),
    (
        "post",
        "/api/v1/forward_backward",
        "protobuf",
        "forward or forward_backward (future, protobuf result)",
    ),
    ("post", "/api/v1/optim_step", "json", "AdamW step (future)"),
    (
        "post",
        "/api/v1/save_weights",
        "json",
        "Save weights and optimizer state (future)",
    ),
    (
        "post",
        "/api/v1/save_weights_for_sampler",
        "json",
        "Save weights for sampling, or open an ephemeral sampler (future)",
    ),
    (
        "post",
        "/api/v1/load_weights",
        "json",
        "Load a checkpoint, or create a model from one (future)",
    ),
    (
        "post",
        "/api/v1/unload_model",
        "json",
        "Free a training model (future)",
    ),
    (
        "get",
        "/api/v1/training_runs",
        "none",
        "The tenant's training runs",
    ),
    (
        "get",
        "/api/v1/training_runs/{id}",
        "none",
        "One training run",
    ),
    (
        "get",
        "/api/v1/training_runs/{id}/checkpoints",
        "none",
        "A run's checkpoints",
    ),
    (
        "delete",
        "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}",
        "none",
        "Delete a checkpoint",
    ),
    (
        "put",
        "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/ttl",
        "json",
        "Set a checkpoint's time to live",
    ),
    (
        "get",
        "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/peft",
        "none",
        "Download a checkpoint's adapter as a PEFT .tar",
    ),
    (
        "get",
        "/api/v1/checkpoints",
        "none",
        "All the tenant's checkpoints",
    ),
    (
        "post",
        "/api/v1/weights_info",
        "json",
        "What a checkpoint holds",
    ),
    (
        "post",
        "/api/v1/create_sampling_session",
        "json",
        "Sampling session on the base model or a checkpoint",
    ),
    (
        "get",
        "/api/v1/samplers/{id}",
        "none",
        "A sampling session's description",
    ),
    (
        "post",
        "/api/v1/asample",
        "json",
        "Sample (future, protobuf result)",
    ),
    (
        "post",
        "/api/v1/retrieve_future",
        "json",
        "Long-poll a future",
    ),
    (
        "post",
        "/api/v1/plugins",
        "wasm",
        "Upload a wasm component; its id is its sha256",
    ),
    ("get", "/api/v1/plugins", "none", "The tenant's plugins"),
    ("get", "/api/v1/plugins/{id}", "none", "One plugin"),
    ("delete", "/api/v1/plugins/{id}", "none", "Delete a plugin"),
    (
        "get",
        "/api/v1/usage",
        "none",
        "The tenant's usage and limits, per quota",
    ),
    (
        "post",
        "/add_lora",
        "json",
        "REST: create an adapter (future holds model_id)",
    ),
    (
        "post",
        "/fwdbwd",
        "json",
        "REST: forward_backward on chat conversations (future holds loss)",
    ),
    ("post", "/optim_step", "json", "REST: AdamW step (future)"),
    (
        "post",
        "/retrieve_future",
        "json",
        "REST: 202 while pending, 200 with the result",
    ),
    ("post", "/remove_lora", "json", "REST: delete an adapter"),
    (
        "post",
        "/api/v1/sample",
        "json",
        "REST: synchronous text sampling",
    ),
    (
        "post",
        "/api/v1/add_lora_async",
        "json",
        "REST alias of /add_lora",
    ),
    (
        "post",
        "/api/v1/fwdbwd_async",
        "json",
        "REST alias of /fwdbwd",
    ),
    (
        "post",
        "/api/v1/optim_step_async",
        "json",
        "REST alias of /optim_step",
    ),
    (
        "post",
        "/api/v1/sample_async",
        "json",
        "REST: sampling as a future",
    ),
    (
        "post",
        "/api/v1/remove_lora",
        "json",
        "REST alias of /remove_lora",
    ),
    (
        "get",
        "/list_loss_functions",
        "none",
        "REST: built-in losses and the tenant's loss plugins",
    ),
    (
        "get",
        "/get_server_capabilities",
        "none",
        "REST: served base models",
    ),
    (
        "get",
        "/healthz",
        "none",
        "Liveness and whether the base model is loaded",
    ),
    ("get", "/metrics", "none", "Prometheus metrics"),
    ("get", "/openapi.json", "none", "This document"),
];

/// Routes that need no API key.
pub const PUBLIC: &[&str] = &[
    "/healthz",
    "/api/v1/healthz",
    "/metrics",
    "/openapi.json",
    "/get_server_capabilities",
    "/api/v1/get_server_capabilities",
    "/api/v1/client/config",
    "/api/v1/client/dynamic_config",
    "/api/v1/telemetry",
];

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

pub async fn healthz(State(s): State<Shared>) -> axum::Json<Value> {
    axum::Json(json!({
        "status": "ok",
        "model": s.model_name,
        "model_loaded": s.engine.registry().base_now().is_some(),
        "uptime_s": s.started.elapsed().as_secs(),
    }))
}

/// HTTP counters: requests by route and status, seconds spent, submissions by job kind.
#[derive(Default)]
pub struct HttpMetrics {
    requests: DashMap<(String, u16), (u64, f64)>,
    submitted: DashMap<JobKind, AtomicU64>,
    last_scrape: Mutex<Option<(Instant, u64)>>,
}

impl HttpMetrics {
    pub fn record(&self, route: String, status: u16, took: Duration) {
        let mut e = self.requests.entry((route, status)).or_default();
        e.0 += 1;
        e.1 += took.as_secs_f64();
    }

    pub fn submitted(&self, kind: JobKind) {
        self.submitted
            .entry(kind)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// A bounded label for a path: ids are folded away.
pub fn route_label(path: &str) -> String {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let known = |p: &str| ROUTES.iter().any(|r| r.1 == p);
    if known(path) {
        return path.to_owned();
    }
    match segs.as_slice() {
        ["api", "v1", first, ..]
            if ROUTES
                .iter()
                .any(|r| r.1.starts_with(&format!("/api/v1/{first}/"))) =>
        {
            format!("/api/v1/{first}/*")
        }
        _ => "other".to_owned(),
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let mut o = String::new();
    let m = &s.metrics;
    let _ = writeln!(o, "# HELP loraplex_http_requests_total HTTP requests by route and status.\n# TYPE loraplex_http_requests_total counter");
    let mut reqs: Vec<_> = m
        .requests
        .iter()
        .map(|e| (e.key().clone(), *e.value()))
        .collect();
    reqs.sort_by(|a, b| a.0.cmp(&b.0));
    for ((route, status), (n, _)) in &reqs {
        let _ = writeln!(
            o,
            "loraplex_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    let _ = writeln!(o, "# HELP loraplex_http_request_seconds_total Time spent answering, by route.\n# TYPE loraplex_http_request_seconds_total counter");
    for ((route, status), (_, secs)) in &reqs {
        let _ = writeln!(o, "loraplex_http_request_seconds_total{{route=\"{route}\",status=\"{status}\"}} {secs:.6}");
    }
    let _ = writeln!(o, "# HELP loraplex_jobs_submitted_total Jobs submitted through the API, by type.\n# TYPE loraplex_jobs_submitted_total counter");
    let mut kinds: Vec<_> = m
        .submitted
        .iter()
        .map(|e| (format!("{:?}", e.key()), e.value().load(Ordering::Relaxed)))
        .collect();
    kinds.sort();
    for (k, n) in kinds {
        let _ = writeln!(
            o,
            "loraplex_jobs_submitted_total{{type=\"{}\"}} {n}",
            snake(&k)
        );
    }
    let tenants = s.engine.all_tenant_metrics();
    let (mut queued, mut running, mut tokens) = (0i64, 0i64, 0u64);
    let _ = writeln!(o, "# HELP loraplex_tenant_jobs Jobs per tenant by state (queued and running are gauges, done and failed totals).\n# TYPE loraplex_tenant_jobs gauge");
    for (t, x) in &tenants {
        queued += x.queued;
        running += x.running;
        tokens += x.train_tokens + x.sampled_tokens;
        for (state, v) in [
            ("queued", x.queued),
            ("running", x.running),
            ("done", x.done as i64),
            ("failed", x.failed as i64),
        ] {
            let _ = writeln!(
                o,
                "loraplex_tenant_jobs{{tenant=\"{t}\",state=\"{state}\"}} {v}"
            );
        }
    }
    let _ = writeln!(o, "# HELP loraplex_tenant_tokens_total Tokens processed per tenant.\n# TYPE loraplex_tenant_tokens_total counter");
    for (t, x) in &tenants {
        let _ = writeln!(
            o,
            "loraplex_tenant_tokens_total{{tenant=\"{t}\",kind=\"train\"}} {}",
            x.train_tokens
        );
        let _ = writeln!(
            o,
            "loraplex_tenant_tokens_total{{tenant=\"{t}\",kind=\"sample\"}} {}",
            x.sampled_tokens
        );
    }
    let _ = writeln!(o, "# HELP loraplex_queue_depth Jobs waiting in the engine's queues.\n# TYPE loraplex_queue_depth gauge\nloraplex_queue_depth {queued}");
    let _ = writeln!(o, "# HELP loraplex_queued_bytes Request data held by queued training jobs.\n# TYPE loraplex_queued_bytes gauge\nloraplex_queued_bytes {}", s.engine.queued_bytes());
    let _ = writeln!(o, "# HELP loraplex_jobs_running Jobs running now.\n# TYPE loraplex_jobs_running gauge\nloraplex_jobs_running {running}");
    let rate = {
        let mut last = m.last_scrape.lock();
        let now = Instant::now();
        let r = match *last {
            Some((t, n)) if now > t => (tokens.saturating_sub(n)) as f64 / (now - t).as_secs_f64(),
            _ => 0.0,
        };
        *last = Some((now, tokens));
        r
    };
    let _ = writeln!(o, "# HELP loraplex_tokens_per_second Tokens processed per second since the previous scrape.\n# TYPE loraplex_tokens_per_second gauge\nloraplex_tokens_per_second {rate:.3}");
    let _ = writeln!(o, "# HELP loraplex_plugin_failures_total Jobs failed by a tenant's plugin.\n# TYPE loraplex_plugin_failures_total counter\nloraplex_plugin_failures_total {}", s.engine.plugin_failures());
    let _ = writeln!(o, "# HELP loraplex_models Training models held.\n# TYPE loraplex_models gauge\nloraplex_models {}", s.engine.registry().num_adapters());
    let _ = writeln!(o, "# HELP loraplex_sessions Open Tinker sessions.\n# TYPE loraplex_sessions gauge\nloraplex_sessions {}", s.tinker.sessions.len());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], o)
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn openapi_doc() -> Value {
    let mut paths = Map::new();
    for (method, path, body, summary) in ROUTES {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|n| json!({"name": n, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": summary,
            "parameters": params,
            "responses": {
                "200": {"description": "success"},
                "4XX": {"description": "the request is wrong", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "429": {"description": "busy: retry after Retry-After"},
            },
        });
        if !PUBLIC.contains(path) {
            op["security"] = json!([{"apiKey": []}]);
        }
        let ct = match *body {
            "json" => Some("application/json"),
            "protobuf" => Some("application/x-protobuf"),
            "wasm" => Some("application/wasm"),
            _ => None,
        };
        if let Some(ct) = ct {
            op["requestBody"] = json!({"required": true, "content": {ct: {}}});
        }
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "loraplex", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Multi-tenant LoRA training and sampling; Tinker-compatible."},
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": {"Error": {"type": "object", "properties": {
                "error": {"type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
                "detail": {"type": "string"}}}},
        },
    })
}

async fn openapi() -> axum::Json<Value> {
    axum::Json(openapi_doc())
}
