//! `GET /api/v1/training_runs/{id}/metrics`: a training run's metrics history
//! ([`crate::jobs::history`]) as JSON, by step range and pages. Read-only; another
//! tenant's run (or a deleted one) is a 404 like every other lookup of it.

use super::error::{ApiError, ApiResult};
use super::extract::{Path, Query, Tenant};
use super::tinker::rfc3339;
use super::Shared;
use crate::jobs::{AdapterId, TenantId};
use crate::store::db::{MetricQuery, StoredPoint};
use axum::extract::State;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Points one page holds by default.
pub const DEFAULT_POINTS: u64 = 1000;
/// Most points one page holds.
pub const MAX_POINTS: u64 = 10_000;

/// Which points: steps `from_step ..= to_step`, after the point `after` (a page's
/// `next_after`), at most `limit`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct MetricsRange {
    #[serde(default)]
    pub from_step: Option<u64>,
    #[serde(default)]
    pub to_step: Option<u64>,
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub after: Option<i64>,
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_POINTS))]
    pub limit: Option<u64>,
}

impl MetricsRange {
    pub fn query(&self) -> ApiResult<MetricQuery> {
        let limit = self.limit.unwrap_or(DEFAULT_POINTS);
        if limit == 0 || limit > MAX_POINTS {
            return Err(ApiError::invalid(
                "limit",
                format!("{limit}: a page holds 1 to {MAX_POINTS} points"),
            ));
        }
        // from_step after to_step is an empty range, not an error.
        Ok(MetricQuery {
            from_step: self.from_step.unwrap_or(0),
            to_step: self.to_step.unwrap_or(u64::MAX),
            after: self.after.unwrap_or(0).max(0),
            limit,
        })
    }
}

/// The points of `tenant`'s run `id` (404 if it has no such run). Without a store there
/// is no history: an empty list.
pub async fn points(
    s: &Shared,
    tenant: &TenantId,
    id: &str,
    q: MetricQuery,
) -> ApiResult<Vec<StoredPoint>> {
    super::tinker::runs::find_run(s, tenant, id).await?;
    let Some(d) = &s.durable else {
        return Ok(Vec::new());
    };
    let (t, m) = (tenant.clone(), AdapterId(id.to_owned()));
    Ok(
        d.call(move |db| async move { db.list_metric_points(&t, &m, &q).await })
            .await?,
    )
}

pub fn point_json(p: &StoredPoint) -> Value {
    json!({
        "id": p.id,
        "step": p.point.step,
        "kind": p.point.kind.as_str(),
        "time": rfc3339(p.point.time),
        "metrics": p.point.metrics,
    })
}

/// `{"training_run_id", "points": [{"id", "step", "kind", "time", "metrics"}], "next_after"}`:
/// points in recording order (step order unless a load set the step back); `next_after` (the last point's id) when the page is full.
pub async fn run_metrics(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    Query(range): Query<MetricsRange>,
) -> ApiResult<axum::Json<Value>> {
    let q = range.query()?;
    let pts = points(&s, &tenant, &id, q).await?;
    let next = (pts.len() as u64 == q.limit)
        .then(|| pts.last().map(|p| p.id))
        .flatten();
    Ok(axum::Json(json!({
        "training_run_id": id,
        "points": pts.iter().map(point_json).collect::<Vec<_>>(),
        "next_after": next,
    })))
}
