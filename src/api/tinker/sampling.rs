//! Sampling routes: sampling sessions (on the base model or a checkpoint's frozen weights),
//! their description, and `asample`, whose future answers with a protobuf `SampleResponse`.
//! Also the JSON forms of Tinker's sampling parameters, shared with the REST routes.
//! Every sampled sequence gets a `sequence_id` ([`sequence_id`]); with
//! `record_stability_info` its record goes to the session's [`super::provenance`] store.

use super::provenance::{RecordStore, Scope, SequenceRecord};
use super::TinkerPath;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{Json, Path, Tenant};
use crate::api::Shared;
use crate::jobs::{FutureId, SampleOutput, SampleRecorder, SampleRequest, SessionId, TenantId};
use crate::model::BaseModel;
use crate::sample::prompt::{CellLayout, Csr, PromptTargets};
use crate::sample::SamplingParams;
use axum::extract::State;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Tokens generated when a request names no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 128;

#[derive(Deserialize, JsonSchema)]
pub struct CreateSamplingSession {
    session_id: String,
    sampling_session_seq_id: u64,
    /// A sampler checkpoint, `tinker://<model>/sampler_weights/<name>`.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::tinker_path_or_null")]
    model_path: Option<String>,
    /// One of the served base models' names (without `model_path`).
    #[serde(default)]
    base_model: Option<String>,
}

pub async fn create_sampling_session(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<CreateSamplingSession>,
) -> ApiResult<axum::Json<Value>> {
    let known = s
        .tinker
        .session(&tenant, &req.session_id)?
        .sampler_creates
        .lock()
        .get(req.sampling_session_seq_id);
    if let Some(id) = known {
        return Ok(axum::Json(
            json!({"sampling_session_id": id, "type": "create_sampling_session"}),
        ));
    }
    let id = match (&req.model_path, &req.base_model) {
        (Some(p), _) => {
            let path = TinkerPath::parse(p)?;
            s.engine
                .checkpoint_sampling_session(&tenant, &path.key())
                .await?
        }
        (None, Some(b)) => s.engine.base_sampling_session_on(&tenant, Some(b)).await?,
        (None, None) => {
            return Err(ApiError::invalid(
                "model_path",
                "give a model_path (tinker://...) or a base_model",
            ))
        }
    };
    if !register_sampler(&s, &tenant, &req.session_id, &id, req.model_path.clone()) {
        // The session ended meanwhile: nothing would ever release the sampler.
        let _ = s.engine.registry().remove_session(&tenant, &id);
        return Err(ApiError::not_found("session", &req.session_id));
    }
    if let Ok(sess) = s.tinker.session(&tenant, &req.session_id) {
        sess.sampler_creates
            .lock()
            .insert(req.sampling_session_seq_id, id.0.clone());
    }
    Ok(axum::Json(
        json!({"sampling_session_id": id.0, "type": "create_sampling_session"}),
    ))
}

/// Remember a sampling session under its Tinker session, so it is released with it.
/// False (and nothing remembered) when the session or the sampling session is gone.
pub fn register_sampler(
    s: &Shared,
    tenant: &TenantId,
    session: &str,
    id: &SessionId,
    path: Option<String>,
) -> bool {
    let Ok(sess) = s.tinker.session(tenant, session) else {
        return false;
    };
    // Checked under the session's entry: a release waits for it, so it cannot miss this.
    if s.engine.registry().session(tenant, id).is_err() {
        return false;
    }
    sess.samplers.lock().push(id.0.clone());
    s.tinker.sampler_paths.insert(id.0.clone(), path);
    true
}

pub async fn get_sampler(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let sampler = s
        .engine
        .registry()
        .session(&tenant, &SessionId(id.clone()))?;
    let path = s.tinker.sampler_paths.get(&id).and_then(|p| p.clone());
    Ok(axum::Json(json!({
        "sampler_id": id,
        "base_model": sampler.base,
        "model_path": path,
    })))
}

