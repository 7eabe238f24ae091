//! The signed-in tenant's pages: sessions, training runs and jobs; one run with its
//! curves, recent points and checkpoints (download, delete, time to live, publish);
//! sampling sessions and the playground; plugins with their recent failures; usage
//! against quotas. Each reads through the same handler or lookup as the API, with the
//! signed-in tenant, so what one tenant cannot reach there it cannot reach here (404).
//! Every form that changes something is a POST with the sign-in's CSRF token.

use super::chart::{self, ChartOpts};
use super::login::{check_csrf, CsrfOnly, Login, Signed};
use super::{page, ConsoleError};
use crate::api::error::ApiError;
use crate::api::extract::{Path, Query, Tenant};
use crate::api::history::{self, MAX_POINTS};
use crate::api::tinker::{rfc3339, runs};
use crate::api::Shared;
use crate::jobs::history::PointKind;
use crate::jobs::{JobOutput, SampleRequest};
use crate::sample::SamplingParams;
use crate::store::db::{MetricQuery, StoredPoint};
use axum::extract::State;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use minijinja::context;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

type Page = Result<Html<String>, ConsoleError>;

/// What every page's frame needs.
fn frame(l: &Login, title: &str, nav: &str) -> minijinja::Value {
    context! {
        title => title,
        nav => nav,
        tenant => l.tenant.0,
        operator => l.operator,
        csrf => l.csrf,
    }
}

fn merge(a: minijinja::Value, b: minijinja::Value) -> minijinja::Value {
    context! { ..a, ..b }
}

fn tenant(l: &Login) -> Tenant {
    Tenant(l.tenant.clone())
}

