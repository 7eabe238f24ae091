//! `retrieve_future`: long-poll a future and render its outcome the way the SDK expects —
//! `try_again` while unfinished, protobuf for forward / forward_backward / sample results,
//! JSON for the rest, and a failure as 200 `{error, category}` (never a 5xx: the SDK would
//! re-poll a 5xx forever).

use super::sampling::register_sampler;
use super::session::session_of_model;
use super::TinkerPath;
use crate::api::error::ApiResult;
use crate::api::extract::{Json, Tenant};
use crate::api::proto;
use crate::api::Shared;
use crate::error::Category;
use crate::jobs::{FutureId, JobOutput, JobState, SampleOutput, TenantId};
use crate::sample::StopReason;
use crate::train::WorkResult;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prost::Message;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

#[derive(Deserialize, JsonSchema)]
pub struct Retrieve {
    request_id: String,
}

pub async fn retrieve_future(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Retrieve>,
) -> ApiResult<Response> {
    let id = FutureId(req.request_id.clone());
    let poll = Duration::from_millis(s.cfg.long_poll_ms);
    let rec = s.engine.wait(&tenant, &id, poll).await?;
    Ok(match (rec.state, rec.output, rec.failure) {
        (JobState::Done, Some(out), _) => render(&s, &tenant, &out),
        (JobState::Failed, _, Some(f)) => axum::Json(json!({
            "error": f.message,
            "category": match f.category {
                Category::User => "user",
                Category::Server => "server",
            },
        }))
        .into_response(),
        _ => axum::Json(json!({
            "type": "try_again",
            "request_id": req.request_id,
            "queue_state": "active",
        }))
        .into_response(),
    })
}

fn proto_response(msg: impl Message) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        msg.encode_to_vec(),
    )
        .into_response()
}

fn render(s: &Shared, tenant: &TenantId, out: &JobOutput) -> Response {
    match out {
        JobOutput::ForwardBackward(r) => proto_response(fb_output(r)),
        // Everything rendering needs is in the stored output: a result read after a
        // restart renders as it did before.
        JobOutput::Sample(o) => proto_response(sample_response(o, o.prompt_logprobs_last_n)),
        JobOutput::OptimStep(r) => axum::Json(json!({
            "type": "optim_step",
            "metrics": {
                "step:max": r.step as f64,
                "grad_norm:mean": r.grad_norm,
                "clipped:max": if r.clipped { 1.0 } else { 0.0 },
            },
        }))
        .into_response(),
        JobOutput::Saved { name } => {
            let kind = match name.split('/').nth(1) {
                Some("sampler_weights") => "save_weights_for_sampler",
                Some("external_weights") => "save_weights_external",
                _ => "save_weights",
            };
            axum::Json(json!({"path": TinkerPath::from_key(name), "type": kind})).into_response()
        }
        JobOutput::Loaded { name, model } => axum::Json(json!({
            "path": TinkerPath::from_key(name),
            "model_id": model.0,
            "type": "load_weights",
        }))
        .into_response(),
        JobOutput::SamplingSession(sid) => {
            // An ephemeral sampler: released with the session of its model.
            if !s.tinker.sampler_paths.contains_key(&sid.0) {
                let session = s
                    .engine
                    .registry()
                    .session(tenant, sid)
                    .ok()
                    .and_then(|x| x.adapter.clone())
                    .and_then(|m| session_of_model(&m.0).ok().map(str::to_owned));
                if let Some(sess) = session {
                    // Released with its session either way (it is owned by it).
                    let _ = register_sampler(s, tenant, &sess, sid, None);
                }
            }
            axum::Json(json!({
                "sampling_session_id": sid.0,
                "type": "save_weights_for_sampler",
            }))
            .into_response()
        }
        JobOutput::ModelCreated(m) => {
            axum::Json(json!({"model_id": m.0, "type": "create_model"})).into_response()
        }
        JobOutput::ModelUnloaded(m) => {
            axum::Json(json!({"model_id": m.0, "type": "unload_model"})).into_response()
        }
    }
}