/// `stop`: one string, several strings, or token ids. Absent: EOS stops; `[]`: nothing
/// stops but `max_tokens`.
#[derive(Deserialize, Debug, JsonSchema)]
#[serde(untagged)]
pub enum Stop {
    Text(#[schemars(length(min = 1))] String),
    Texts(#[schemars(inner(length(min = 1)))] Vec<String>),
    Ids(#[schemars(inner(range(min = 0)))] Vec<i64>),
}

#[derive(Deserialize, Debug, Default, JsonSchema)]
pub struct SamplingParamsJson {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub temperature: Option<f32>,
    /// -1: no top-k filtering.
    #[serde(default)]
    #[schemars(range(min = -1))]
    pub top_k: Option<i64>,
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub top_p: Option<f32>,
    /// loraplex extension.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub min_p: Option<f32>,
    /// loraplex extension.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub repetition_penalty: Option<f32>,
}

impl SamplingParamsJson {
    /// Engine parameters and stop strings.
    pub fn resolve(&self, model: &BaseModel) -> ApiResult<(SamplingParams, Vec<String>)> {
        let d = SamplingParams::default();
        let mut p = SamplingParams {
            max_tokens: self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(-1),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed,
            stop_tokens: Vec::new(),
        };
        let mut strings = Vec::new();
        match &self.stop {
            None => {
                let eos = model.tokenizer()?.eos_token_id;
                p.stop_tokens.extend(eos);
            }
            Some(Stop::Text(t)) => strings.push(t.clone()),
            Some(Stop::Texts(ts)) => strings.extend(ts.iter().cloned()),
            Some(Stop::Ids(ids)) => {
                for &id in ids {
                    let ok = u32::try_from(id)
                        .ok()
                        .filter(|&t| (t as usize) < model.config.vocab_size);
                    match ok {
                        Some(t) => p.stop_tokens.push(t),
                        None => {
                            return Err(ApiError::invalid(
                                "sampling_params.stop",
                                format!(
                                    "token id {id} is outside the vocabulary (size {})",
                                    model.config.vocab_size
                                ),
                            ))
                        }
                    }
                }
            }
        }
        if strings.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "sampling_params.stop",
                "empty stop string",
            ));
        }
        Ok((p, strings))
    }
}

/// Tokens of a Tinker `ModelInput` in JSON: `{"chunks": [{"type": "encoded_text", ...}]}`.
pub fn model_input_tokens(field: &str, v: &Value) -> ApiResult<Vec<u32>> {
    let chunks = v
        .get("chunks")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid(field, "expected {\"chunks\": [...]}"))?;
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let f = format!("{field}.chunks[{i}]");
        match c
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("encoded_text")
        {
            "encoded_text" => {
                let toks = c
                    .get("tokens")
                    .and_then(Value::as_array)
                    .ok_or_else(|| ApiError::invalid(&f, "expected a tokens list"))?;
                for t in toks {
                    let id = t
                        .as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| ApiError::invalid(&f, format!("{t} is not a token id")))?;
                    out.push(id);
                }
            }
            other => {
                return Err(ApiError::Engine(crate::Error::Unsupported(format!(
                    "{f}: {other} chunks; the served model is text-only"
                ))))
            }
        }
    }
    Ok(out)
}

#[derive(Deserialize, JsonSchema)]
pub struct Asample {
    #[serde(default)]
    sampling_session_id: Option<String>,
    #[serde(default)]
    seq_id: Option<u64>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    num_samples: Option<usize>,
    #[schemars(schema_with = "crate::api::openapi::schema::model_input")]
    prompt: Value,
    #[serde(default)]
    sampling_params: SamplingParamsJson,
    #[serde(default)]
    prompt_logprobs: Option<bool>,
    #[serde(default)]
    topk_prompt_logprobs: Option<usize>,
    #[serde(default)]
    topk_sample_logprobs: Option<usize>,
    /// Draws from the model's distribution (at the request's temperature) at every prompt
    /// position after the first; at most 64, and at most 2^20 cells in all.
    #[serde(default)]
    #[schemars(range(max = 64))]
    prompt_alt_tokens_k: Option<usize>,
    /// Token ids whose logprobs to return, int64 `[len(prompt) - 1, K]` (`-1`: none),
    /// dense or sparse CSR; the answer has the same shape and layout.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::token_table_or_null")]
    target_prompt_logprobs: Option<Value>,
    #[serde(default)]
    prompt_logprobs_last_n: Option<usize>,
    /// Record each sampled sequence for `stable_reinforce` (its prompt, tokens and the
    /// sampler's logprobs), named by its `sequence_id` within the Tinker session.
    #[serde(default)]
    record_stability_info: Option<bool>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::tinker_path_or_null")]
    model_path: Option<String>,
}

