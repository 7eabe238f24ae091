//! Client configuration, Tinker sessions (create, heartbeat, finish, release), telemetry
//! and server capabilities: the calls every SDK client makes before any real work.

use super::{rfc3339, SessionInfo, MAX_DISPLAY_NAME_BYTES};
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{Json, Path, Query, Tenant};
use crate::api::Shared;
use crate::jobs::metadata::metadata_json;
use crate::jobs::{AdapterId, SessionId, UserMetadata};
use crate::store::db::ClientSessionId;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Instant, SystemTime};

/// The SDK's feature flags. Server-side custom losses, `retrieve_futures`, joined
/// sampling sessions and JWT auth stay off: their routes are not implemented.
pub async fn client_config() -> axum::Json<Value> {
    axum::Json(json!({
        "pjwt_auth_enabled": false,
        "credential_default_source": "api_key",
        "use_pyqwest_transport": false,
        "proto_compress_fwdbwd": false,
        "parallel_fwdbwd_chunks": true,
        "fwdbwd_max_chunk_len": 1024,
        "fwdbwd_max_chunk_bytes_count": 5_000_000,
        "sample_use_retrieve_futures": false,
        "custom_loss_server_side": false,
        "sample_join_sampling_session": false,
    }))
}

pub async fn dynamic_config() -> axum::Json<Value> {
    axum::Json(json!({
        "refresh_interval_sec": 300,
        "sample_cancel_enabled": false,
        "sample_cancel_max_batch_size": 64,
    }))
}

#[derive(Deserialize, JsonSchema)]
pub struct CreateSession {
    /// Strings only, at most 16 KiB serialized; returned by `GET /api/v1/sessions/{id}`.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::user_metadata")]
    user_metadata: Option<Value>,
    #[serde(default)]
    #[schemars(length(max = 256))]
    display_name: Option<String>,
}

pub async fn create_session(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<CreateSession>,
) -> ApiResult<axum::Json<Value>> {
    let metadata = UserMetadata::from_json("user_metadata", req.user_metadata)?;
    if let Some(n) = &req.display_name {
        if n.len() > MAX_DISPLAY_NAME_BYTES {
            return Err(ApiError::invalid(
                "display_name",
                format!("{} bytes; at most {MAX_DISPLAY_NAME_BYTES}", n.len()),
            ));
        }
    }
    check_session_limits(&s, &tenant)?;
    let id = SessionId::generate().0.replacen("sampler", "session", 1);
    let created = SystemTime::now();
    if let Some(d) = &s.durable {
        d.session_created(
            &tenant,
            &id,
            created,
            metadata.clone(),
            req.display_name.clone(),
        )
        .await?;
    }
    s.tinker.sessions.insert(
        id.clone(),
        SessionInfo::new(
            tenant.clone(),
            created,
            metadata,
            req.display_name,
            Vec::new(),
        ),
    );
    tracing::info!(session = %id, tenant = %tenant, "session created");
    let info = s
        .auth
        .is_development()
        .then_some("loraplex in development mode: each API key is its own tenant");
    Ok(axum::Json(json!({
        "session_id": id,
        "type": "create_session",
        "info_message": info,
    })))
}

