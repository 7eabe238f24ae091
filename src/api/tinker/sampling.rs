//! Sampling routes: sampling sessions (on the base model or a checkpoint's frozen weights),
//! their description, and `asample`, whose future answers with a protobuf `SampleResponse`.
//! Also the JSON forms of Tinker's sampling parameters, shared with the REST routes.

use super::TinkerPath;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{Json, Tenant};
use crate::api::Shared;
use crate::jobs::{SampleRequest, SessionId, TenantId};
use crate::model::BaseModel;
use crate::sample::SamplingParams;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{json, Value};

/// Tokens generated when a request names no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 128;

#[derive(Deserialize)]
pub struct CreateSamplingSession {
    session_id: String,
    sampling_session_seq_id: u64,
    #[serde(default)]
    model_path: Option<String>,
    #[serde(default)]
    base_model: Option<String>,
}

pub async fn create_sampling_session(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<CreateSamplingSession>,
) -> ApiResult<axum::Json<Value>> {
    let key = (req.session_id.clone(), req.sampling_session_seq_id);
    if let Some(id) = s.tinker.sampler_creates.get(&key) {
        return Ok(axum::Json(
            json!({"sampling_session_id": *id, "type": "create_sampling_session"}),
        ));
    }
    s.tinker.session(&tenant, &req.session_id)?;
    let id = match (&req.model_path, &req.base_model) {
        (Some(p), _) => {
            let path = TinkerPath::parse(p)?;
            s.engine.checkpoint_sampling_session(&tenant, &path.key())?
        }
        (None, Some(b)) => {
            super::training::check_base_model(&s, b)?;
            s.engine.base_sampling_session(&tenant).await?
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "model_path",
                "give a model_path (tinker://...) or a base_model",
            ))
        }
    };
    register_sampler(&s, &tenant, &req.session_id, &id, req.model_path.clone());
    s.tinker.sampler_creates.insert(key, id.0.clone());
    Ok(axum::Json(
        json!({"sampling_session_id": id.0, "type": "create_sampling_session"}),
    ))
}

/// Remember a sampling session under its Tinker session, so it is released with it.
pub fn register_sampler(
    s: &Shared,
    tenant: &TenantId,
    session: &str,
    id: &SessionId,
    path: Option<String>,
) {
    if let Ok(sess) = s.tinker.session(tenant, session) {
        sess.samplers.lock().push(id.0.clone());
    }
    s.tinker.sampler_paths.insert(id.0.clone(), path);
}

pub async fn get_sampler(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    s.engine
        .registry()
        .session(&tenant, &SessionId(id.clone()))?;
    let path = s.tinker.sampler_paths.get(&id).and_then(|p| p.clone());
    Ok(axum::Json(json!({
        "sampler_id": id,
        "base_model": s.model_name,
        "model_path": path,
    })))
}

/// `stop`: one string, several strings, or token ids. Absent: EOS stops; `[]`: nothing
/// stops but `max_tokens`.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
}

#[derive(Deserialize, Debug, Default)]
pub struct SamplingParamsJson {
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// loraplex extensions.
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
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

#[derive(Deserialize)]
pub struct Asample {
    #[serde(default)]
    sampling_session_id: Option<String>,
    #[serde(default)]
    seq_id: Option<u64>,
    #[serde(default)]
    num_samples: Option<usize>,
    prompt: Value,
    #[serde(default)]
    sampling_params: SamplingParamsJson,
    #[serde(default)]
    prompt_logprobs: Option<bool>,
    #[serde(default)]
    topk_prompt_logprobs: Option<usize>,
    #[serde(default)]
    topk_sample_logprobs: Option<usize>,
    #[serde(default)]
    prompt_alt_tokens_k: Option<usize>,
    #[serde(default)]
    target_prompt_logprobs: Option<Value>,
    #[serde(default)]
    prompt_logprobs_last_n: Option<usize>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
}

/// Removes a sampling session made for one request once that request is handled.
struct TransientSession<'a> {
    s: &'a Shared,
    tenant: &'a TenantId,
    id: Option<SessionId>,
}

impl Drop for TransientSession<'_> {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            let _ = self.s.engine.registry().remove_session(self.tenant, id);
        }
    }
}

/// How a sample future's result is rendered beyond the engine's output.
#[derive(Debug, Clone, Copy)]
pub struct SampleShape {
    /// Only the last n prompt logprobs are kept (others NaN).
    pub prompt_logprobs_last_n: Option<usize>,
}

pub async fn asample(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Asample>,
) -> ApiResult<axum::Json<Value>> {
    let n = req.num_samples.unwrap_or(1);
    if req.prompt_alt_tokens_k.unwrap_or(0) > 0 {
        return Err(ApiError::Engine(crate::Error::Unsupported(
            "prompt_alt_tokens_k > 0".into(),
        )));
    }
    if req
        .target_prompt_logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return Err(ApiError::Engine(crate::Error::Unsupported(
            "target_prompt_logprobs".into(),
        )));
    }
    let session = match (&req.sampling_session_id, &req.model_path, &req.base_model) {
        (Some(id), _, _) => SessionId(id.clone()),
        (None, Some(p), _) => {
            let path = TinkerPath::parse(p)?;
            s.engine.checkpoint_sampling_session(&tenant, &path.key())?
        }
        (None, None, Some(_)) => s.engine.base_sampling_session(&tenant).await?,
        _ => {
            return Err(ApiError::invalid(
                "sampling_session_id",
                "give a sampling_session_id",
            ))
        }
    };
    // A session made for this one request (model_path or base_model) goes when it is
    // submitted: the job holds what it needs, and the session would otherwise count
    // against the tenant's sampling_sessions quota forever.
    let _transient = TransientSession {
        s: &s,
        tenant: &tenant,
        id: req.sampling_session_id.is_none().then(|| session.clone()),
    };
    s.engine.registry().session(&tenant, &session)?;
    let key = req.seq_id.map(|q| (session.0.clone(), q));
    if let Some(k) = &key {
        if let Some(e) = s.tinker.samples.get(k) {
            return Ok(axum::Json(json!({
                "request_id": e.0 .0,
                "sample_sequence_ids": e.1,
            })));
        }
    }
    let model = s.engine.base_model().await?;
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
        sampler: None,
    };
    s.metrics.submitted(crate::jobs::JobKind::Sample);
    let f = s.engine.sample(&tenant, &session, sr).await?;
    s.tinker.sample_shapes.insert(
        f.clone(),
        SampleShape {
            prompt_logprobs_last_n: req.prompt_logprobs_last_n,
        },
    );
    let ids: Vec<String> = (0..n).map(|i| format!("{}-{i}", f.0)).collect();
    if let Some(k) = key {
        s.tinker.samples.insert(k, (f.clone(), ids.clone()));
    }
    Ok(axum::Json(json!({
        "request_id": f.0,
        "sample_sequence_ids": ids,
    })))
}