/// `user_metadata` as sorted `key: value` pairs.
fn metadata_pairs(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`.
fn when(t: SystemTime) -> String {
    rfc3339(t).replace('T', " ").replace('Z', " UTC")
}

fn when_str(s: &Value) -> String {
    s.as_str()
        .unwrap_or("")
        .replace('T', " ")
        .replace('Z', " UTC")
}

#[derive(Deserialize, Default)]
pub struct RunsPage {
    #[serde(default)]
    offset: Option<usize>,
}

const RUNS_PER_PAGE: usize = 50;

/// `GET /console`: the tenant's training runs (loaded or not), sessions and recent jobs.
pub async fn runs(State(s): State<Shared>, Signed(l): Signed, Query(p): Query<RunsPage>) -> Page {
    let offset = p.offset.unwrap_or(0);
    let q: runs_page::PageQ = runs_page::page(RUNS_PER_PAGE, offset)?;
    let list = runs::list_training_runs(State(s.clone()), tenant(&l), Query(q))
        .await?
        .0;
    let items: Vec<Value> = list["training_runs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            json!({
                "id": r["training_run_id"],
                "base": r["base_model"],
                "rank": r["lora_rank"],
                "step": r["step"],
                "last": when_str(&r["last_request_time"]),
                "metadata": metadata_pairs(&r["user_metadata"]),
            })
        })
        .collect();
    let total = list["cursor"]["total_count"].as_u64().unwrap_or(0) as usize;
    let sessions: Vec<Value> = match &s.durable {
        Some(d) => {
            let t = l.tenant.clone();
            d.call(move |db| async move { db.list_sessions_page(&t, 20, 0).await })
                .await?
                .0
                .into_iter()
                .map(|r| {
                    json!({
                        "id": r.id.0,
                        "name": r.display_name,
                        "created": when(r.created),
                        "ended": r.ended.map(when),
                        "metadata": r.user_metadata.as_ref().map(|m| metadata_pairs(&crate::jobs::metadata::metadata_json(Some(m)))).unwrap_or_default(),
                    })
                })
                .collect()
        }
        None => Vec::new(),
    };
    let m = s.engine.tenant_metrics(&l.tenant);
    let jobs: Vec<Value> = match &s.durable {
        Some(d) => {
            let t = l.tenant.clone();
            d.call(move |db| async move { db.list_futures(&t, 20).await })
                .await?
                .into_iter()
                .map(|f| {
                    let r = f.record;
                    json!({
                        "id": r.id.0,
                        "kind": format!("{:?}", r.kind),
                        "state": format!("{:?}", r.state).to_lowercase(),
                        "done": r.progress.tokens_done,
                        "total": r.progress.tokens_total,
                        "created": when(r.created),
                        "error": r.failure.map(|f| f.message),
                    })
                })
                .collect()
        }
        None => Vec::new(),
    };
    page(
        "runs.html",
        merge(
            frame(&l, "Training runs", "runs"),
            context! {
                runs => items,
                sessions => sessions,
                jobs => jobs,
                queued => m.queued,
                running => m.running,
                prev => offset.checked_sub(RUNS_PER_PAGE).or(if offset > 0 { Some(0) } else { None }),
                next => (offset + RUNS_PER_PAGE < total).then_some(offset + RUNS_PER_PAGE),
                total => total,
            },
        ),
    )
}

/// The API's page query, built here (its fields are the API's own).
mod runs_page {
    pub type PageQ = crate::api::tinker::session::Page;
    pub fn page(limit: usize, offset: usize) -> Result<PageQ, crate::api::error::ApiError> {
        serde_json::from_value(serde_json::json!({"limit": limit, "offset": offset}))
            .map_err(|e| crate::api::error::ApiError::invalid("offset", e.to_string()))
    }
}

/// `?log=1&smooth=0.6`: how curves are drawn.
#[derive(Deserialize, Default, Debug)]
pub struct ChartQuery {
    #[serde(default)]
    log: Option<String>,
    #[serde(default)]
    smooth: Option<String>,
}

/// Smoothing weights offered (the form's choices; anything else draws raw lines).
const SMOOTHING: [(&str, &str); 4] = [
    ("0", "none"),
    ("0.6", "light"),
    ("0.8", "medium"),
    ("0.95", "heavy"),
];

impl ChartQuery {
    fn opts(&self) -> ChartOpts {
        let smooth = self
            .smooth
            .as_deref()
            .filter(|v| SMOOTHING.iter().any(|(k, _)| k == v))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        ChartOpts {
            log_y: matches!(self.log.as_deref(), Some("1" | "on" | "true")),
            smooth,
        }
    }

    fn smooth_key(&self) -> &str {
        self.smooth
            .as_deref()
            .filter(|v| SMOOTHING.iter().any(|(k, _)| k == v))
            .unwrap_or("0")
    }
}

/// Metrics drawn first, in this order; the rest follow by name.
const PREFERRED: [&str; 6] = [
    "loss:mean",
    "loss:sum",
    "grad_norm",
    "learning_rate",
    "tokens",
    "weight_sum",
];
/// Most charts on a run's page.
const MAX_CHARTS: usize = 12;

/// One chart per metric of `points`, x = step.
fn charts(points: &[StoredPoint], opts: ChartOpts) -> Vec<Value> {
    let mut series: BTreeMap<(PointKind, String), Vec<(f64, f64)>> = BTreeMap::new();
    for p in points {
        for (k, v) in &p.point.metrics {
            if k == "clipped" {
                continue;
            }
            series
                .entry((p.point.kind, k.clone()))
                .or_default()
                .push((p.point.step as f64, *v));
        }
    }
    let rank = |name: &str| {
        PREFERRED
            .iter()
            .position(|p| *p == name)
            .unwrap_or(PREFERRED.len())
    };
    let mut keys: Vec<(PointKind, String)> = series.keys().cloned().collect();
    keys.sort_by(|a, b| rank(&a.1).cmp(&rank(&b.1)).then(a.1.cmp(&b.1)));
    keys.into_iter()
        .take(MAX_CHARTS)
        .enumerate()
        .map(|(i, key)| {
            let pts = &series[&key];
            let title = format!("{} ({})", key.1, key.0.as_str());
            json!({
                "name": key.1,
                "kind": key.0.as_str(),
                "last": pts.last().map(|p| chart::fmt_num(p.1)),
                "svg": chart::line_chart(&format!("chart-{i}"), &title, "step", pts, opts),
            })
        })
        .collect()
}

async fn all_points(s: &Shared, l: &Login, id: &str) -> Result<Vec<StoredPoint>, ConsoleError> {
    let q = MetricQuery {
        from_step: 0,
        to_step: u64::MAX,
        after: 0,
        limit: MAX_POINTS,
    };
    Ok(history::points(s, &l.tenant, id, q).await?)
}

fn charts_ctx(points: &[StoredPoint], q: &ChartQuery) -> minijinja::Value {
    let opts = q.opts();
    context! {
        charts => charts(points, opts),
        log => opts.log_y,
        smooth => q.smooth_key(),
        smoothing => SMOOTHING.iter().map(|(k, v)| json!({"value": k, "label": v})).collect::<Vec<_>>(),
        after => points.iter().map(|p| p.id).max().unwrap_or(0),
        npoints => points.len(),
    }
}

/// `GET /console/runs/{id}`: a run, its curves, recent points and checkpoints.
pub async fn run(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(id): Path<String>,
    Query(q): Query<ChartQuery>,
) -> Page {
    let v = runs::find_run(&s, &l.tenant, &id).await?;
    let points = all_points(&s, &l, &id).await?;
    let cks = runs::list_checkpoints(State(s.clone()), tenant(&l), Path(id.clone()))
        .await?
        .0;
    let checkpoints: Vec<Value> = cks["checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| {
            let cid = c["checkpoint_id"].as_str()?.to_owned();
            let (kind, name) = cid.split_once('/')?;
            Some(json!({
                "kind": kind,
                "name": name,
                "type": c["checkpoint_type"],
                "path": c["tinker_path"],
                "created": when_str(&c["time"]),
                "size": bytes(c["size_bytes"].as_u64().unwrap_or(0)),
                "public": c["public"],
                "expires": c["expires_at"].as_str().map(|_| when_str(&c["expires_at"])),
            }))
        })
        .collect();
    let recent: Vec<Value> = points
        .iter()
        .rev()
        .take(10)
        .map(|p| {
            json!({
                "step": p.point.step,
                "kind": p.point.kind.as_str(),
                "time": when(p.point.time),
                "metrics": p.point.metrics.iter().map(|(k, v)| format!("{k}={}", chart::fmt_num(*v))).collect::<Vec<_>>().join(", "),
            })
        })
        .collect();
    let meta = crate::jobs::metadata::metadata_json(v.user_metadata.as_ref());
    page(
        "run.html",
        merge(
            merge(
                frame(&l, &format!("Run {id}"), "runs"),
                charts_ctx(&points, &q),
            ),
            context! {
                run => json!({
                    "id": v.id,
                    "base": v.base,
                    "rank": v.rank,
                    "step": v.step,
                    "last": when(v.last_request),
                    "metadata": metadata_pairs(&meta),
                }),
                checkpoints => checkpoints,
                recent => recent,
                query => format!("log={}&smooth={}", u8::from(q.opts().log_y), q.smooth_key()),
            },
        ),
    )
}

/// `GET /console/runs/{id}/charts`: only the curves (what the live script swaps in).
pub async fn charts_fragment(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(id): Path<String>,
    Query(q): Query<ChartQuery>,
) -> Page {
    let points = all_points(&s, &l, &id).await?;
    page("charts.html", charts_ctx(&points, &q))
}

/// `GET …/peft`: the checkpoint as a PEFT `.tar` (as `GET /api/v1/…/peft`).
pub async fn download_peft(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(p): Path<(String, String, String)>,
) -> Result<Response, ConsoleError> {
    Ok(runs::download_peft(State(s), tenant(&l), Path(p)).await?)
}

fn back_to_run(id: &str) -> Response {
    Redirect::to(&format!("/console/runs/{}", urlencode(id))).into_response()
}

/// Percent-encode a path segment (or a query value).
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `POST …/delete` (`csrf`).
pub async fn delete_checkpoint(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(p): Path<(String, String, String)>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, ConsoleError> {
    check_csrf(&l, &f.csrf)?;
    let id = p.0.clone();
    let _deleted = runs::delete_checkpoint(State(s), tenant(&l), Path(p)).await?;
    Ok(back_to_run(&id))
}

#[derive(Deserialize)]
pub struct TtlForm {
    #[serde(default)]
    csrf: String,
    /// Seconds; empty: never expires.
    #[serde(default)]
    ttl_seconds: String,
}

/// `POST …/ttl` (`csrf`, `ttl_seconds`; empty clears it).
pub async fn set_ttl(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(p): Path<(String, String, String)>,
    Form(f): Form<TtlForm>,
) -> Result<Response, ConsoleError> {
    check_csrf(&l, &f.csrf)?;
    let ttl = match f.ttl_seconds.trim() {
        "" => Value::Null,
        t => {
            let secs: u64 = t.parse().map_err(|_| {
                ApiError::invalid(
                    "ttl_seconds",
                    format!("{t:?} is not a whole number of seconds"),
                )
            })?;
            json!(secs)
        }
    };
    let body: runs::Ttl = serde_json::from_value(json!({ "ttl_seconds": ttl }))
        .map_err(|e| ApiError::invalid("ttl_seconds", e.to_string()))?;
    let id = p.0.clone();
    let _set = runs::set_checkpoint_ttl(
        State(s),
        tenant(&l),
        Path(p),
        crate::api::extract::Json(body),
    )
    .await?;
    Ok(back_to_run(&id))
}

#[derive(Deserialize)]
pub struct PublishForm {
    #[serde(default)]
    csrf: String,
    /// `1`: publish; anything else: make private.
    #[serde(default)]
    public: String,
}

/// `POST …/publish` (`csrf`, `public` = 1 or 0).
pub async fn set_published(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(p): Path<(String, String, String)>,
    Form(f): Form<PublishForm>,
) -> Result<Response, ConsoleError> {
    check_csrf(&l, &f.csrf)?;
    let id = p.0.clone();
    if f.public == "1" {
        let _published = runs::publish(State(s), tenant(&l), Path(p)).await?;
    } else {
        let _private = runs::unpublish(State(s), tenant(&l), Path(p)).await?;
    }
    Ok(back_to_run(&id))
}

/// The tenant's live sampling sessions (those of its open Tinker sessions).
fn sampling_sessions(s: &Shared, l: &Login) -> Vec<Value> {
    let reg = s.engine.registry();
    let mut out = Vec::new();
    for e in s.tinker.sessions.iter().filter(|e| e.tenant == l.tenant) {
        for sid in e.samplers.lock().iter() {
            let Ok(sess) = reg.session(&l.tenant, &crate::jobs::SessionId(sid.clone())) else {
                continue;
            };
            out.push(json!({
                "id": sid,
                "session": e.key(),
                "base": sess.base,
                "run": sess.adapter.as_ref().map(|a| a.0.clone()),
                "path": s.tinker.sampler_paths.get(sid).and_then(|p| p.value().clone()),
            }));
        }
    }
    out
}

/// The checkpoints the playground can sample from: the tenant's, newest first.
fn sample_sources(s: &Shared, l: &Login) -> Vec<Value> {
    let mut cks = s.engine.registry().checkpoints_of(&l.tenant, "");
    cks.reverse();
    cks.iter()
        .filter(|c| !c.name.contains("/auto-"))
        .take(200)
        .map(|c| json!({"path": crate::api::tinker::TinkerPath::from_key(&c.name), "name": c.name}))
        .collect()
}

/// `GET /console/sampling`: sampling sessions and the playground form.
pub async fn sampling(State(s): State<Shared>, Signed(l): Signed) -> Page {
    page(
        "sampling.html",
        merge(
            frame(&l, "Sampling", "sampling"),
            context! {
                samplers => sampling_sessions(&s, &l),
                sources => sample_sources(&s, &l),
                form => json!({"max_tokens": 16, "temperature": "0", "prompt": ""}),
            },
        ),
    )
}

/// Longest playground prompt (bytes) and most tokens it may ask for.
pub const MAX_PROMPT_BYTES: usize = 4096;
pub const MAX_PLAYGROUND_TOKENS: usize = 256;

#[derive(Deserialize)]
pub struct Playground {
    #[serde(default)]
    csrf: String,
    /// A `tinker://` checkpoint path.
    #[serde(default)]
    checkpoint: String,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    max_tokens: String,
    #[serde(default)]
    temperature: String,
    #[serde(default)]
    seed: String,
}

