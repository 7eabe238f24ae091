//! Training runs and their checkpoints as the SDK's `RestClient` and the `tinker` CLI see
//! them: describe and list runs, list, delete, expire, publish and copy checkpoints,
//! describe a checkpoint's weights, and export one as a PEFT `.tar` (per-file signed links:
//! [`super::download`]).
//!
//! A run outlives its session: a loaded run is described from the engine's entry, an
//! unloaded one from its stored record (with a store; without one, unloading forgets it).
//! Its checkpoints stay in the registry until deleted or expired. A tenant sees and
//! touches only its own runs and checkpoints; another tenant's published checkpoint can be
//! read (loaded, sampled, copied, described), never changed. Listings are newest first.

use super::session::Page;
use super::{rfc3339, TinkerPath};
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{Json, Path, Query, Tenant};
use crate::api::Shared;
use crate::jobs::metadata::metadata_json;
use crate::jobs::registry::{AdapterEntry, Checkpoint};
use crate::jobs::{AdapterId, TenantId, UserMetadata};
use axum::extract::State;
use axum::http::HeaderMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The SDK's `Checkpoint`.
pub fn checkpoint_json(c: &Checkpoint) -> Value {
    let (kind, id) = match c.name.splitn(3, '/').collect::<Vec<_>>()[..] {
        [_, "sampler_weights", n] => ("sampler", format!("sampler_weights/{n}")),
        [_, "external_weights", n] => ("external", format!("external_weights/{n}")),
        [_, seg, n] => ("training", format!("{seg}/{n}")),
        _ => ("training", c.name.clone()),
    };
    json!({
        "checkpoint_id": id,
        "checkpoint_type": kind,
        "time": rfc3339(c.created),
        "tinker_path": TinkerPath::from_key(&c.name),
        "training_run_id": c.model.0,
        "size_bytes": c.size_bytes(),
        "public": c.public,
        "user_metadata": metadata_json(c.user_metadata.as_ref()),
        "expires_at": c.expires.map(rfc3339),
    })
}

/// Newest first, as the SDK documents its listings.
fn newest_first(mut v: Vec<Arc<Checkpoint>>) -> Vec<Arc<Checkpoint>> {
    v.reverse();
    v
}

/// What describes a training run, loaded or not.
pub(crate) struct RunView {
    pub id: String,
    pub owner: TenantId,
    /// The base model it trains on, as its record keeps it.
    pub base: String,
    pub rank: usize,
    pub step: u64,
    pub last_request: SystemTime,
    pub user_metadata: Option<UserMetadata>,
}

fn live_view(e: &AdapterEntry) -> RunView {
    RunView {
        id: e.id.0.clone(),
        owner: e.tenant.clone(),
        base: e.base.clone(),
        rank: e.config.rank,
        step: e.step(),
        last_request: e.last_request(),
        user_metadata: e.user_metadata.clone(),
    }
}