pub async fn asample(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Asample>,
) -> ApiResult<axum::Json<Value>> {
    let n = req.num_samples.unwrap_or(1);
    let seq_id = req.seq_id;
    match req.sampling_session_id.clone() {
        Some(id) => {
            let session = SessionId(id.clone());
            s.engine.registry().session(&tenant, &session)?;
            let known = s
                .tinker
                .samples
                .get(&id)
                .and_then(|w| seq_id.and_then(|q| w.lock().get(q)));
            if let Some((f, n)) = known {
                return Ok(axum::Json(answer(&f, n)));
            }
            let f = submit_sample(&s, &tenant, &session, req).await?;
            if let Some(q) = seq_id {
                // Only for a sampling session still held: a released one is not recreated.
                if s.engine.registry().session(&tenant, &session).is_ok() {
                    s.tinker
                        .samples
                        .entry(id)
                        .or_default()
                        .lock()
                        .insert(q, (f.clone(), n));
                }
            }
            Ok(axum::Json(answer(&f, n)))
        }
        None => {
            // A sampling session for this request alone: gone once the job holds it (a
            // retry makes a new one, so there is nothing to remember for it). Run on a task
            // of its own so a client hanging up cannot leave the session behind.
            let session = match (&req.model_path, &req.base_model) {
                (Some(p), _) => {
                    let path = TinkerPath::parse(p)?;
                    s.engine
                        .checkpoint_sampling_session(&tenant, &path.key())
                        .await?
                }
                (None, Some(b)) => s.engine.base_sampling_session_on(&tenant, Some(b)).await?,
                _ => {
                    return Err(ApiError::invalid(
                        "sampling_session_id",
                        "give a sampling_session_id",
                    ))
                }
            };
            let (st, t, sid) = (s.clone(), tenant.clone(), session.clone());
            let f = tokio::spawn(async move {
                let f = submit_sample(&st, &t, &sid, req).await;
                let _ = st.engine.registry().remove_session(&t, &sid);
                f
            })
            .await
            .map_err(|e| {
                ApiError::Engine(crate::Error::Unavailable(format!("sample submission: {e}")))
            })??;
            Ok(axum::Json(answer(&f, n)))
        }
    }
}

/// The `sequence_id` of a sample request's `i`-th sequence: unique, since future ids are.
pub fn sequence_id(f: &FutureId, i: usize) -> String {
    format!("{}-{i}", f.0)
}

/// The asample answer: the future and one id per sequence.
fn answer(f: &FutureId, n: usize) -> Value {
    let ids: Vec<String> = (0..n).map(|i| sequence_id(f, i)).collect();
    json!({
        "request_id": f.0,
        "sample_sequence_ids": ids,
    })
}

/// Puts a finished request's sequences into the record store, under the Tinker session
/// that sampled them.
struct Recorder {
    store: Arc<RecordStore>,
    scope: Scope,
}

impl SampleRecorder for Recorder {
    fn record(&self, future: &FutureId, prompt: &[u32], out: &SampleOutput) {
        let prompt: Arc<[u32]> = prompt.into();
        for (i, seq) in out.sequences.iter().enumerate() {
            if seq.logprobs.len() != seq.tokens.len() {
                tracing::warn!(future = %future, "a sampled sequence without a logprob per token; not recorded");
                continue;
            }
            let rec = SequenceRecord {
                prompt: prompt.clone(),
                tokens: seq.tokens.clone(),
                logprobs: seq.logprobs.clone(),
            };
            self.store
                .record(&self.scope, sequence_id(future, i), Arc::new(rec));
        }
    }
}

/// The Tinker session a sampling session belongs to: its owner (an ephemeral sampler of a
/// training run), else the session it was created in.
fn tinker_session_of(s: &Shared, tenant: &TenantId, id: &SessionId) -> Option<String> {
    let sampler = s.engine.registry().session(tenant, id).ok()?;
    if let Some(owner) = &sampler.owner {
        return Some(owner.clone());
    }
    s.tinker
        .sessions
        .iter()
        .find(|e| &e.tenant == tenant && e.samplers.lock().iter().any(|x| x == &id.0))
        .map(|e| e.key().clone())
}

