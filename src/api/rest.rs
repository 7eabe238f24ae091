//! The simple REST routes of the Flask server loraplex replaces, with the same paths and
//! bodies, so its clients keep working: `/add_lora`, `/fwdbwd` (chat conversations, loss on
//! the assistant's tokens), `/optim_step`, `/retrieve_future` (202 while pending),
//! `/api/v1/sample` (synchronous text), `/remove_lora`, `/list_loss_functions`, and the
//! `/api/v1/..._async` aliases. They run on the same engine as the Tinker routes; only
//! the shapes of requests and results differ. This layer keeps nothing of its own: a
//! result renders from the stored job output alone (the same after a restart), and the
//! sampling sessions it makes live only while their jobs are submitted.

use super::error::{ApiError, ApiResult};
use super::extract::{Json, Tenant};
use super::tinker::sampling::SamplingParamsJson;
use super::tinker::training::{check_base_model, AdamJson};
use super::Shared;
use crate::jobs::{
    AdapterId, FbRequest, FutureId, JobKind, JobOutput, JobState, Op, SampleRequest, SessionId,
    TenantId,
};
use crate::lora::{LoraConfig, Target};
use crate::model::chat::Message;
use crate::model::BaseModel;
use crate::sample::StopReason;
use crate::train::loss::{BuiltinLoss, ConfigValue, LossConfig, LossInputs, TensorIn};
use crate::train::Datum;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What the replaced Flask server's clients call the base model it loaded: on these
/// routes it names the served base model (with several, the first `--model`).
pub(crate) const BASE_ALIAS: &str = "base";

#[derive(Deserialize, JsonSchema)]
pub(crate) struct AddLora {
    /// The served base model's name, or `"base"` for the default one.
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    #[schemars(range(min = 1, max = 1024))]
    rank: Option<usize>,
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    alpha: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
}

/// The served base a REST request names: a served name, else `"base"` (or nothing) for the
/// default one; any other name is a 400 listing the served ones.
fn rest_base(s: &Shared, name: Option<&str>) -> ApiResult<String> {
    let reg = s.engine.registry();
    match name {
        Some(b) if b == BASE_ALIAS && reg.resolve_base(Some(b)).is_err() => {
            Ok(reg.default_base().to_owned())
        }
        Some(b) => check_base_model(s, b),
        None => Ok(reg.default_base().to_owned()),
    }
}

/// The base model a REST adapter of `tenant` trains on (loaded).
async fn adapter_base(s: &Shared, tenant: &TenantId, model_id: &str) -> ApiResult<Arc<BaseModel>> {
    let e = s
        .engine
        .registry()
        .adapter(tenant, &AdapterId(model_id.to_owned()))?;
    Ok(s.engine.base_model_named(&e.base).await?)
}

/// Create an adapter on attention and MLP (rank 8, alpha 16 unless given). The adapter
/// exists when this returns; the future is for clients that wait on it.
pub(crate) async fn add_lora(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<AddLora>,
) -> ApiResult<axum::Json<Value>> {
    let base = rest_base(&s, req.base_model.as_deref())?;
    let rank = req.rank.unwrap_or(8);
    let config = LoraConfig {
        rank,
        alpha: req.alpha.unwrap_or(2.0 * rank as f32),
        seed: req.seed.unwrap_or(0),
        targets: Target::ALL.to_vec(),
        train_unembed: false,
    };
    if !(config.alpha.is_finite() && config.alpha > 0.0) {
        return Err(ApiError::invalid("alpha", "must be a positive number"));
    }
    // The future below is a job: refuse before creating rather than after.
    s.engine.admit_job(&tenant)?;
    let id = s
        .engine
        .create_model_on(&tenant, Some(&base), config)
        .await?;
    let out = id.clone();
    let f = s
        .engine
        .spawn_job(&tenant, JobKind::CreateModel, async move {
            Ok(JobOutput::ModelCreated(out))
        })?;
    Ok(axum::Json(json!({"request_id": f.0, "model_id": id.0})))
}