/// `owner`'s run `id`: the loaded entry, else the stored record (not deleted).
pub(crate) async fn find_run(s: &Shared, owner: &TenantId, id: &str) -> ApiResult<RunView> {
    if let Ok(e) = s
        .engine
        .registry()
        .adapter(owner, &AdapterId(id.to_owned()))
    {
        return Ok(live_view(&e));
    }
    let not_found = || ApiError::not_found("training run", id);
    let Some(d) = &s.durable else {
        return Err(not_found());
    };
    let (t, m) = (owner.clone(), AdapterId(id.to_owned()));
    let rec = match d
        .call(move |db| async move { db.get_model(&t, &m).await })
        .await
    {
        Ok(r) if !r.deleted => r,
        Ok(_) | Err(crate::Error::NotFound { .. }) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    Ok(RunView {
        id: id.to_owned(),
        owner: owner.clone(),
        base: rec.base_model,
        rank: rec.lora_config.rank,
        step: rec.step,
        last_request: rec.last_request.unwrap_or(rec.created),
        user_metadata: rec.user_metadata,
    })
}

/// The SDK's `TrainingRun`. `public_only`: as another tenant sees it (only published
/// checkpoints).
fn run_json(s: &Shared, v: &RunView, public_only: bool) -> Value {
    let cks = s
        .engine
        .registry()
        .checkpoints_of(&v.owner, &format!("{}/", v.id));
    let last = |seg: &str| {
        cks.iter()
            .rev()
            .filter(|c| !public_only || c.public)
            .find(|c| c.name.split('/').nth(1) == Some(seg))
            .map(|c| checkpoint_json(c))
    };
    json!({
        "training_run_id": v.id,
        "base_model": v.base,
        "model_owner": v.owner.0,
        "is_lora": true,
        "corrupted": false,
        "lora_rank": v.rank,
        "step": v.step,
        "last_request_time": rfc3339(v.last_request),
        "last_checkpoint": last("weights"),
        "last_sampler_checkpoint": last("sampler_weights"),
        "user_metadata": metadata_json(v.user_metadata.as_ref()),
    })
}

/// `access_scope=owned` (the default) or `accessible`.
#[derive(Deserialize, JsonSchema)]
pub struct Scope {
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::access_scope")]
    access_scope: Option<String>,
}

/// `GET /api/v1/training_runs/{id}`: the run, loaded or not. With
/// `access_scope=accessible`, another tenant's run that has a published checkpoint too.
pub async fn get_training_run(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    Query(q): Query<Scope>,
) -> ApiResult<axum::Json<Value>> {
    match find_run(&s, &tenant, &id).await {
        Ok(v) => Ok(axum::Json(run_json(&s, &v, false))),
        Err(e) if q.access_scope.as_deref() == Some("accessible") => {
            let owner = s
                .engine
                .registry()
                .publisher_of_run(&AdapterId(id.clone()))
                .filter(|o| o != &tenant)
                .ok_or(e)?;
            let v = find_run(&s, &owner, &id).await?;
            Ok(axum::Json(run_json(&s, &v, true)))
        }
        Err(e) => Err(e),
    }
}

/// `GET /api/v1/training_runs?limit&offset`: the tenant's runs that are not deleted,
/// loaded or not (with a store; without one, the loaded ones), newest first.
pub async fn list_training_runs(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Query(p): Query<Page>,
) -> ApiResult<axum::Json<Value>> {
    let (limit, offset) = p.bounds(20)?;
    let (views, total) = match &s.durable {
        Some(d) => {
            let t = tenant.clone();
            let (recs, total) = d
                .call(move |db| async move {
                    db.list_models_page(&t, limit as u64, offset as u64).await
                })
                .await?;
            let reg = s.engine.registry();
            let views: Vec<RunView> = recs
                .into_iter()
                .map(|r| match reg.adapter(&tenant, &r.id) {
                    // Loaded: the live step and time.
                    Ok(e) => live_view(&e),
                    Err(_) => RunView {
                        id: r.id.0,
                        owner: r.tenant,
                        base: r.base_model,
                        rank: r.lora_config.rank,
                        step: r.step,
                        last_request: r.last_request.unwrap_or(r.created),
                        user_metadata: r.user_metadata,
                    },
                })
                .collect();
            (views, total)
        }
        None => {
            let reg = s.engine.registry();
            let mut live: Vec<_> = reg
                .adapters_of(&tenant)
                .into_iter()
                .filter_map(|id| reg.adapter(&tenant, &id).ok())
                .collect();
            live.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
            let total = live.len() as u64;
            let views = live
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(|e| live_view(&e))
                .collect();
            (views, total)
        }
    };
    let runs: Vec<Value> = views.iter().map(|v| run_json(&s, v, false)).collect();
    Ok(axum::Json(json!({
        "training_runs": runs,
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    })))
}

/// `GET /api/v1/training_runs/{id}/checkpoints`: a run's checkpoints, newest first.
pub async fn list_checkpoints(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let list = s
        .engine
        .registry()
        .checkpoints_of(&tenant, &format!("{id}/"));
    if list.is_empty() {
        // No checkpoints: still an answer for a run that exists.
        find_run(&s, &tenant, &id).await?;
    }
    let items: Vec<Value> = newest_first(list)
        .iter()
        .map(|c| checkpoint_json(c))
        .collect();
    let n = items.len();
    Ok(axum::Json(json!({
        "checkpoints": items,
        "cursor": {"offset": 0, "limit": n, "total_count": n},
    })))
}

/// `GET /api/v1/checkpoints?limit&offset`: all the tenant's checkpoints, newest first.
pub async fn list_user_checkpoints(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Query(p): Query<Page>,
) -> ApiResult<axum::Json<Value>> {
    let (limit, offset) = p.bounds(100)?;
    let all = newest_first(s.engine.registry().checkpoints_of(&tenant, ""));
    let items: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|c| checkpoint_json(c))
        .collect();
    Ok(axum::Json(json!({
        "checkpoints": items,
        "cursor": {"offset": offset, "limit": limit, "total_count": all.len()},
    })))
}

