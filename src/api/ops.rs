//! Operability: `/healthz`, Prometheus metrics at `/metrics` (requests labelled by the
//! routes of [`super::routes::ROUTES`]), and the OpenAPI document at `/openapi.json`
//! ([`super::openapi`], built from the same table as the router).

use super::routes::ROUTES;
use super::Shared;
use crate::jobs::JobKind;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `model` is the default base; `models` every served base and whether it is loaded;
/// `model_loaded` is true once all are.
pub async fn healthz(State(s): State<Shared>) -> axum::Json<Value> {
    let bases = s.engine.registry().bases_now();
    let models: Vec<Value> = bases
        .iter()
        .map(|(name, m)| json!({"name": name, "loaded": m.is_some()}))
        .collect();
    axum::Json(json!({
        "status": "ok",
        "model": s.engine.registry().default_base(),
        "models": models,
        "model_loaded": bases.iter().all(|(_, m)| m.is_some()),
        "uptime_s": s.started.elapsed().as_secs(),
    }))
}

/// HTTP counters: requests by route and status, seconds spent, submissions by job kind.
/// Bounded: routes are labelled by [`route_label`] (the route table, a prefix with `*`, or
/// `other`), statuses by what the server answers, kinds by [`JobKind`].
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
    let known = |p: &str| ROUTES.iter().any(|r| r.path == p);
    if known(path) {
        return path.to_owned();
    }
    match segs.as_slice() {
        ["api", "v1", first, ..]
            if ROUTES
                .iter()
                .any(|r| r.path.starts_with(&format!("/api/v1/{first}/"))) =>
        {
            format!("/api/v1/{first}/*")
        }
        // The web console's pages, as one label (their ids stay out of the label set).
        ["console", ..] => "/console/*".to_owned(),
        _ => "other".to_owned(),
    }
}

pub(crate) async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
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
    let mut tenants: Vec<(String, crate::jobs::TenantMetrics)> = s
        .engine
        .all_tenant_metrics()
        .into_iter()
        .map(|(t, m)| (t.0, m))
        .collect();
    // Tenants past LORAPLEX_MAX_METRIC_TENANTS, folded into one label when idle.
    let folded = s.engine.folded_tenant_metrics();
    if folded != Default::default() {
        tenants.push(("_other".into(), folded));
    }
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
    residency_metrics(&mut o, &s);
    base_metrics(&mut o, &s);
    let _ = writeln!(o, "# HELP loraplex_sessions Open Tinker sessions.\n# TYPE loraplex_sessions gauge\nloraplex_sessions {}", s.tinker.sessions.len());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], o)
}

/// The adapter residency manager: what is in memory against the budget, loads and
/// evictions, how long loads take.
fn residency_metrics(o: &mut String, s: &Shared) {
    let res = s.engine.registry().residency();
    let snap = res.snapshot();
    let st = &res.stats;
    let _ = writeln!(o, "# HELP loraplex_resident_adapters Training runs whose adapter is in memory.\n# TYPE loraplex_resident_adapters gauge\nloraplex_resident_adapters {}", snap.resident);
    let _ = writeln!(o, "# HELP loraplex_resident_snapshots Sampling sessions whose weights (snapshot) are in memory.\n# TYPE loraplex_resident_snapshots gauge\nloraplex_resident_snapshots {}", snap.snapshots);
    let _ = writeln!(o, "# HELP loraplex_resident_adapter_bytes Bytes of resident adapters (weights, moments, gradients) and sampling snapshots, loads in progress included.\n# TYPE loraplex_resident_adapter_bytes gauge\nloraplex_resident_adapter_bytes {}", snap.bytes);
    let _ = writeln!(o, "# HELP loraplex_adapter_memory_budget_bytes The adapter-memory budget (--adapter-memory).\n# TYPE loraplex_adapter_memory_budget_bytes gauge\nloraplex_adapter_memory_budget_bytes {}", snap.budget);
    let _ = writeln!(o, "# HELP loraplex_pinned_adapters Resident adapters in use by queued or running work.\n# TYPE loraplex_pinned_adapters gauge\nloraplex_pinned_adapters {}", snap.pinned);
    let _ = writeln!(o, "# HELP loraplex_adapter_loads_total Adapters and sampling snapshots loaded from disk.\n# TYPE loraplex_adapter_loads_total counter\nloraplex_adapter_loads_total {}", st.loads.load(std::sync::atomic::Ordering::Relaxed));
    let _ = writeln!(o, "# HELP loraplex_adapter_evictions_total Adapters and sampling snapshots evicted from memory.\n# TYPE loraplex_adapter_evictions_total counter\nloraplex_adapter_evictions_total {}", st.evictions.load(std::sync::atomic::Ordering::Relaxed));
    let _ = writeln!(o, "# HELP loraplex_adapter_write_backs_total Evictions that wrote state first: steps not yet in an automatic checkpoint, or a sampling snapshot on its first eviction.\n# TYPE loraplex_adapter_write_backs_total counter\nloraplex_adapter_write_backs_total {}", st.write_backs.load(std::sync::atomic::Ordering::Relaxed));
    let (buckets, sum) = st.load_histogram();
    let _ = writeln!(o, "# HELP loraplex_adapter_load_seconds Time to load a cold adapter (waiting for memory included).\n# TYPE loraplex_adapter_load_seconds histogram");
    for (le, n) in crate::jobs::residency::LOAD_BUCKETS.iter().zip(&buckets) {
        let _ = writeln!(o, "loraplex_adapter_load_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let count = buckets.last().copied().unwrap_or(0);
    let _ = writeln!(
        o,
        "loraplex_adapter_load_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        o,
        "loraplex_adapter_load_seconds_sum {sum:.6}\nloraplex_adapter_load_seconds_count {count}"
    );
}

/// Per served base model: the memory its frozen weights take (0 until loaded), and the
/// training runs on it.
fn base_metrics(o: &mut String, s: &Shared) {
    let reg = s.engine.registry();
    let _ = writeln!(o, "# HELP loraplex_base_model_weight_bytes Memory the frozen weights of each served base model take (0: not loaded yet).\n# TYPE loraplex_base_model_weight_bytes gauge");
    for (name, m) in reg.bases_now() {
        let bytes = m.map_or(0, |m| m.weight_bytes());
        let _ = writeln!(
            o,
            "loraplex_base_model_weight_bytes{{base=\"{}\"}} {bytes}",
            label(&name)
        );
    }
    let _ = writeln!(o, "# HELP loraplex_base_model_training_runs Loaded training runs per base model.\n# TYPE loraplex_base_model_training_runs gauge");
    for (name, n) in reg.runs_per_base() {
        let _ = writeln!(
            o,
            "loraplex_base_model_training_runs{{base=\"{}\"}} {n}",
            label(&name)
        );
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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

pub(crate) async fn openapi() -> axum::Json<Value> {
    axum::Json(super::openapi::openapi_doc())
}