/// One `ArrayRecord` covering every datum: `logprobs` (and `elementwise_loss`) shaped like
/// each datum's targets, `[T]` or `[T, K]`.
pub fn fb_output(r: &WorkResult) -> proto::ForwardBackwardOutput {
    let mut fields = HashMap::new();
    let k = r.k.first().copied().unwrap_or(1);
    let uniform_k = r.k.iter().all(|&x| x == k);
    let batched = |rows: &[Vec<f32>]| {
        let mut data = Vec::new();
        let mut offsets = vec![0i64];
        for row in rows {
            data.extend(proto::write_f32(row.iter().copied()));
            offsets.push(data.len() as i64);
        }
        proto::BatchedTensor {
            data,
            offsets: proto::write_i64(offsets),
            dtype: proto::DType::Float32 as i32,
            trailing_shape: if k > 1 && uniform_k {
                vec![k as i64]
            } else {
                vec![]
            },
        }
    };
    fields.insert("logprobs".to_owned(), batched(&r.logprobs));
    if let Some(e) = &r.elementwise {
        fields.insert("elementwise_loss".to_owned(), batched(e));
    }
    let mut metrics: HashMap<String, f64> = r
        .metrics
        .iter()
        .filter(|(k, _)| k.matches(':').count() == 1)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    metrics.entry("loss:sum".to_owned()).or_insert(r.loss);
    proto::ForwardBackwardOutput {
        loss_fn_output_type: "ArrayRecord".into(),
        loss_fn_outputs: vec![proto::ArrayRecord {
            type_tag: "ArrayRecord".into(),
            fields,
            num_datums: r.logprobs.len() as i64,
        }],
        metrics,
    }
}

fn topk(rows: &[Vec<(u32, f32)>]) -> Option<proto::TopkLogprobs> {
    let k = rows.iter().map(Vec::len).max()?;
    if k == 0 {
        return None;
    }
    let mut ids = Vec::with_capacity(rows.len() * k);
    let mut lps = Vec::with_capacity(rows.len() * k);
    for r in rows {
        for j in 0..k {
            let (t, lp) = r.get(j).copied().unwrap_or((0, f32::NEG_INFINITY));
            ids.push(t as i32);
            lps.push(lp);
        }
    }
    Some(proto::TopkLogprobs {
        token_ids: proto::write_i32(ids),
        logprobs: proto::write_f32(lps),
        k: k as u32,
        length: rows.len() as u32,
    })
}

/// The SDK's `SampleResponse`. Prompt logprobs get a NaN for position 0 (nothing predicts
/// it) and for positions before the last `last_n`.
pub fn sample_response(o: &SampleOutput, last_n: Option<usize>) -> proto::SampleResponse {
    let sequences = o
        .sequences
        .iter()
        .map(|q| proto::SampledSequence {
            stop_reason: match q.stop_reason {
                StopReason::Stop => proto::StopReason::Stop as i32,
                StopReason::Length => proto::StopReason::Length as i32,
            },
            tokens: proto::write_i32(q.tokens.iter().map(|&t| t as i32)),
            logprobs: Some(proto::write_f32(q.logprobs.iter().copied())),
            topk_sampled_logprobs: topk(&q.top_logprobs),
        })
        .collect();
    let prompt_logprobs = o.prompt_logprobs.as_ref().map(|lp| {
        let mut v = Vec::with_capacity(lp.len() + 1);
        v.push(f32::NAN);
        v.extend_from_slice(lp);
        if let Some(n) = last_n {
            let keep_from = v.len().saturating_sub(n);
            v[..keep_from].iter_mut().for_each(|x| *x = f32::NAN);
        }
        proto::write_f32(v)
    });
    let topk_prompt = o.prompt_top_logprobs.as_ref().and_then(|rows| {
        let mut all = Vec::with_capacity(rows.len() + 1);
        all.push(Vec::new());
        all.extend(rows.iter().cloned());
        topk(&all)
    });
    proto::SampleResponse {
        sequences,
        prompt_logprobs,
        topk_prompt_logprobs: topk_prompt,
        prompt_cache_hit_tokens: 0,
    }
}
