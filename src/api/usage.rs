//! `GET /api/v1/usage`: a tenant reads what it holds against each of its quotas and how
//! much of its request rate is left ([`crate::quota`]). Read-only: the numbers come from
//! where the things are held (registry, job counters, plugin table), never from a tally
//! of their own.

use super::extract::Tenant;
use super::Shared;
use crate::quota::Quota;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

pub fn routes() -> Router<Shared> {
    Router::new().route("/api/v1/usage", get(usage))
}

/// `{"tenant", "<quota>": {"used", "limit"}, ..., "requests_per_second": {"limit", "burst",
/// "available"}}`.
async fn usage(State(s): State<Shared>, Tenant(tenant): Tenant) -> axum::Json<Value> {
    let limits = s.engine.quotas().limits(&tenant);
    let (runs, sessions) = s.engine.registry().usage(&tenant);
    let (plugins, plugin_bytes) = super::plugins::usage(&s, &tenant);
    let held = [
        (Quota::TrainingRuns, runs),
        (Quota::SamplingSessions, sessions),
        (Quota::QueuedJobs, s.engine.jobs_held(&tenant)),
        (
            Quota::CheckpointBytes,
            s.engine.registry().checkpoint_bytes(&tenant),
        ),
        (Quota::Plugins, plugins),
        (Quota::PluginBytes, plugin_bytes),
    ];
    let mut out = serde_json::Map::new();
    out.insert("tenant".into(), json!(tenant.0));
    for (q, used) in held {
        out.insert(
            q.name().into(),
            json!({"used": used, "limit": limits.get(q)}),
        );
    }
    out.insert(
        Quota::RequestsPerSecond.name().into(),
        json!({
            "limit": limits.get(Quota::RequestsPerSecond),
            "burst": limits.get(Quota::RequestBurst),
            "available": s.engine.quotas().requests_available(&tenant),
        }),
    );
    axum::Json(Value::Object(out))
}