/// Refuse a session past `LORAPLEX_MAX_SESSIONS_PER_TENANT` (400, the tenant's to fix) or
/// `LORAPLEX_MAX_SESSIONS` (429: the server is full).
fn check_session_limits(s: &Shared, tenant: &crate::jobs::TenantId) -> ApiResult<()> {
    let total = s.tinker.sessions.len();
    if total >= s.cfg.max_sessions {
        return Err(ApiError::Engine(crate::Error::Busy {
            what: "the server's open sessions (LORAPLEX_MAX_SESSIONS)",
            retry_after_ms: s.engine.config().retry_after_ms,
        }));
    }
    let mine = s
        .tinker
        .sessions
        .iter()
        .filter(|e| &e.tenant == tenant)
        .count();
    if mine >= s.cfg.max_sessions_per_tenant {
        return Err(ApiError::invalid(
            "session",
            format!(
                "this tenant has {mine} open sessions, the most allowed \
                 (LORAPLEX_MAX_SESSIONS_PER_TENANT = {}); finish one first",
                s.cfg.max_sessions_per_tenant
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize, JsonSchema)]
pub struct Heartbeat {
    session_id: String,
}

/// 410 for a session that was closed, so the SDK stops heartbeating it.
pub async fn heartbeat(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Heartbeat>,
) -> ApiResult<axum::response::Response> {
    match s.tinker.session(&tenant, &req.session_id) {
        Ok(sess) => {
            *sess.last_heartbeat.lock() = Instant::now();
            drop(sess);
            if let Some(d) = &s.durable {
                if let Err(e) = d.session_heartbeat(&tenant, &req.session_id).await {
                    tracing::warn!(error = %e, "cannot record a heartbeat");
                }
            }
            Ok(axum::Json(json!({"type": "session_heartbeat"})).into_response())
        }
        Err(_) => Ok((
            StatusCode::GONE,
            axum::Json(json!({
                "error": {"type": "session_closed", "message": format!("session {} is closed or unknown", req.session_id)},
                "detail": format!("session {} is closed or unknown", req.session_id),
            })),
        )
            .into_response()),
    }
}

pub async fn finish(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    s.tinker.session(&tenant, &id)?;
    release(&s, &id).await;
    Ok(axum::Json(json!({})))
}

/// Sessions and their models as a previous run left them; each gets a fresh heartbeat
/// allowance, so a client that reconnects within the timeout finds them.
pub fn restore(s: &Shared, r: &crate::store::durable::Restored) {
    for rec in &r.sessions {
        let models: Vec<String> = r
            .model_sessions
            .iter()
            .filter(|(_, sid)| sid == &rec.id.0)
            .map(|(m, _)| m.0.clone())
            .collect();
        s.tinker.sessions.insert(
            rec.id.0.clone(),
            SessionInfo::new(
                rec.tenant.clone(),
                rec.created,
                rec.user_metadata.clone(),
                rec.display_name.clone(),
                models,
            ),
        );
    }
}

/// Drop a session with its training models and sampling sessions (checkpoints stay),
/// and everything this layer kept for them.
pub async fn release(s: &Shared, id: &str) {
    let Some((_, sess)) = s.tinker.sessions.remove(id) else {
        return;
    };
    if let Some(d) = &s.durable {
        if let Err(e) = d.session_ended(&sess.tenant, id).await {
            tracing::warn!(session = %id, error = %e, "cannot forget an ended session");
        }
    }
    let models: Vec<String> = sess.models.lock().drain(..).collect();
    let samplers: Vec<String> = sess.samplers.lock().drain(..).collect();
    s.tinker
        .records
        .drop_scope(&(sess.tenant.clone(), id.to_owned()));
    for m in models {
        let _ = s
            .engine
            .unload_model(&sess.tenant, &AdapterId(m.clone()))
            .await;
    }
    for sid in &samplers {
        let _ = s
            .engine
            .registry()
            .remove_session(&sess.tenant, &SessionId(sid.clone()));
        s.tinker.forget_sampler(sid);
    }
    // Ephemeral samplers of its models (save_weights_for_sampler without a path), listed
    // above only once their future was read.
    for sid in s
        .engine
        .registry()
        .remove_sessions_owned_by(&sess.tenant, id)
    {
        s.tinker.forget_sampler(&sid.0);
    }
    tracing::info!(session = %id, "session released");
}

/// Most items one page of a listing may hold (`limit`).
pub const MAX_PAGE: usize = 1000;

/// A page of a listing: `limit` items from `offset`. `access_scope` is accepted for the
/// SDK's sake; every listing shows the caller's own things.
#[derive(Deserialize, JsonSchema)]
pub struct Page {
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_PAGE))]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::access_scope")]
    access_scope: Option<String>,
}

impl Page {
    /// (limit, offset), `limit` defaulting to `default` and at most [`MAX_PAGE`].
    pub fn bounds(&self, default: usize) -> ApiResult<(usize, usize)> {
        let limit = self.limit.unwrap_or(default);
        if limit > MAX_PAGE {
            return Err(ApiError::invalid(
                "limit",
                format!("{limit} is more than the most one page holds, {MAX_PAGE}"),
            ));
        }
        Ok((limit, self.offset.unwrap_or(0)))
    }

    /// Whether the caller asked for what it may read, not only what it owns.
    pub fn accessible(&self) -> bool {
        self.access_scope.as_deref() == Some("accessible")
    }
}