/// `POST /console/playground`: sample once from a checkpoint and show each token with its
/// logprob.
pub async fn playground(
    State(s): State<Shared>,
    Signed(l): Signed,
    Form(f): Form<Playground>,
) -> Page {
    check_csrf(&l, &f.csrf)?;
    if f.prompt.is_empty() || f.prompt.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::invalid("prompt", format!("1 to {MAX_PROMPT_BYTES} bytes")).into());
    }
    let max_tokens: usize = f
        .max_tokens
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=MAX_PLAYGROUND_TOKENS).contains(n))
        .ok_or_else(|| ApiError::invalid("max_tokens", format!("1 to {MAX_PLAYGROUND_TOKENS}")))?;
    let temperature: f32 = f
        .temperature
        .trim()
        .parse()
        .ok()
        .filter(|t: &f32| t.is_finite() && (0.0..=2.0).contains(t))
        .ok_or_else(|| ApiError::invalid("temperature", "0 to 2"))?;
    let seed = match f.seed.trim() {
        "" => None,
        v => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::invalid("seed", "a whole number"))?,
        ),
    };
    let path = crate::api::tinker::TinkerPath::parse(f.checkpoint.trim())?;
    let session = s
        .engine
        .checkpoint_sampling_session(&l.tenant, &path.key())
        .await?;
    let out = sample_once(&s, &l, &session, &f.prompt, max_tokens, temperature, seed).await;
    let _ = s.engine.registry().remove_session(&l.tenant, &session);
    let (text, tokens, stop) = out?;
    page(
        "sampling.html",
        merge(
            frame(&l, "Sampling", "sampling"),
            context! {
                samplers => sampling_sessions(&s, &l),
                sources => sample_sources(&s, &l),
                form => json!({"max_tokens": max_tokens, "temperature": f.temperature.trim(), "prompt": f.prompt, "checkpoint": f.checkpoint.trim(), "seed": f.seed.trim()}),
                result => json!({"text": text, "tokens": tokens, "stop": stop}),
            },
        ),
    )
}

