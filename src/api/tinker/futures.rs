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
use crate::sample::prompt::{AltTokens, CellLayout};
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

/// What the SDK reads as an empty top-k slot (`tinker.types.topk_logprobs.MASK_LOGPROB`):
/// token 0 with this logprob. A row of nothing but empty slots reads as `None`.
pub const TOPK_MASK_LOGPROB: f32 = -99999.0;

/// Rows of (token, logprob), `k` wide: short rows (a position not scored, or a vocabulary
/// narrower than `k`) are padded with the SDK's empty slot.
fn topk(rows: &[Vec<(u32, f32)>]) -> Option<proto::TopkLogprobs> {
    let k = rows.iter().map(Vec::len).max()?;
    if k == 0 {
        return None;
    }
    let mut ids = Vec::with_capacity(rows.len() * k);
    let mut lps = Vec::with_capacity(rows.len() * k);
    for r in rows {
        for j in 0..k {
            let (t, lp) = r.get(j).copied().unwrap_or((0, TOPK_MASK_LOGPROB));
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

/// A float32 table in a request's cell layout: dense, or sparse with its CSR indices.
fn layout_tensor(layout: &CellLayout, values: &[f32]) -> proto::Tensor {
    let shape = vec![layout.rows as i64, layout.cols as i64];
    let encoding = match &layout.sparse {
        None => proto::tensor::Encoding::Dense(proto::write_f32(values.iter().copied())),
        Some(c) => proto::tensor::Encoding::SparseCsr(proto::SparseCsr {
            values: proto::write_f32(values.iter().copied()),
            crow_indices: proto::write_i64(c.crow.iter().map(|&x| x as i64)),
            col_indices: proto::write_i64(c.col.iter().map(|&x| x as i64)),
        }),
    };
    proto::Tensor {
        encoding: Some(encoding),
        dtype: proto::DType::Float32 as i32,
        shape,
    }
}

fn alt_tokens(a: &AltTokens) -> proto::PromptAltTokens {
    let rows = if a.k == 0 { 0 } else { a.tokens.len() / a.k };
    let shape = vec![rows as i64, a.k as i64];
    proto::PromptAltTokens {
        tokens: Some(proto::Tensor {
            encoding: Some(proto::tensor::Encoding::Dense(proto::write_i64(
                a.tokens.iter().map(|&t| t as i64),
            ))),
            dtype: proto::DType::Int64 as i32,
            shape: shape.clone(),
        }),
        logprobs: Some(proto::Tensor {
            encoding: Some(proto::tensor::Encoding::Dense(proto::write_f32(
                a.logprobs.iter().copied(),
            ))),
            dtype: proto::DType::Float32 as i32,
            shape,
        }),
    }
}

/// The SDK's `SampleResponse`. Prompt logprobs get a NaN (the SDK's `None`) for position 0
/// (nothing predicts it) and for positions before the last `last_n`; top-k prompt rows are
/// empty slots there.
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
    // Entries of the prompt (position 0 included) before this one are not scored.
    let keep_from = |len: usize| last_n.map_or(1, |n| len.saturating_sub(n).max(1));
    let prompt_logprobs = o.prompt_logprobs.as_ref().map(|lp| {
        let mut v = Vec::with_capacity(lp.len() + 1);
        v.push(f32::NAN);
        v.extend_from_slice(lp);
        let from = keep_from(v.len());
        v[..from].iter_mut().for_each(|x| *x = f32::NAN);
        proto::write_f32(v)
    });
    let topk_prompt = o.prompt_top_logprobs.as_ref().and_then(|rows| {
        let mut all = Vec::with_capacity(rows.len() + 1);
        all.push(Vec::new());
        all.extend(rows.iter().cloned());
        let from = keep_from(all.len());
        all[..from].iter_mut().for_each(Vec::clear);
        topk(&all)
    });
    proto::SampleResponse {
        sequences,
        prompt_logprobs,
        topk_prompt_logprobs: topk_prompt,
        prompt_cache_hit_tokens: i32::try_from(o.prompt_cache_hit_tokens).unwrap_or(i32::MAX),
        target_prompt_logprobs: o
            .target_prompt_logprobs
            .as_ref()
            .map(|t| layout_tensor(&t.layout, &t.logprobs)),
        prompt_alt_tokens: o.prompt_alt_tokens.as_ref().map(alt_tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::SampledSeq;

    fn out(top: Vec<Vec<(u32, f32)>>, last_n: Option<usize>) -> SampleOutput {
        SampleOutput {
            sequences: vec![SampledSeq {
                tokens: vec![5],
                logprobs: vec![-0.5],
                top_logprobs: vec![vec![(5, -0.5), (6, -1.5)]],
                stop_reason: StopReason::Length,
            }],
            prompt_logprobs: Some(vec![-1.0; top.len()]),
            prompt_top_logprobs: Some(top),
            prompt_logprobs_last_n: last_n,
            target_prompt_logprobs: None,
            prompt_alt_tokens: None,
            prompt_cache_hit_tokens: 0,
            base_model: None,
        }
    }

    fn rows(t: &proto::TopkLogprobs) -> Vec<Vec<(i32, f32)>> {
        let ids = proto::read_i32("t", &t.token_ids).unwrap();
        let lps = proto::read_f32("t", &t.logprobs).unwrap();
        let k = t.k as usize;
        (0..t.length as usize)
            .map(|r| (0..k).map(|j| (ids[r * k + j], lps[r * k + j])).collect())
            .collect()
    }

    #[test]
    fn empty_top_k_slots_carry_the_sdks_mask_and_last_n_masks_rows() {
        let top = vec![vec![(1, -0.1), (2, -2.0)]; 4];
        let r = sample_response(&out(top.clone(), None), None);
        let t = rows(r.topk_prompt_logprobs.as_ref().unwrap());
        assert_eq!(t.len(), 5);
        assert_eq!(
            t[0],
            vec![(0, TOPK_MASK_LOGPROB); 2],
            "position 0 is all mask"
        );
        assert_eq!(t[1], vec![(1, -0.1), (2, -2.0)]);
        let r = sample_response(&out(top, Some(2)), Some(2));
        let t = rows(r.topk_prompt_logprobs.as_ref().unwrap());
        for (i, row) in t.iter().enumerate() {
            let masked = row.iter().all(|&s| s == (0, TOPK_MASK_LOGPROB));
            assert_eq!(masked, i < 3, "row {i}: {row:?}");
        }
        let plp = proto::read_f32("p", r.prompt_logprobs.as_ref().unwrap()).unwrap();
        assert!(plp[..3].iter().all(|x| x.is_nan()) && plp[3..].iter().all(|x| *x == -1.0));
    }

    #[test]
    fn targets_keep_their_layout_and_alt_tokens_their_shape() {
        use crate::sample::prompt::{Csr, TargetLogprobs};
        let mut o = out(vec![], None);
        o.target_prompt_logprobs = Some(TargetLogprobs {
            layout: CellLayout {
                rows: 3,
                cols: 2,
                sparse: Some(Csr {
                    crow: vec![0, 0, 1, 1],
                    col: vec![1],
                }),
            },
            logprobs: vec![-0.25],
        });
        o.prompt_alt_tokens = Some(AltTokens {
            k: 2,
            tokens: vec![1, 2, 3, 4, 5, 6],
            logprobs: vec![-1.0; 6],
        });
        o.prompt_cache_hit_tokens = 7;
        let r = sample_response(&o, None);
        assert_eq!(r.prompt_cache_hit_tokens, 7);
        let t = r.target_prompt_logprobs.unwrap();
        assert_eq!(
            (t.shape, t.dtype),
            (vec![3, 2], proto::DType::Float32 as i32)
        );
        let Some(proto::tensor::Encoding::SparseCsr(c)) = t.encoding else {
            panic!("sparse in, sparse out")
        };
        assert_eq!(
            proto::read_i64("c", &c.crow_indices).unwrap(),
            vec![0, 0, 1, 1]
        );
        assert_eq!(proto::read_f32("v", &c.values).unwrap(), vec![-0.25]);
        let a = r.prompt_alt_tokens.unwrap();
        let toks = a.tokens.unwrap();
        assert_eq!(
            (toks.shape, toks.dtype),
            (vec![3, 2], proto::DType::Int64 as i32)
        );
    }
}