async fn submit_sample(
    s: &Shared,
    tenant: &TenantId,
    session: &SessionId,
    req: Asample,
) -> ApiResult<FutureId> {
    let n = req.num_samples.unwrap_or(1);
    let recorder: Option<Arc<dyn SampleRecorder>> = if req.record_stability_info == Some(true) {
        let owner = tinker_session_of(s, tenant, session).ok_or_else(|| {
            ApiError::invalid(
                "record_stability_info",
                "records belong to a Tinker session: sample through a sampling session \
                 created in one (create_sampling_session or save_weights_for_sampler)",
            )
        })?;
        Some(Arc::new(Recorder {
            store: s.tinker.records.clone(),
            scope: (tenant.clone(), owner),
        }))
    } else {
        None
    };
    let base = s.engine.registry().session(tenant, session)?.base.clone();
    let model = s.engine.base_model_named(&base).await?;
    let prompt = model_input_tokens("prompt", &req.prompt)?;
    let (params, stop_strings) = req.sampling_params.resolve(&model)?;
    let want_prompt_lp = req.prompt_logprobs.unwrap_or(false)
        || req.topk_prompt_logprobs.unwrap_or(0) > 0
        || req.prompt_logprobs_last_n.is_some();
    let sr = SampleRequest {
        prompt,
        params,
        num_samples: n,
        stop_strings,
        prompt_logprobs: want_prompt_lp,
        top_logprobs: req.topk_sample_logprobs.unwrap_or(0),
        prompt_top_logprobs: req.topk_prompt_logprobs.unwrap_or(0),
        prompt_logprobs_last_n: req.prompt_logprobs_last_n,
        target_prompt_logprobs: match &req.target_prompt_logprobs {
            Some(v) if !v.is_null() => Some(Arc::new(prompt_targets(v)?)),
            _ => None,
        },
        prompt_alt_tokens_k: req.prompt_alt_tokens_k.unwrap_or(0),
        sampler: None,
        recorder,
    };
    s.metrics.submitted(crate::jobs::JobKind::Sample);
    Ok(s.engine.sample(tenant, session, sr).await?)
}

/// `target_prompt_logprobs` as the SDK sends it (JSON `TensorData`): int64 token ids
/// `[rows, cols]`, dense or sparse CSR, `-1` naming nothing. The shape is bounded before
/// anything is built from it; the engine checks it against the prompt and vocabulary.
fn prompt_targets(v: &Value) -> ApiResult<PromptTargets> {
    const F: &str = "target_prompt_logprobs";
    let bad = |m: String| ApiError::invalid(F, m);
    let obj = v
        .as_object()
        .ok_or_else(|| bad("expected a TensorData object".into()))?;
    match obj.get("dtype").and_then(Value::as_str) {
        Some("int64") => {}
        other => return Err(bad(format!("dtype {other:?}: token ids are int64"))),
    }
    let shape: Option<Vec<usize>> = obj.get("shape").and_then(Value::as_array).and_then(|a| {
        a.iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect()
    });
    let (rows, cols) = match shape.as_deref() {
        Some(&[r, c]) => (r, c),
        _ => return Err(bad("needs a 2-D shape [len(prompt) - 1, K]".into())),
    };
    let indices = |key: &str| -> ApiResult<Option<Vec<usize>>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| bad(format!("{key} holds a value that is not an index"))),
            Some(_) => Err(bad(format!("{key} must be a list"))),
        }
    };
    let sparse = match (
        indices("sparse_crow_indices")?,
        indices("sparse_col_indices")?,
    ) {
        (None, None) => None,
        (Some(crow), Some(col)) => Some(Csr { crow, col }),
        _ => {
            return Err(bad(
                "sparse_crow_indices and sparse_col_indices go together".into(),
            ))
        }
    };
    let layout = CellLayout { rows, cols, sparse };
    layout.validate(F)?;
    let data = obj
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("needs a data list".into()))?;
    if data.len() != layout.cells() {
        return Err(bad(format!(
            "{} values for {} cells",
            data.len(),
            layout.cells()
        )));
    }
    let ids = data
        .iter()
        .enumerate()
        .map(|(i, x)| match x.as_i64() {
            Some(-1) => Ok(None),
            Some(t) => u32::try_from(t)
                .map(Some)
                .map_err(|_| bad(format!("value {t} at {i} is neither a token id nor -1"))),
            None => Err(bad(format!("value {x} at {i} is not an integer"))),
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(PromptTargets { layout, ids })
}
