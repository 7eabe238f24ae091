//! Live curves: `GET /console/runs/{id}/events` streams the run's new metric points as
//! server-sent events (`event: point`, data: the point as the metrics API renders it,
//! without an id), read from the engine's history broadcast. A watcher that falls behind
//! gets `event: reload` and re-reads the page's data; a keep-alive comment every 15 s keeps
//! proxies from closing an idle stream. Only the run's owner can open it (404 otherwise).

use super::login::Signed;
use super::ConsoleError;
use crate::api::extract::Path;
use crate::api::tinker::{rfc3339, runs};
use crate::api::Shared;
use crate::jobs::AdapterId;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

pub async fn events(
    State(s): State<Shared>,
    Signed(l): Signed,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    runs::find_run(&s, &l.tenant, &id).await?;
    let rx = s.engine.history().subscribe();
    let (tenant, run) = (l.tenant, AdapterId(id));
    let stream = futures_util::stream::unfold(rx, move |mut rx| {
        let (tenant, run) = (tenant.clone(), run.clone());
        async move {
            loop {
                match rx.recv().await {
                    Ok(p) if p.tenant == tenant && p.run == run => {
                        let data = serde_json::json!({
                            "step": p.step,
                            "kind": p.kind.as_str(),
                            "time": rfc3339(p.time),
                            "metrics": p.metrics,
                        });
                        let ev = Event::default().event("point").data(data.to_string());
                        return Some((Ok::<_, std::convert::Infallible>(ev), rx));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => {
                        let ev = Event::default().event("reload").data("{}");
                        return Some((Ok(ev), rx));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
