//! Metrics history of training runs: the metrics of every `forward_backward` and
//! `optim_step` result (loss, token counts, grad norm, learning rate, a loss plugin's own
//! metrics), per run and step, for the console's curves and
//! `GET /api/v1/training_runs/{id}/metrics`.
//!
//! The lanes hand each point to [`History::record`], which writes it through a
//! [`HistorySink`] (the metadata database, `crate::store::DurableHistory`: durable, bounded
//! per run, deleted with the run) and tells live watchers (the console's server-sent
//! events) over a bounded broadcast channel: a watcher that falls behind misses points
//! and reloads; nothing waits on it. Without a sink (an engine without a data directory)
//! points are only broadcast. This module never decides what a metric means; it copies.

use super::ids::{AdapterId, TenantId};
use crate::train::WorkResult;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;
use tokio::sync::broadcast;

/// Points buffered for live watchers before the slowest one starts missing some.
const LIVE_BUFFER: usize = 1024;

/// Which result a point comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    ForwardBackward,
    OptimStep,
}

impl PointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::ForwardBackward => "forward_backward",
            PointKind::OptimStep => "optim_step",
        }
    }

    pub fn parse(s: &str) -> Option<PointKind> {
        match s {
            "forward_backward" => Some(PointKind::ForwardBackward),
            "optim_step" => Some(PointKind::OptimStep),
            _ => None,
        }
    }
}

/// One result's metrics. `step` is the run's optimizer step count: for a
/// forward_backward, the steps taken before it (its gradient goes into step `step + 1`);
/// for an optim_step, the count after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub tenant: TenantId,
    pub run: AdapterId,
    pub step: u64,
    pub kind: PointKind,
    pub metrics: BTreeMap<String, f64>,
    pub time: SystemTime,
}

impl MetricPoint {
    /// A forward_backward result: `loss:sum`, `tokens` (target positions), `weight_sum`
    /// (the tokens the loss counted), `loss:mean` (per counted token, when any) and the
    /// loss's own `name:reduction` metrics, as the SDK sees them.
    pub fn forward_backward(tenant: &TenantId, run: &AdapterId, step: u64, r: &WorkResult) -> Self {
        let mut metrics: BTreeMap<String, f64> = r
            .metrics
            .iter()
            .filter(|(k, v)| k.matches(':').count() == 1 && v.is_finite())
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        metrics.entry("loss:sum".into()).or_insert(r.loss);
        let tokens: usize = r
            .logprobs
            .iter()
            .zip(r.k.iter().chain(std::iter::repeat(&1)))
            .map(|(lp, k)| lp.len() / (*k).max(1))
            .sum();
        metrics.insert("tokens".into(), tokens as f64);
        metrics.insert("weight_sum".into(), r.weight_sum);
        if r.weight_sum > 0.0 {
            metrics
                .entry("loss:mean".into())
                .or_insert(r.loss / r.weight_sum);
        }
        MetricPoint {
            tenant: tenant.clone(),
            run: run.clone(),
            step,
            kind: PointKind::ForwardBackward,
            metrics,
            time: SystemTime::now(),
        }
    }

    /// An optim_step result: `grad_norm`, `clipped` (0 or 1) and `learning_rate`.
    pub fn optim_step(
        tenant: &TenantId,
        run: &AdapterId,
        report: &crate::lora::optim::StepReport,
        learning_rate: f64,
    ) -> Self {
        let metrics = BTreeMap::from([
            ("grad_norm".to_owned(), report.grad_norm),
            ("clipped".to_owned(), f64::from(u8::from(report.clipped))),
            ("learning_rate".to_owned(), learning_rate),
        ]);
        MetricPoint {
            tenant: tenant.clone(),
            run: run.clone(),
            step: report.step,
            kind: PointKind::OptimStep,
            metrics,
            time: SystemTime::now(),
        }
    }
}

/// Where points are kept. Called on a lane's thread: it may block briefly.
pub trait HistorySink: Send + Sync {
    fn record(&self, point: &MetricPoint) -> crate::error::Result<()>;
}

/// The engine's history: a sink (set once, when the server opens its store) and the live
/// broadcast.
pub struct History {
    sink: OnceLock<Arc<dyn HistorySink>>,
    live: broadcast::Sender<Arc<MetricPoint>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            sink: OnceLock::new(),
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }
}

impl History {
    /// Keep points in `sink` from now on (the first sink set stays).
    pub fn attach(&self, sink: Arc<dyn HistorySink>) {
        let _ = self.sink.set(sink);
    }

    /// Keep a point and tell live watchers. A failed write is logged: the training
    /// result it describes has happened either way.
    pub fn record(&self, point: MetricPoint) {
        if let Some(sink) = self.sink.get() {
            if let Err(e) = sink.record(&point) {
                tracing::warn!(model = %point.run, error = %e, "metrics history not written");
            }
        }
        // No watcher is not an error.
        let _ = self.live.send(Arc::new(point));
    }

    /// Every point recorded from now on (every tenant's: filter by tenant and run).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<MetricPoint>> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_backward_point_counts_tokens_and_keeps_sdk_metrics() {
        let r = WorkResult {
            loss: 6.0,
            metrics: BTreeMap::from([
                ("ppo:mean".to_owned(), 0.5),
                ("internal".to_owned(), 1.0),
                ("bad:mean".to_owned(), f64::NAN),
            ]),
            logprobs: vec![vec![0.0; 3], vec![0.0; 4]],
            k: vec![1, 2],
            elementwise: None,
            weight_sum: 3.0,
        };
        let p = MetricPoint::forward_backward(&"t".into(), &"m".into(), 4, &r);
        assert_eq!(p.step, 4);
        assert_eq!(p.metrics["loss:sum"], 6.0);
        assert_eq!(p.metrics["loss:mean"], 2.0);
        assert_eq!(p.metrics["tokens"], 5.0);
        assert_eq!(p.metrics["ppo:mean"], 0.5);
        assert!(!p.metrics.contains_key("internal"));
        assert!(!p.metrics.contains_key("bad:mean"));
    }

    #[test]
    fn live_watchers_see_points_and_none_is_fine() {
        let h = History::default();
        h.record(MetricPoint::forward_backward(
            &"t".into(),
            &"m".into(),
            0,
            &WorkResult {
                loss: 1.0,
                metrics: BTreeMap::new(),
                logprobs: vec![],
                k: vec![],
                elementwise: None,
                weight_sum: 0.0,
            },
        ));
        let mut rx = h.subscribe();
        let rep = crate::lora::optim::StepReport {
            step: 1,
            grad_norm: 2.0,
            clipped: false,
        };
        h.record(MetricPoint::optim_step(&"t".into(), &"m".into(), &rep, 0.1));
        let p = rx.try_recv().expect("a point");
        assert_eq!(p.kind, PointKind::OptimStep);
        assert_eq!(p.metrics["learning_rate"], 0.1);
    }
}