async fn sample_once(
    s: &Shared,
    l: &Login,
    session: &crate::jobs::SessionId,
    prompt: &str,
    max_tokens: usize,
    temperature: f32,
    seed: Option<u64>,
) -> Result<(String, Vec<Value>, &'static str), ConsoleError> {
    let base = s
        .engine
        .registry()
        .session(&l.tenant, session)?
        .base
        .clone();
    let model = s.engine.base_model_named(&base).await?;
    let tok = model.tokenizer()?;
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "no tokens").into());
    }
    let params = SamplingParams {
        max_tokens,
        temperature,
        seed,
        ..SamplingParams::default()
    };
    let f = s
        .engine
        .sample(&l.tenant, session, SampleRequest::new(ids, params))
        .await?;
    let out = s
        .engine
        .result(&l.tenant, &f, Duration::from_secs(300))
        .await?;
    let JobOutput::Sample(o) = &*out else {
        return Err(
            ApiError::Engine(crate::Error::Unavailable("unexpected job output".into())).into(),
        );
    };
    let q = o
        .sequences
        .first()
        .ok_or_else(|| ApiError::Engine(crate::Error::Unavailable("no sequence sampled".into())))?;
    let text = tok.decode(&q.tokens, true)?;
    let tokens = q
        .tokens
        .iter()
        .zip(&q.logprobs)
        .map(|(t, lp)| {
            json!({
                "id": t,
                "text": tok.decode(&[*t], false).unwrap_or_default(),
                "logprob": format!("{lp:.4}"),
                "prob": format!("{:.1}%", (*lp as f64).exp() * 100.0),
            })
        })
        .collect();
    let stop = match q.stop_reason {
        crate::sample::StopReason::Stop => "stop",
        crate::sample::StopReason::Length => "length",
    };
    Ok((text, tokens, stop))
}