#[derive(Deserialize, JsonSchema)]
pub(crate) struct FwdBwd {
    model_id: String,
    /// Chat conversations; the loss is on the assistant's tokens.
    #[schemars(schema_with = "crate::api::openapi::schema::conversations")]
    data: Vec<Vec<Message>>,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::loss_fn_or_null")]
    loss_fn: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::config_map_or_null")]
    loss_fn_config: Option<BTreeMap<String, ConfigValue>>,
}

/// Most messages in one conversation: rendering is quadratic in them (each prefix is
/// rendered to find where the assistant's tokens start).
const MAX_MESSAGES: usize = 256;

/// Bytes of text per token of context accepted before tokenizing. A token of this
/// tokenizer covers far fewer bytes, so a text over `context × this` could never fit the
/// context: refusing it early only saves the work of tokenizing it.
const MAX_TEXT_BYTES_PER_TOKEN: usize = 64;

/// Refuse a text too long for the model's context before it is tokenized.
fn check_text_len(field: &str, bytes: usize, model: &crate::model::BaseModel) -> ApiResult<()> {
    let max = model
        .config
        .max_position_embeddings
        .saturating_mul(MAX_TEXT_BYTES_PER_TOKEN);
    if bytes > max {
        return Err(ApiError::invalid(
            field,
            format!(
                "{bytes} bytes of text cannot fit the context of {} tokens (at most {max} bytes)",
                model.config.max_position_embeddings
            ),
        ));
    }
    Ok(())
}

/// Render each conversation with the chat template; weight 1 on the assistant's tokens.
pub(crate) async fn fwdbwd(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<FwdBwd>,
) -> ApiResult<axum::Json<Value>> {
    let model = adapter_base(&s, &tenant, &req.model_id).await?;
    if req.data.is_empty() {
        return Err(ApiError::invalid("data", "no conversations"));
    }
    for (i, conv) in req.data.iter().enumerate() {
        if conv.len() > MAX_MESSAGES {
            return Err(ApiError::invalid(
                format!("data[{i}]"),
                format!("{} messages; at most {MAX_MESSAGES}", conv.len()),
            ));
        }
        let bytes = conv.iter().map(|m| m.role.len() + m.content.len()).sum();
        check_text_len(&format!("data[{i}]"), bytes, &model)?;
    }
    // Tokenizing is CPU work: off tokio's workers.
    let convs = req.data;
    let data = tokio::task::spawn_blocking(move || render_conversations(&model, &convs))
        .await
        .map_err(|e| crate::Error::Panic(format!("rendering conversations: {e}")))??;
    let config: LossConfig = req.loss_fn_config.unwrap_or_default();
    let loss_name = req.loss_fn.unwrap_or_else(|| "cross_entropy".into());
    let loss = s.plugins.resolve_loss(&tenant, &loss_name, &config)?;
    let op = Op::ForwardBackward(FbRequest {
        data,
        loss,
        loss_config: config,
    });
    submit_op(&s, &tenant, req.model_id, op).await
}

/// Conversations as datums (weight 1 on the assistant's tokens).
fn render_conversations(
    model: &crate::model::BaseModel,
    convs: &[Vec<Message>],
) -> ApiResult<Vec<Datum>> {
    let tok = model.tokenizer()?;
    let tmpl = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::Engine(crate::Error::Template(
            "the model has no chat template".into(),
        ))
    })?;
    let mut data = Vec::with_capacity(convs.len());
    for (i, conv) in convs.iter().enumerate() {
        let r = tmpl.render_tokens(tok, conv)?;
        if r.tokens.len() < 2 || !r.assistant_mask.iter().skip(1).any(|&m| m) {
            return Err(ApiError::invalid(
                format!("data[{i}]"),
                "the conversation has no assistant tokens to train on",
            ));
        }
        let n = r.tokens.len() - 1;
        let w: Vec<f32> = (0..n)
            .map(|j| if r.assistant_mask[j + 1] { 1.0 } else { 0.0 })
            .collect();
        let mut inputs = LossInputs::new();
        inputs.insert(
            "target_tokens".into(),
            TensorIn::i64(vec![n], r.tokens[1..].iter().map(|&t| t as i64).collect()),
        );
        inputs.insert("weights".into(), TensorIn::f32(vec![n], w));
        data.push(Datum {
            model_input: r.tokens[..n].to_vec(),
            loss_fn_inputs: inputs,
        });
    }
    Ok(data)
}