/// Registry work that writes through to the database, which blocks: off tokio's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> ApiResult<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::Error::Unavailable(format!("checkpoint update failed: {e}")))??)
}

pub async fn delete_checkpoint(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let engine = s.engine.clone();
    let key = format!("{id}/{kind}/{name}");
    blocking(move || engine.registry().delete_checkpoint(&tenant, &key)).await?;
    tracing::info!(checkpoint = %format!("{id}/{kind}/{name}"), "checkpoint deleted");
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize, JsonSchema)]
pub struct Ttl {
    /// Absent or null: the checkpoint never expires.
    #[schemars(range(min = 1, max = MAX_TTL_S))]
    ttl_seconds: Option<u64>,
}

/// The longest time to live a checkpoint can get (100 years): later instants overflow
/// the clock's arithmetic.
pub const MAX_TTL_S: u64 = 100 * 365 * 86_400;

/// A requested time to live: 1 s to [`MAX_TTL_S`].
pub fn ttl(secs: Option<u64>) -> ApiResult<Option<Duration>> {
    match secs {
        Some(t) if t == 0 || t > MAX_TTL_S => Err(ApiError::invalid(
            "ttl_seconds",
            format!("{t} is outside the limit of 1 to {MAX_TTL_S} seconds"),
        )),
        t => Ok(t.map(Duration::from_secs)),
    }
}

/// `PUT .../checkpoints/{kind}/{name}/ttl`: the checkpoint expires `ttl_seconds` from now
/// (then it is hidden at once and deleted, files included, within
/// `LORAPLEX_EXPIRY_SWEEP_MS`), or never.
pub async fn set_checkpoint_ttl(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
    Json(req): Json<Ttl>,
) -> ApiResult<axum::Json<Value>> {
    let ttl = ttl(req.ttl_seconds)?;
    let engine = s.engine.clone();
    let key = format!("{id}/{kind}/{name}");
    blocking(move || engine.registry().set_checkpoint_ttl(&tenant, &key, ttl)).await?;
    Ok(axum::Json(json!({})))
}

async fn set_public(
    s: Shared,
    tenant: TenantId,
    key: String,
    public: bool,
) -> ApiResult<axum::Json<Value>> {
    let engine = s.engine.clone();
    let k = key.clone();
    blocking(move || engine.registry().set_checkpoint_public(&tenant, &k, public)).await?;
    tracing::info!(checkpoint = %key, public, "checkpoint visibility changed");
    Ok(axum::Json(json!({})))
}

/// `POST .../checkpoints/{kind}/{name}/publish`: every tenant may now load, sample and
/// copy it (never change or delete it). Publishing twice is not an error.
pub async fn publish(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> ApiResult<axum::Json<Value>> {
    set_public(s, tenant, format!("{id}/{kind}/{name}"), true).await
}

/// `DELETE .../checkpoints/{kind}/{name}/publish`: private again (404 for others).
pub async fn unpublish(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> ApiResult<axum::Json<Value>> {
    set_public(s, tenant, format!("{id}/{kind}/{name}"), false).await
}

#[derive(Deserialize, JsonSchema)]
pub struct CopyWeights {
    /// The checkpoint to copy: the caller's own or a published one.
    #[schemars(schema_with = "crate::api::openapi::schema::tinker_path")]
    source_path: String,
    /// With `model_seq_id`: the copy's run is `{session_id}:train:{model_seq_id}`.
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model_seq_id: Option<u64>,
    /// Accepted for the SDK's sake (loraplex has no projects); the copy gets a run of
    /// its own.
    #[serde(default)]
    #[schemars(length(max = 128))]
    destination_project_id: Option<String>,
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_TTL_S))]
    ttl_seconds: Option<u64>,
    // `weights_access_token` is ignored: another tenant's checkpoint is readable once
    // published, with no token.
}