/// `GET /api/v1/sessions?limit&offset`: the tenant's session ids, newest first: open and
/// ended ones with a store, open ones without.
pub async fn list_sessions(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Query(p): Query<Page>,
) -> ApiResult<axum::Json<Value>> {
    let (limit, offset) = p.bounds(20)?;
    let (ids, total) = match &s.durable {
        Some(d) => {
            let t = tenant.clone();
            let (rows, total) = d
                .call(move |db| async move {
                    db.list_sessions_page(&t, limit as u64, offset as u64).await
                })
                .await?;
            (rows.into_iter().map(|r| r.id.0).collect::<Vec<_>>(), total)
        }
        None => {
            let mut open: Vec<(SystemTime, String)> = s
                .tinker
                .sessions
                .iter()
                .filter(|e| e.tenant == tenant)
                .map(|e| (e.created, e.key().clone()))
                .collect();
            open.sort_by(|a, b| b.cmp(a));
            let total = open.len() as u64;
            let ids = open
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(|(_, id)| id)
                .collect();
            (ids, total)
        }
    };
    Ok(axum::Json(json!({
        "sessions": ids,
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    })))
}

/// `GET /api/v1/sessions/{id}`: a session's training runs (not deleted; unloaded ones
/// too with a store), its live sampling sessions and what the client attached to it. An
/// ended session still answers with a store.
pub async fn get_session(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let live = s.tinker.session(&tenant, &id).ok().map(|sess| {
        (
            sess.models.lock().clone(),
            sess.samplers.lock().clone(),
            sess.user_metadata.clone(),
            sess.display_name.clone(),
            sess.created,
        )
    });
    let Some(d) = &s.durable else {
        let (models, samplers, meta, name, created) =
            live.ok_or_else(|| ApiError::not_found("session", id.clone()))?;
        return Ok(session_json(
            &id,
            models,
            samplers,
            meta.as_ref(),
            name,
            created,
            true,
        ));
    };
    let (t, sid) = (tenant.clone(), ClientSessionId(id.clone()));
    let (rec, runs) = d
        .call(move |db| async move {
            let rec = db.get_session(&t, &sid).await?;
            let runs = db.list_session_models(&t, &sid).await?;
            Ok((rec, runs))
        })
        .await?;
    let runs: Vec<String> = runs.into_iter().map(|m| m.id.0).collect();
    let samplers = live.map(|l| l.1).unwrap_or_default();
    Ok(session_json(
        &id,
        runs,
        samplers,
        rec.user_metadata.as_ref(),
        rec.display_name,
        rec.created,
        rec.ended.is_none(),
    ))
}

fn session_json(
    id: &str,
    runs: Vec<String>,
    samplers: Vec<String>,
    meta: Option<&UserMetadata>,
    display_name: Option<String>,
    created: SystemTime,
    open: bool,
) -> axum::Json<Value> {
    axum::Json(json!({
        "session_id": id,
        "training_run_ids": runs,
        "sampler_ids": samplers,
        "user_metadata": metadata_json(meta),
        "display_name": display_name,
        "created_at": rfc3339(created),
        "status": if open { json!({"type": "active"}) } else { Value::Null },
    }))
}

/// Telemetry batches are accepted and dropped.
pub async fn telemetry() -> axum::Json<Value> {
    axum::Json(json!({"status": "accepted"}))
}

/// Every served base model, the default first: `create_model` and sampling pick one by
/// its `model_name`.
pub async fn capabilities(State(s): State<Shared>) -> ApiResult<axum::Json<Value>> {
    let models: Vec<Value> = s
        .engine
        .registry()
        .bases_now()
        .into_iter()
        .map(|(name, m)| {
            json!({
                "model_name": name,
                "max_context_length": m.map(|m| m.config.max_position_embeddings),
                "trainable": true,
                "sampleable": true,
            })
        })
        .collect();
    let losses: Vec<&str> = crate::train::loss::BuiltinLoss::ALL
        .iter()
        .map(|l| l.name())
        .collect();
    Ok(axum::Json(json!({
        "supported_models": models,
        // A loraplex addition (the SDK ignores unknown fields): the built-in losses.
        "loss_functions": losses,
    })))
}

/// The engine's error for a model id the session layer refuses.
pub fn session_of_model(model_id: &str) -> ApiResult<&str> {
    model_id
        .split_once(":train:")
        .map(|(s, _)| s)
        .ok_or_else(|| ApiError::not_found("model", model_id))
}