#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "RestOptimStep")]
pub(crate) struct OptimStep {
    model_id: String,
    #[serde(default)]
    adam_params: Option<AdamJson>,
}

pub(crate) async fn optim_step(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<OptimStep>,
) -> ApiResult<axum::Json<Value>> {
    let params = req
        .adam_params
        .map(|a| a.params())
        .unwrap_or_else(|| AdamJson::default().params());
    let op = Op::OptimStep(params);
    submit_op(&s, &tenant, req.model_id, op).await
}

#[derive(Deserialize, JsonSchema)]
pub(crate) struct RemoveLora {
    model_id: String,
}

pub(crate) async fn remove_lora(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<RemoveLora>,
) -> ApiResult<axum::Json<Value>> {
    s.engine
        .delete_model(&tenant, &AdapterId(req.model_id.clone()))
        .await?;
    Ok(axum::Json(
        json!({"model_id": req.model_id, "removed": true}),
    ))
}

#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "RestRetrieve")]
pub(crate) struct Retrieve {
    request_id: String,
}

/// How long `/retrieve_future` waits before answering 202 (the seed answered at once;
/// a short wait saves polling clients a round trip).
const REST_POLL: Duration = Duration::from_secs(2);

pub(crate) async fn retrieve_future(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Retrieve>,
) -> ApiResult<Response> {
    let id = FutureId(req.request_id.clone());
    let rec = s.engine.wait(&tenant, &id, REST_POLL).await?;
    match (rec.state, rec.output, rec.failure) {
        (JobState::Done, Some(out), _) => Ok(axum::Json(render(&s, &out)?).into_response()),
        (JobState::Failed, _, Some(f)) => Err(ApiError::Engine(crate::Error::JobFailed {
            message: f.message,
            category: f.category,
        })),
        _ => Ok((
            StatusCode::ACCEPTED,
            axum::Json(json!({"status": "pending", "request_id": req.request_id})),
        )
            .into_response()),
    }
}

/// A finished future's JSON. Everything it needs is in the stored output, so a result
/// read after a restart renders as it did before.
fn render(s: &Shared, out: &JobOutput) -> ApiResult<Value> {
    Ok(match out {
        JobOutput::ModelCreated(m) => json!({"status": "completed", "model_id": m.0}),
        JobOutput::ForwardBackward(r) => {
            // The assistant tokens of the conversations: the weights the route set.
            let w = r.weight_sum;
            json!({
                "status": "completed",
                "loss": if w > 0.0 { r.loss / w } else { r.loss },
                "loss_sum": r.loss,
                "num_tokens": w,
                "metrics": r.metrics,
            })
        }
        JobOutput::OptimStep(r) => json!({
            "status": "completed",
            "step": r.step,
            "grad_norm": r.grad_norm,
            "clipped": r.clipped,
        }),
        JobOutput::Sample(o) => {
            // The tokens are those of the base that sampled them.
            let reg = s.engine.registry();
            let tok = match &o.base_model {
                Some(b) => reg.base_now_named(b),
                None => reg.base_now(),
            };
            let tok = tok.ok_or_else(|| {
                ApiError::Engine(crate::Error::Unavailable(format!(
                    "base model {:?} is not served",
                    o.base_model.as_deref().unwrap_or(reg.default_base())
                )))
            })?;
            let tok = tok.tokenizer()?;
            let texts: Vec<String> = o
                .sequences
                .iter()
                .map(|q| tok.decode(&q.tokens, true))
                .collect::<Result<_, _>>()?;
            json!({"status": "completed", "generated_text": texts})
        }
        other => json!({"status": "completed", "result": format!("{other:?}")}),
    })
}