/// Longest idempotency key remembered for a copy.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// `POST /api/v1/copy_weights`: copy a readable checkpoint into a new training run of the
/// caller (recorded, never loaded: it cannot be trained on), keeping its kind and name.
/// The copy is the caller's own: it counts against its checkpoint quota and stays when
/// the source is deleted or unpublished. A retry with the same `X-Idempotency-Key` gets
/// the first copy back.
pub async fn copy_weights(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Json(req): Json<CopyWeights>,
) -> ApiResult<axum::Json<Value>> {
    let idem = headers
        .get("x-idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .map(|k| (tenant.clone(), k.to_owned()));
    if let Some(path) = idem.as_ref().and_then(|k| s.tinker.copies.lock().get(k)) {
        return Ok(axum::Json(json!({ "tinker_path": path })));
    }
    let src_path = TinkerPath::parse(&req.source_path).map_err(|e| match e {
        ApiError::Engine(crate::Error::InvalidInput { message, .. }) => {
            ApiError::invalid("source_path", message)
        }
        e => e,
    })?;
    let ttl = ttl(req.ttl_seconds)?;
    if let Some(p) = &req.destination_project_id {
        if p.len() > 128 {
            return Err(ApiError::invalid(
                "destination_project_id",
                "at most 128 bytes",
            ));
        }
    }
    let (dest, session) = match (req.session_id, req.model_seq_id) {
        (Some(session), Some(n)) => {
            s.tinker.session(&tenant, &session)?;
            let id = AdapterId(format!("{session}:train:{n}"));
            (id, Some(session))
        }
        (None, None) if req.destination_project_id.is_some() => (AdapterId::generate(), None),
        (Some(_), None) => {
            return Err(ApiError::invalid("model_seq_id", "give it with session_id"))
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid("session_id", "give it with model_seq_id"))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "destination_project_id",
                "give a destination_project_id, or a session_id and model_seq_id",
            ))
        }
    };
    let source = s
        .engine
        .registry()
        .readable_checkpoint(&tenant, &src_path.key())?;
    let name = format!("{dest}/{}/{}", src_path.segment, src_path.name);
    s.engine
        .copy_checkpoint(&tenant, source, &dest, &name, session, ttl)
        .await?;
    let path = TinkerPath::from_key(&name);
    tracing::info!(from = %req.source_path, to = %path, "checkpoint copied");
    if let Some(k) = idem {
        s.tinker.copies.lock().insert(k, path.clone());
    }
    Ok(axum::Json(json!({ "tinker_path": path })))
}

#[derive(Deserialize, JsonSchema)]
pub struct WeightsInfo {
    #[schemars(schema_with = "crate::api::openapi::schema::tinker_path")]
    tinker_path: String,
}

/// `POST /api/v1/weights_info`: what a readable checkpoint holds (the SDK asks before it
/// loads one).
pub async fn weights_info(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<WeightsInfo>,
) -> ApiResult<axum::Json<Value>> {
    let p = TinkerPath::parse(&req.tinker_path)?;
    let c = s.engine.registry().readable_checkpoint(&tenant, &p.key())?;
    let cfg = &c.config;
    let has = |t: crate::lora::Target| cfg.targets.contains(&t);
    use crate::lora::Target;
    Ok(axum::Json(json!({
        "base_model": c.base,
        "is_lora": true,
        "lora_rank": cfg.rank,
        "train_unembed": cfg.train_unembed,
        "train_mlp": has(Target::Gate) || has(Target::Up) || has(Target::Down),
        "train_attn": has(Target::Q) || has(Target::K) || has(Target::V) || has(Target::O),
        "optimizer_config": {"type": "adamw"},
    })))
}

/// A checkpoint's adapter as a `.tar` in Hugging Face PEFT layout (`adapter_config.json`,
/// `adapter_model.safetensors`), ready for `PeftModel.from_pretrained`.
pub async fn download_peft(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let c = s
        .engine
        .registry()
        .checkpoint_entry(&tenant, &format!("{id}/{kind}/{name}"))?;
    let base = c.base.clone();
    let state = s.engine.checkpoint_state(c).await?;
    let bytes = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        crate::store::peft::export_peft_tar(&state.weights, &base, &mut out).map(|_| out)
    })
    .await
    .map_err(|e| crate::Error::Unavailable(format!("export panicked: {e}")))?
    .map_err(crate::Error::from)?;
    let file = format!(
        "attachment; filename=\"{}-{name}-peft.tar\"",
        id.replace(':', ".")
    );
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/x-tar".to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, file),
        ],
        bytes,
    )
        .into_response())
}
