//! The operator view, `/console/operator` (operator keys only, [`super::login::Operator`]):
//! every tenant's jobs and tokens, queue depth, tokens per second over the last hour,
//! batch composition (how many adapters shared a pass), plugin failures and recent
//! failed requests, from the counters the engine and the HTTP layer keep already.
//!
//! [`OpsHistory`] holds what the counters do not: a throughput sample every
//! [`SAMPLE_EVERY`] (the last [`MAX_SAMPLES`]) and the last [`MAX_ERRORS`] failed
//! requests. Both are fixed-size rings.

use super::chart::{self, ChartOpts};
use super::login::Operator;
use super::{page, ConsoleError};
use crate::api::Shared;
use axum::extract::State;
use axum::response::Html;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// How often throughput is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Throughput samples kept (an hour at [`SAMPLE_EVERY`]).
pub const MAX_SAMPLES: usize = 360;
/// Failed requests remembered.
pub const MAX_ERRORS: usize = 50;

#[derive(Debug, Clone)]
struct FailedRequest {
    at: SystemTime,
    method: String,
    route: String,
    status: u16,
}

/// Throughput samples and recent failed requests.
#[derive(Default)]
pub struct OpsHistory {
    /// (when, tokens per second since the previous sample).
    samples: Mutex<VecDeque<(SystemTime, f64)>>,
    last_total: Mutex<Option<(std::time::Instant, u64)>>,
    errors: Mutex<VecDeque<FailedRequest>>,
}

impl OpsHistory {
    /// Record a request answered with a 5xx, or a 4xx other than 404 (an unknown id or
    /// route is routine for long-polling clients and scanners).
    pub fn request_failed(&self, method: &str, route: String, status: u16) {
        if status < 400 || status == 404 {
            return;
        }
        let mut e = self.errors.lock();
        if e.len() >= MAX_ERRORS {
            e.pop_front();
        }
        e.push_back(FailedRequest {
            at: SystemTime::now(),
            method: method.to_owned(),
            route,
            status,
        });
    }

    /// Take a throughput sample from the running total of tokens processed.
    pub fn sample(&self, total_tokens: u64) {
        let now = std::time::Instant::now();
        let mut last = self.last_total.lock();
        if let Some((t, n)) = *last {
            let secs = now.duration_since(t).as_secs_f64();
            if secs > 0.0 {
                let rate = total_tokens.saturating_sub(n) as f64 / secs;
                let mut s = self.samples.lock();
                if s.len() >= MAX_SAMPLES {
                    s.pop_front();
                }
                s.push_back((SystemTime::now(), rate));
            }
        }
        *last = Some((now, total_tokens));
    }
}

/// Tokens processed by every tenant so far (folded tenants included).
fn total_tokens(s: &Shared) -> u64 {
    let folded = s.engine.folded_tenant_metrics();
    s.engine
        .all_tenant_metrics()
        .iter()
        .map(|(_, m)| m.train_tokens + m.sampled_tokens)
        .sum::<u64>()
        + folded.train_tokens
        + folded.sampled_tokens
}

/// Sample throughput every [`SAMPLE_EVERY`] for as long as the server runs.
pub async fn sample_throughput(s: Shared) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        s.console.ops.sample(total_tokens(&s));
    }
}

/// Adapter residency (#15): what is in memory against `--adapter-memory`, loads,
/// evictions and write-backs, and cold-load latency percentiles over the latest loads.
fn residency(s: &Shared) -> Option<Vec<Value>> {
    use std::sync::atomic::Ordering::Relaxed;
    let res = s.engine.registry().residency();
    let snap = res.snapshot();
    let st = &res.stats;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let mut loads = st.recent_loads();
    loads.sort_by(f64::total_cmp);
    let pct = |q: f64| -> String {
        if loads.is_empty() {
            return "-".into();
        }
        let i = ((loads.len() - 1) as f64 * q).round() as usize;
        format!("{:.3} s", loads[i.min(loads.len() - 1)])
    };
    let row = |name: &str, value: String| json!({ "name": name, "value": value });
    Some(vec![
        row("resident adapters", snap.resident.to_string()),
        row("resident sampling snapshots", snap.snapshots.to_string()),
        row("in use (pinned)", snap.pinned.to_string()),
        row(
            "resident bytes / budget",
            format!("{} / {}", mib(snap.bytes), mib(snap.budget)),
        ),
        row("peak resident bytes", mib(snap.peak_bytes)),
        row(
            "evicts to disk",
            if res.spills() { "yes" } else { "no (no store)" }.into(),
        ),
        row("loads from disk", st.loads.load(Relaxed).to_string()),
        row("evictions", st.evictions.load(Relaxed).to_string()),
        row("write-backs", st.write_backs.load(Relaxed).to_string()),
        row("cold load p50", pct(0.5)),
        row("cold load p99", pct(0.99)),
    ])
}