/// `GET /console/plugins`: the tenant's plugins and its recent jobs that a plugin failed.
pub async fn plugins(State(s): State<Shared>, Signed(l): Signed) -> Page {
    let list = crate::api::plugins::list(State(s.clone()), tenant(&l))
        .await
        .0;
    let items: Vec<Value> = list["plugins"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            json!({
                "id": p["plugin_id"],
                "kind": p["kind"],
                "size": bytes(p["size_bytes"].as_u64().unwrap_or(0)),
                "created": when_str(&p["created"]),
            })
        })
        .collect();
    let failures: Vec<Value> = match &s.durable {
        Some(d) => {
            let t = l.tenant.clone();
            d.call(move |db| async move { db.list_futures(&t, 200).await })
                .await?
                .into_iter()
                .filter_map(|f| {
                    let msg = f.record.failure?.message;
                    msg.contains("plugin").then(|| {
                        json!({
                            "future": f.record.id.0,
                            "kind": format!("{:?}", f.record.kind),
                            "when": f.finished.map(when),
                            "message": msg,
                        })
                    })
                })
                .take(20)
                .collect()
        }
        None => Vec::new(),
    };
    page(
        "plugins.html",
        merge(
            frame(&l, "Plugins", "plugins"),
            context! { plugins => items, failures => failures },
        ),
    )
}

/// `GET /console/usage`: what the tenant holds against each quota.
pub async fn usage(State(s): State<Shared>, Signed(l): Signed) -> Page {
    let u = crate::api::usage::usage(State(s.clone()), tenant(&l))
        .await
        .0;
    let mut rows = Vec::new();
    if let Some(m) = u.as_object() {
        for (name, v) in m {
            if let (Some(used), Some(limit)) = (v["used"].as_u64(), v["limit"].as_u64()) {
                let is_bytes = name.ends_with("bytes");
                rows.push(json!({
                    "name": name.replace('_', " "),
                    "used": if is_bytes { bytes(used) } else { used.to_string() },
                    "limit": if is_bytes { bytes(limit) } else { limit.to_string() },
                    "used_n": used,
                    "limit_n": limit.max(1),
                }));
            }
        }
    }
    let rate = &u["requests_per_second"];
    page(
        "usage.html",
        merge(
            frame(&l, "Usage", "usage"),
            context! {
                rows => rows,
                rate => json!({"limit": rate["limit"], "burst": rate["burst"], "available": rate["available"]}),
            },
        ),
    )
}