#[derive(Deserialize, JsonSchema)]
pub(crate) struct Sample {
    /// A REST adapter, or a base model alone (its name; absent or `"base"`: the default).
    #[serde(default)]
    model_id: Option<String>,
    #[schemars(length(min = 1), inner(length(min = 1)))]
    prompts: Vec<String>,
    #[serde(default)]
    sampling_params: SamplingParamsJson,
    /// Render each prompt as a user turn with the chat template (default: raw text).
    #[serde(default)]
    chat: bool,
    /// An uploaded sampler plugin and its config.
    #[serde(default)]
    sampler: Option<SamplerRef>,
}

#[derive(Deserialize, JsonSchema)]
pub(crate) struct SamplerRef {
    plugin: String,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::config_map")]
    config: BTreeMap<String, ConfigValue>,
}

/// Most prompts in one sampling request (each is a job of its own).
const MAX_PROMPTS: usize = crate::jobs::sampling::MAX_NUM_SAMPLES;

/// [`submit_samples`] on a task of its own: a client that hangs up mid-way cannot cancel
/// it between making its sampling session and removing it.
async fn submit_detached(s: &Shared, tenant: &TenantId, req: Sample) -> ApiResult<Vec<FutureId>> {
    let (s, tenant) = (s.clone(), tenant.clone());
    tokio::spawn(async move { submit_samples(&s, &tenant, req).await })
        .await
        .map_err(|e| {
            ApiError::Engine(crate::Error::Unavailable(format!(
                "sampling submission: {e}"
            )))
        })?
}

/// Submit one sample job per prompt; returns the futures in prompt order.
async fn submit_samples(s: &Shared, tenant: &TenantId, req: Sample) -> ApiResult<Vec<FutureId>> {
    if req.prompts.is_empty() {
        return Err(ApiError::invalid("prompts", "no prompts"));
    }
    if req.prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompts",
            format!("{} prompts; at most {MAX_PROMPTS}", req.prompts.len()),
        ));
    }
    let reg = s.engine.registry();
    let base = match req.model_id.as_deref() {
        None => Some(reg.default_base().to_owned()),
        Some(m) if m == BASE_ALIAS || reg.resolve_base(Some(m)).is_ok() => {
            Some(rest_base(s, Some(m))?)
        }
        Some(_) => None,
    };
    let model = match (&base, req.model_id.as_deref()) {
        (Some(b), _) => s.engine.base_model_named(b).await?,
        (None, m) => adapter_base(s, tenant, m.unwrap_or_default()).await?,
    };
    for (i, p) in req.prompts.iter().enumerate() {
        check_text_len(&format!("prompts[{i}]"), p.len(), &model)?;
    }
    let session = match (&base, req.model_id.as_deref()) {
        (Some(b), _) => s.engine.base_sampling_session_on(tenant, Some(b)).await?,
        (None, m) => {
            s.engine
                .sampling_session(
                    tenant,
                    &AdapterId(m.unwrap_or_default().to_owned()),
                    None,
                    Duration::from_secs(600),
                )
                .await?
        }
    };
    // The sampling session lives only while its jobs are submitted (each job holds its
    // snapshot): removed on every way out, so a refused request leaves nothing behind
    // (it counts against the tenant's sampling_sessions quota while it exists).
    let futures = submit_on(s, tenant, &session, &model, req).await;
    let _ = s.engine.registry().remove_session(tenant, &session);
    futures
}