/// `GET /console/operator`.
pub async fn view(
    State(s): State<Shared>,
    Operator(l): Operator,
) -> Result<Html<String>, ConsoleError> {
    let s = &s;
    let mut tenants: Vec<Value> = s
        .engine
        .all_tenant_metrics()
        .into_iter()
        .map(|(t, m)| {
            let (runs, samplers) = s.engine.registry().usage(&t);
            json!({
                "tenant": t.0, "queued": m.queued, "running": m.running, "done": m.done,
                "failed": m.failed, "train_tokens": m.train_tokens, "sampled_tokens": m.sampled_tokens,
                "runs": runs, "samplers": samplers,
            })
        })
        .collect();
    let folded = s.engine.folded_tenant_metrics();
    if folded != Default::default() {
        tenants.push(json!({
            "tenant": "(others, folded)", "queued": folded.queued, "running": folded.running,
            "done": folded.done, "failed": folded.failed, "train_tokens": folded.train_tokens,
            "sampled_tokens": folded.sampled_tokens,
        }));
    }
    let queued: i64 = tenants.iter().filter_map(|t| t["queued"].as_i64()).sum();
    let running: i64 = tenants.iter().filter_map(|t| t["running"].as_i64()).sum();
    let samples: Vec<(SystemTime, f64)> = s.console.ops.samples.lock().iter().copied().collect();
    let t0 = samples
        .first()
        .map(|x| x.0)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .map(|(t, r)| {
            let secs = t.duration_since(t0).unwrap_or_default().as_secs_f64();
            (secs / 60.0, *r)
        })
        .collect();
    let tps = chart::line_chart(
        "tokens-per-second",
        "Tokens per second (train and sample)",
        "minutes since the first sample",
        &pts,
        ChartOpts {
            log_y: false,
            smooth: 0.0,
        },
    );
    let batches: Vec<Value> = s
        .engine
        .batch_shapes()
        .into_iter()
        .map(|(label, n, tokens)| json!({"adapters": label, "batches": n, "tokens": tokens}))
        .collect();
    let errors: Vec<Value> = s
        .console
        .ops
        .errors
        .lock()
        .iter()
        .rev()
        .map(|e| {
            json!({
                "at": crate::api::tinker::rfc3339(e.at),
                "method": e.method, "route": e.route, "status": e.status,
            })
        })
        .collect();
    let bases: Vec<Value> = s
        .engine
        .registry()
        .bases_now()
        .into_iter()
        .map(|(name, m)| {
            json!({"name": name, "loaded": m.is_some(), "weight_bytes": m.map(|m| m.weight_bytes())})
        })
        .collect();
    page(
        "operator.html",
        minijinja::context! {
            title => "Operator",
            nav => "operator",
            tenant => l.tenant.0,
            operator => true,
            csrf => l.csrf,
            tenants => tenants,
            queued => queued,
            running => running,
            queued_bytes => s.engine.queued_bytes(),
            models => s.engine.registry().num_adapters(),
            sessions => s.tinker.sessions.len(),
            logins => s.console.len(),
            plugin_failures => s.engine.plugin_failures(),
            tps => tps,
            batches => batches,
            errors => errors,
            bases => bases,
            residency => residency(s),
            uptime_s => s.started.elapsed().as_secs(),
        },
    )
}