async fn submit_on(
    s: &Shared,
    tenant: &TenantId,
    session: &SessionId,
    model: &BaseModel,
    req: Sample,
) -> ApiResult<Vec<FutureId>> {
    let (params, stop_strings) = req.sampling_params.resolve(model)?;
    let sampler = match req.sampler {
        Some(r) => Some(s.plugins.resolve_sampler(tenant, &r.plugin, r.config)?),
        None => None,
    };
    let tok = model.tokenizer()?;
    let mut futures = Vec::new();
    for (i, p) in req.prompts.iter().enumerate() {
        let prompt = if req.chat {
            let tmpl = model.chat_template.as_ref().ok_or_else(|| {
                ApiError::Engine(crate::Error::Template(
                    "the model has no chat template".into(),
                ))
            })?;
            let text = tmpl.render(
                &[Message {
                    role: "user".into(),
                    content: p.clone(),
                }],
                true,
            )?;
            tok.encode(&text)?
        } else {
            tok.encode(p)?
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(format!("prompts[{i}]"), "empty prompt"));
        }
        let mut r = SampleRequest::new(prompt, params.clone());
        r.stop_strings = stop_strings.clone();
        r.sampler = sampler.clone();
        s.metrics.submitted(JobKind::Sample);
        futures.push(s.engine.sample(tenant, session, r).await?);
    }
    Ok(futures)
}

/// Synchronous sampling: `{generated_text: [one string per prompt], outputs: [...]}`.
pub(crate) async fn sample(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Sample>,
) -> ApiResult<axum::Json<Value>> {
    let futures = submit_detached(&s, &tenant, req).await?;
    let mut texts = Vec::new();
    let mut outputs = Vec::new();
    for f in futures {
        let out = s
            .engine
            .result(&tenant, &f, Duration::from_secs(600))
            .await?;
        let JobOutput::Sample(o) = &*out else {
            return Err(ApiError::Engine(crate::Error::Unavailable(
                "unexpected job output".into(),
            )));
        };
        let q = o.sequences.first().ok_or_else(|| {
            ApiError::Engine(crate::Error::Unavailable("no sequence sampled".into()))
        })?;
        // Decoded by the base that sampled them.
        let model = match &o.base_model {
            Some(b) => s.engine.base_model_named(b).await?,
            None => s.engine.base_model().await?,
        };
        let text = model.tokenizer()?.decode(&q.tokens, true)?;
        outputs.push(json!({
            "text": text,
            "tokens": q.tokens,
            "logprobs": q.logprobs,
            "stop_reason": match q.stop_reason { StopReason::Stop => "stop", StopReason::Length => "length" },
        }));
        texts.push(text);
    }
    Ok(axum::Json(
        json!({"generated_text": texts, "outputs": outputs}),
    ))
}

/// Sampling as futures (one per prompt), for `/retrieve_future`.
pub(crate) async fn sample_async(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<Sample>,
) -> ApiResult<axum::Json<Value>> {
    let futures = submit_detached(&s, &tenant, req).await?;
    let ids: Vec<&str> = futures.iter().map(|f| f.0.as_str()).collect();
    Ok(axum::Json(
        json!({"request_id": ids.first(), "request_ids": ids}),
    ))
}

pub(crate) async fn list_loss_functions(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
) -> axum::Json<Value> {
    let builtin: Vec<&str> = BuiltinLoss::ALL.iter().map(|l| l.name()).collect();
    let plugins = s.plugins.loss_plugins(&tenant);
    axum::Json(json!({
        "loss_functions": builtin,
        "plugins": plugins.iter().map(|p| format!("plugin:{p}")).collect::<Vec<_>>(),
    }))
}

/// Submit a REST route's operation on its adapter: `{"request_id", "model_id"}`.
async fn submit_op(
    s: &Shared,
    tenant: &TenantId,
    model_id: String,
    op: Op,
) -> ApiResult<axum::Json<Value>> {
    s.metrics.submitted(op.kind());
    let f = s
        .engine
        .submit(tenant, &AdapterId(model_id.clone()), None, op)
        .await?;
    Ok(axum::Json(json!({"request_id": f.0, "model_id": model_id})))
}
