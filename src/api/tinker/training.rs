//! Training routes: create a LoRA model (fresh or from a checkpoint), its info,
//! forward / forward_backward (protobuf in), optim_step, saving checkpoints (training,
//! sampler, external) and loading them. Each submit validates, hands the engine one op and
//! answers with a future; the engine runs a model's ops in the SDK's `seq_id` order.
//! A loss that reads what was recorded at sampling time (`stable_reinforce`) has its
//! datums' provenance spans resolved here, against the model's Tinker session's records.
//! Listing and managing runs and checkpoints: [`super::runs`].

use super::provenance::{Provenance, Span, SpanKind, MAX_SEQUENCE_ID_BYTES};
use super::runs::ttl;
use super::session::session_of_model;
use super::{check_name, TinkerPath};
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{Json, Proto, Tenant};
use crate::api::proto::{self, chunk, loss_config_value, provenance_span, tensor};
use crate::api::Shared;
use crate::jobs::{
    AdapterId, FbRequest, FutureId, JobKind, JobOutput, Op, RunMeta, TenantId, UserMetadata,
};
use crate::lora::optim::AdamParams;
use crate::lora::LoraConfig;
use crate::train::loss::{
    self, BuiltinLoss, ConfigValue, LossConfig, LossInputs, TensorIn, RECORDED_LOGPROBS,
    RECORDED_PREFIX, RECORDED_SAMPLED,
};
use crate::train::Datum;
use axum::extract::State;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

fn future_json(id: &FutureId, model: Option<&str>) -> axum::Json<Value> {
    axum::Json(json!({"request_id": id.0, "model_id": model}))
}

#[derive(Deserialize, JsonSchema)]
pub struct LoraConfigJson {
    #[serde(default)]
    #[schemars(range(min = 1, max = 1024))]
    rank: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    train_unembed: Option<bool>,
    #[serde(default)]
    train_mlp: Option<bool>,
    #[serde(default)]
    train_attn: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
pub struct CreateModel {
    session_id: String,
    model_seq_id: u64,
    /// One of the served base models' names (`GET /api/v1/get_server_capabilities`).
    base_model: String,
    #[serde(default)]
    lora_config: Option<LoraConfigJson>,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::optimizer_config")]
    optimizer_config: Option<Value>,
    /// Strings only, at most 16 KiB serialized; returned with the training run.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::user_metadata")]
    user_metadata: Option<Value>,
}

/// The base model a request names must be one of those served: its name, or a 400 that
/// names it and lists the served ones.
pub fn check_base_model(s: &Shared, name: &str) -> ApiResult<String> {
    Ok(s.engine.registry().resolve_base(Some(name))?)
}

fn check_optimizer(cfg: &Option<Value>) -> ApiResult<()> {
    match cfg
        .as_ref()
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
    {
        None | Some("adamw") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "optimizer_config.type",
            format!("{other:?} is not supported; use \"adamw\""),
        )),
    }
}

pub async fn create_model(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<CreateModel>,
) -> ApiResult<axum::Json<Value>> {
    let sess = s.tinker.session(&tenant, &req.session_id)?;
    let base = check_base_model(&s, &req.base_model)?;
    check_optimizer(&req.optimizer_config)?;
    let user_metadata = UserMetadata::from_json("user_metadata", req.user_metadata)?;
    let l = req.lora_config.unwrap_or(LoraConfigJson {
        rank: None,
        seed: None,
        train_unembed: None,
        train_mlp: None,
        train_attn: None,
    });
    let config = LoraConfig::from_tinker(
        l.rank.unwrap_or(32),
        l.seed.unwrap_or(0),
        l.train_attn.unwrap_or(true),
        l.train_mlp.unwrap_or(true),
        l.train_unembed.unwrap_or(true),
    )?;
    let model_id = format!("{}:train:{}", req.session_id, req.model_seq_id);
    let mut creates = sess.model_creates.lock();
    let (future, model_id) = match creates.get(req.model_seq_id) {
        Some(known) => known,
        None => {
            // Refused at once (403) at the quota; the job claims its place exactly.
            s.engine.registry().check_run_quota(&tenant)?;
            let engine = s.engine.clone();
            let (t, id) = (tenant.clone(), AdapterId(model_id.clone()));
            let session = req.session_id.clone();
            let state = s.clone();
            // Listed before the job can fail and unlist it.
            sess.models.lock().push(model_id.clone());
            let f = s
                .engine
                .spawn_job(&tenant, JobKind::CreateModel, async move {
                    let meta = RunMeta {
                        base: Some(base),
                        session: Some(session.clone()),
                        user_metadata,
                    };
                    let r = engine
                        .create_model_as(&t, id.clone(), config, Some(1), meta)
                        .await;
                    if r.is_err() {
                        // Never made: not the session's to release.
                        forget_model(&state, &session, &id.0);
                    }
                    r.map(JobOutput::ModelCreated)
                });
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    drop(creates);
                    drop(sess);
                    forget_model(&s, &req.session_id, &model_id);
                    return Err(e.into());
                }
            };
            creates.insert(req.model_seq_id, (f.clone(), model_id.clone()));
            (f, model_id)
        }
    };
    Ok(future_json(&future, Some(&model_id)))
}

#[derive(Deserialize, JsonSchema)]
pub struct ModelRef {
    model_id: String,
}

pub async fn get_info(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<ModelRef>,
) -> ApiResult<axum::Json<Value>> {
    let e = s
        .engine
        .registry()
        .adapter(&tenant, &AdapterId(req.model_id.clone()))?;
    Ok(axum::Json(json!({
        "type": "get_info",
        "model_id": req.model_id,
        "model_data": {
            "arch": "llama",
            "model_name": e.base,
            "tokenizer_id": e.base,
        },
        "is_lora": true,
        "lora_rank": e.config.rank,
        "step": e.step(),
        "model_name": e.base,
        "optimizer_config": {"type": "adamw"},
    })))
}

fn seq(field: &str, v: i64) -> ApiResult<u64> {
    u64::try_from(v).map_err(|_| ApiError::invalid(field, format!("{v} is negative")))
}

// --- forward_backward ------------------------------------------------------------------

/// A datum's tokens: the concatenated text chunks, as unsigned ids.
fn model_input(field: &str, chunks: &[proto::Chunk]) -> ApiResult<Vec<u32>> {
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match &c.chunk {
            Some(chunk::Chunk::EncodedText(t)) => {
                for id in proto::read_i32(&f, &t.tokens)? {
                    let id = u32::try_from(id)
                        .map_err(|_| ApiError::invalid(&f, format!("token id {id} is negative")))?;
                    out.push(id);
                }
            }
            Some(chunk::Chunk::Image(_)) | Some(chunk::Chunk::Dmel(_)) => {
                return Err(ApiError::Engine(crate::Error::Unsupported(format!(
                    "{f}: image and dmel chunks; the served model is text-only"
                ))))
            }
            None => return Err(ApiError::invalid(f, "empty chunk")),
        }
    }
    Ok(out)
}

/// A loss input tensor: dense or sparse CSR (densified with 0), float32, int64 or int32.
///
/// `max_values` bounds the decoded size (`limit` says where the bound comes from): it is
/// checked on the shape, with overflow-checked arithmetic, before anything is allocated, so
/// a tiny body that claims a huge shape (a CSR tensor of shape `[1, 2^40]` and no entries)
/// is refused instead of allocated.
pub fn tensor_in(
    field: &str,
    t: &proto::Tensor,
    max_values: usize,
    limit: &str,
) -> ApiResult<TensorIn> {
    let dtype = proto::DType::try_from(t.dtype).unwrap_or(proto::DType::Unspecified);
    let values = |bytes: &[u8]| -> ApiResult<Result<Vec<f32>, Vec<i64>>> {
        Ok(match dtype {
            proto::DType::Float32 => Ok(proto::read_f32(field, bytes)?),
            proto::DType::Int64 => Err(proto::read_i64(field, bytes)?),
            proto::DType::Int32 => Err(proto::read_i32(field, bytes)?
                .into_iter()
                .map(i64::from)
                .collect()),
            other => {
                return Err(ApiError::invalid(
                    field,
                    format!("dtype {other:?} is not supported; use float32 or int64"),
                ))
            }
        })
    };
    if t.shape.len() > MAX_TENSOR_RANK {
        return Err(ApiError::invalid(
            field,
            format!(
                "shape has {} dimensions; at most {MAX_TENSOR_RANK}",
                t.shape.len()
            ),
        ));
    }
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| ApiError::invalid(field, "negative dimension in shape"))?;
    let too_big = || {
        ApiError::invalid(
            field,
            format!("shape {shape:?} holds more than {max_values} values ({limit})"),
        )
    };
    let size = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= max_values)
        .ok_or_else(too_big)?;
    let (shape, data) = match &t.encoding {
        Some(tensor::Encoding::Dense(bytes)) => {
            let v = values(bytes)?;
            let n = v.as_ref().map_or_else(Vec::len, Vec::len);
            if n > max_values {
                return Err(too_big());
            }
            let shape = if shape.is_empty() { vec![n] } else { shape };
            if !t.shape.is_empty() && size != n {
                return Err(ApiError::invalid(
                    field,
                    format!("shape {shape:?} does not match {n} values"),
                ));
            }
            (shape, v)
        }
        Some(tensor::Encoding::SparseCsr(csr)) => {
            let [rows, cols] = shape[..] else {
                return Err(ApiError::invalid(
                    field,
                    "a sparse tensor needs a 2-D shape",
                ));
            };
            // Every read below is bounded by the body's length; `size` (checked above)
            // bounds the dense result.
            let crow = proto::read_i64(field, &csr.crow_indices)?;
            let col = proto::read_i64(field, &csr.col_indices)?;
            let vals = values(&csr.values)?;
            let nnz = vals.as_ref().map_or_else(Vec::len, Vec::len);
            let ok = crow.len() == rows + 1
                && crow.first() == Some(&0)
                && crow.last().and_then(|&l| usize::try_from(l).ok()) == Some(nnz)
                && col.len() == nnz
                && crow.windows(2).all(|w| w[0] <= w[1])
                && col
                    .iter()
                    .all(|&c| usize::try_from(c).is_ok_and(|c| c < cols));
            if !ok {
                return Err(ApiError::invalid(field, "inconsistent sparse CSR indices"));
            }
            // crow is non-decreasing from 0 to nnz and every column is below `cols`, so
            // each place is below rows * cols = size.
            let mut idx = Vec::with_capacity(nnz);
            for (r, w) in crow.windows(2).enumerate() {
                for c in &col[w[0] as usize..w[1] as usize] {
                    idx.push(r * cols + *c as usize);
                }
            }
            let dense = match vals {
                Ok(v) => {
                    let mut d = vec![0f32; size];
                    idx.iter().zip(v).for_each(|(&i, x)| d[i] = x);
                    Ok(d)
                }
                Err(v) => {
                    let mut d = vec![0i64; size];
                    idx.iter().zip(v).for_each(|(&i, x)| d[i] = x);
                    Err(d)
                }
            };
            (vec![rows, cols], dense)
        }
        None => return Err(ApiError::invalid(field, "tensor has no data")),
    };
    Ok(match data {
        Ok(f) => TensorIn::f32(shape, f),
        Err(i) => TensorIn::i64(shape, i),
    })
}

/// Loss inputs are `[N]` or `[N, K]`; a little room for plugins' own inputs.
const MAX_TENSOR_RANK: usize = 4;

fn loss_config(req: &proto::ForwardBackwardRequest) -> LossConfig {
    if !req.loss_fn_config_v2.is_empty() {
        req.loss_fn_config_v2
            .iter()
            .filter_map(|(k, v)| {
                let v = match v.value.as_ref()? {
                    loss_config_value::Value::Number(x) => ConfigValue::Number(*x),
                    loss_config_value::Value::Text(t) => ConfigValue::Text(t.clone()),
                };
                Some((k.clone(), v))
            })
            .collect()
    } else {
        req.loss_fn_config
            .iter()
            .map(|(k, v)| (k.clone(), ConfigValue::Number(*v)))
            .collect()
    }
}

pub async fn forward_backward(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Proto(req): Proto<proto::ForwardBackwardRequest>,
) -> ApiResult<axum::Json<Value>> {
    let seq_id = seq("seq_id", i64::from(req.seq_id))?;
    let op = fb_op(&s, &tenant, &req);
    let f = submit(&s, &tenant, &req.model_id, seq_id, op).await?;
    Ok(future_json(&f, Some(&req.model_id)))
}

/// A forward_backward request's datums, every size checked before it is allocated: each
/// loss input at most `tokens × max_cols` values, all of them together at most
/// `max_values`.
pub fn decode_data(
    req: &proto::ForwardBackwardRequest,
    max_cols: usize,
    max_values: usize,
) -> ApiResult<Vec<Datum>> {
    // What the whole request may decode to: its datums' tokens times the widest legal
    // input, at most the configured bound.
    let mut budget = max_values;
    let mut data = Vec::with_capacity(req.data.len());
    for (i, d) in req.data.iter().enumerate() {
        let field = format!("data[{i}]");
        let tokens = model_input(&format!("{field}.model_input"), &d.model_input)?;
        let mut inputs = LossInputs::new();
        for (name, t) in &d.loss_fn_inputs {
            let f = format!("{field}.loss_fn_inputs.{name}");
            if name.starts_with(RECORDED_PREFIX) {
                return Err(ApiError::invalid(
                    f,
                    format!(
                        "names starting with {RECORDED_PREFIX:?} are filled in by the server \
                         from what it recorded at sampling time"
                    ),
                ));
            }
            let legal = tokens.len().max(1).saturating_mul(max_cols);
            let tensor = if legal <= budget {
                let why = format!(
                    "{} tokens times at most {max_cols} columns, LORAPLEX_MAX_LOSS_INPUT_COLUMNS",
                    tokens.len()
                );
                tensor_in(&f, t, legal, &why)?
            } else {
                let why = format!(
                    "what is left of the request's {} values, LORAPLEX_MAX_LOSS_INPUT_VALUES",
                    max_values
                );
                tensor_in(&f, t, budget, &why)?
            };
            budget -= tensor.len();
            inputs.insert(name.clone(), tensor);
        }
        data.push(Datum {
            model_input: tokens,
            loss_fn_inputs: inputs,
        });
    }
    Ok(data)
}

fn fb_op(s: &Shared, tenant: &TenantId, req: &proto::ForwardBackwardRequest) -> ApiResult<Op> {
    let mut data = decode_data(
        req,
        s.cfg.max_loss_input_columns,
        s.cfg.max_loss_input_values,
    )?;
    let config = loss_config(req);
    let loss = s.plugins.resolve_loss(tenant, &req.loss_fn, &config)?;
    if BuiltinLoss::parse(&req.loss_fn).is_ok_and(BuiltinLoss::needs_provenance) {
        resolve_provenance(s, tenant, req, &mut data)?;
    }
    let fb = FbRequest {
        data,
        loss,
        loss_config: config,
    };
    Ok(if req.forward_only {
        Op::Forward(fb)
    } else {
        Op::ForwardBackward(fb)
    })
}

/// Datum `i`'s provenance spans, checked for shape (both lists or neither, at most two per
/// position, ids of bounded length, no negative offset or length) before anything is
/// made of them. `None` when it has none.
fn provenance(field: &str, d: &proto::Datum, n: usize) -> ApiResult<Option<Provenance>> {
    if d.model_input_spans.is_empty() && d.loss_fn_input_spans.is_empty() {
        return Ok(None);
    }
    let list = |name: &str, spans: &[proto::ProvenanceSpan]| -> ApiResult<Vec<Span>> {
        let f = format!("{field}.{name}");
        if spans.is_empty() {
            return Err(ApiError::invalid(
                f,
                "missing: provenance comes as a pair (model_input_spans and loss_fn_input_spans)",
            ));
        }
        let max = n.saturating_mul(2).saturating_add(2);
        if spans.len() > max {
            return Err(ApiError::invalid(
                f,
                format!("{} spans for {n} positions; at most {max}", spans.len()),
            ));
        }
        spans
            .iter()
            .enumerate()
            .map(|(j, sp)| {
                let f = format!("{f}[{j}]");
                let (kind, run) = match &sp.span {
                    Some(provenance_span::Span::PromptTokens(r)) => (SpanKind::Prompt, r),
                    Some(provenance_span::Span::SampledTokens(r)) => (SpanKind::Sampled, r),
                    None => return Err(ApiError::invalid(f, "empty span")),
                };
                if run.sequence_id.is_empty() || run.sequence_id.len() > MAX_SEQUENCE_ID_BYTES {
                    return Err(ApiError::invalid(
                        format!("{f}.sequence_id"),
                        format!(
                            "must have 1 to {MAX_SEQUENCE_ID_BYTES} bytes, has {}",
                            run.sequence_id.len()
                        ),
                    ));
                }
                let non_negative = |name: &str, v: i64| {
                    u64::try_from(v).map_err(|_| {
                        ApiError::invalid(format!("{f}.{name}"), format!("{v} is negative"))
                    })
                };
                Ok(Span {
                    kind,
                    sequence_id: run.sequence_id.clone(),
                    offset: non_negative("offset", run.offset)?,
                    length: non_negative("length", run.length)?,
                })
            })
            .collect()
    };
    Ok(Some(Provenance {
        model_input: list("model_input_spans", &d.model_input_spans)?,
        targets: list("loss_fn_input_spans", &d.loss_fn_input_spans)?,
    }))
}

/// Resolve every datum's provenance against the records of the model's Tinker session,
/// adding the `recorded:` inputs the loss reads. A datum without provenance is left as it
/// is (the loss says what it misses).
fn resolve_provenance(
    s: &Shared,
    tenant: &TenantId,
    req: &proto::ForwardBackwardRequest,
    data: &mut [Datum],
) -> ApiResult<()> {
    let _span =
        tracing::info_span!("provenance", model = %req.model_id, data = data.len()).entered();
    let session = s
        .engine
        .registry()
        .adapter(tenant, &AdapterId(req.model_id.clone()))?
        .session
        .clone();
    let session = match session {
        Some(id) => id,
        None => session_of_model(&req.model_id)?.to_owned(),
    };
    let scope = (tenant.clone(), session);
    for (i, (d, wire)) in data.iter_mut().zip(&req.data).enumerate() {
        let field = format!("data[{i}]");
        let n = d.model_input.len();
        let Some(prov) = provenance(&field, wire, n)? else {
            continue;
        };
        let (targets, k) = loss::targets_of(&d.loss_fn_inputs, n, &field)?;
        if k != 1 {
            return Err(ApiError::invalid(
                format!("{field}.loss_fn_inputs.target_tokens"),
                "provenance spans tile [N] targets, not [N, K]",
            ));
        }
        let (lp, sampled) =
            s.tinker
                .records
                .resolve(&scope, &field, &d.model_input, &targets, &prov)?;
        d.loss_fn_inputs
            .insert(RECORDED_LOGPROBS.into(), TensorIn::f32(vec![n], lp));
        d.loss_fn_inputs
            .insert(RECORDED_SAMPLED.into(), TensorIn::f32(vec![n], sampled));
    }
    Ok(())
}

/// Queue an op at its seq_id. A request refused for its content still takes its place
/// in the model's order (the SDK has used the seq_id) and fails there, reported through
/// its future as a user error; only an unknown model or a full queue answer at once.
async fn submit(
    s: &Shared,
    tenant: &TenantId,
    model: &str,
    seq_id: u64,
    op: ApiResult<Op>,
) -> ApiResult<FutureId> {
    let op = match op {
        Ok(op) => op,
        Err(ApiError::Engine(e))
            if e.category() == crate::error::Category::User
                && !matches!(e, crate::Error::Busy { .. }) =>
        {
            Op::Refused(crate::jobs::JobFailure::from(&e))
        }
        Err(e) => return Err(e),
    };
    s.metrics.submitted(op.kind());
    let f = s
        .engine
        .submit(tenant, &AdapterId(model.to_owned()), Some(seq_id), op)
        .await?;
    Ok(f)
}

// --- optim_step ------------------------------------------------------------------------

#[derive(Deserialize, Default, JsonSchema)]
pub struct AdamJson {
    #[serde(default)]
    learning_rate: Option<f64>,
    #[serde(default)]
    beta1: Option<f64>,
    #[serde(default)]
    beta2: Option<f64>,
    #[serde(default)]
    eps: Option<f64>,
    #[serde(default)]
    weight_decay: Option<f64>,
    #[serde(default)]
    grad_clip_norm: Option<f64>,
}

impl AdamJson {
    /// Tinker's defaults (the SDK's `AdamParams`) for every absent field.
    pub fn params(&self) -> AdamParams {
        AdamParams {
            learning_rate: self.learning_rate.unwrap_or(1e-4),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.95),
            eps: self.eps.unwrap_or(1e-12),
            weight_decay: self.weight_decay.unwrap_or(0.0),
            grad_clip_norm: self.grad_clip_norm.unwrap_or(0.0),
        }
    }
}

#[derive(Deserialize, JsonSchema)]
pub struct OptimStep {
    model_id: String,
    #[schemars(range(min = 0))]
    seq_id: i64,
    adam_params: AdamJson,
}

pub async fn optim_step(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<OptimStep>,
) -> ApiResult<axum::Json<Value>> {
    let seq_id = seq("seq_id", req.seq_id)?;
    let op = Ok(Op::OptimStep(req.adam_params.params()));
    let f = submit(&s, &tenant, &req.model_id, seq_id, op).await?;
    Ok(future_json(&f, Some(&req.model_id)))
}

// --- checkpoints -----------------------------------------------------------------------

#[derive(Deserialize, JsonSchema)]
pub struct SaveWeights {
    model_id: String,
    /// The checkpoint's name.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::checkpoint_name_or_null")]
    path: Option<String>,
    #[schemars(range(min = 0))]
    seq_id: i64,
    #[serde(default)]
    #[schemars(range(min = 1, max = super::runs::MAX_TTL_S))]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    sampling_session_seq_id: Option<u64>,
    /// Absent: refuse to replace a training checkpoint, replace a sampler one (the SDK
    /// sends no flag for those).
    #[serde(default)]
    overwrite: Option<bool>,
    /// Strings only, at most 16 KiB serialized; listed with the checkpoint.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::user_metadata")]
    user_metadata: Option<Value>,
}

pub async fn save_weights(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<SaveWeights>,
) -> ApiResult<axum::Json<Value>> {
    save(s, tenant, req, "weights").await
}

/// Named (`path` given: a sampler checkpoint) or ephemeral (a sampling session straight
/// from the current weights, answered with its id).
pub async fn save_weights_for_sampler(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<SaveWeights>,
) -> ApiResult<axum::Json<Value>> {
    if req.path.is_none() {
        let seq_id = seq("seq_id", req.seq_id)?;
        if req.sampling_session_seq_id.is_none() {
            return Err(ApiError::invalid(
                "path",
                "give a path, or a sampling_session_seq_id for an ephemeral sampler",
            ));
        }
        let f = submit(&s, &tenant, &req.model_id, seq_id, Ok(Op::SamplingSession)).await?;
        return Ok(future_json(&f, Some(&req.model_id)));
    }
    save(s, tenant, req, "sampler_weights").await
}

#[derive(Deserialize, JsonSchema)]
pub struct SaveWeightsExternal {
    model_id: String,
    /// The checkpoint's name; an earlier one of that name is replaced.
    #[schemars(schema_with = "crate::api::openapi::schema::checkpoint_name")]
    path: String,
    #[serde(default)]
    #[schemars(range(min = 0))]
    seq_id: Option<i64>,
    #[serde(default)]
    #[schemars(range(min = 1, max = super::runs::MAX_TTL_S))]
    ttl_seconds: Option<u64>,
    /// Encrypting the export to age recipients is not supported: absent or empty.
    #[serde(default)]
    #[schemars(length(max = 0))]
    age_encryption_recipients: Option<Vec<String>>,
}

/// `POST /api/v1/save_weights_external`: the current weights as a checkpoint of kind
/// `external` (`tinker://<model>/external_weights/<name>`), to be downloaded in Hugging
/// Face PEFT layout through signed links (`get_external_weights_urls`).
pub async fn save_weights_external(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<SaveWeightsExternal>,
) -> ApiResult<axum::Json<Value>> {
    if req
        .age_encryption_recipients
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        return Err(ApiError::Engine(crate::Error::Unsupported(
            "age_encryption_recipients: exports are not encrypted here; omit the field".into(),
        )));
    }
    let Some(seq_id) = req.seq_id else {
        return Err(ApiError::invalid("seq_id", "missing"));
    };
    let save_req = SaveWeights {
        model_id: req.model_id,
        path: Some(req.path),
        seq_id,
        ttl_seconds: req.ttl_seconds,
        sampling_session_seq_id: None,
        overwrite: Some(true),
        user_metadata: None,
    };
    save(s, tenant, save_req, "external_weights").await
}

async fn save(
    s: Shared,
    tenant: TenantId,
    req: SaveWeights,
    segment: &str,
) -> ApiResult<axum::Json<Value>> {
    let seq_id = seq("seq_id", req.seq_id)?;
    let op = (|| {
        let name = req.path.clone().unwrap_or_default();
        check_name("path", &name)?;
        let key = format!("{}/{segment}/{name}", req.model_id);
        let overwrite = req.overwrite.unwrap_or(segment != "weights");
        if !overwrite && s.engine.registry().checkpoint_entry(&tenant, &key).is_ok() {
            return Err(ApiError::invalid(
                "path",
                format!(
                    "checkpoint {name:?} exists already; save with overwrite=True to replace it"
                ),
            ));
        }
        Ok(Op::SaveState {
            name: key,
            ttl: ttl(req.ttl_seconds)?,
            user_metadata: UserMetadata::from_json("user_metadata", req.user_metadata.clone())?,
        })
    })();
    let f = submit(&s, &tenant, &req.model_id, seq_id, op).await?;
    Ok(future_json(&f, Some(&req.model_id)))
}

#[derive(Deserialize, JsonSchema)]
pub struct LoadWeights {
    #[serde(default)]
    model_id: Option<String>,
    #[serde(default)]
    #[schemars(range(min = 0))]
    seq_id: Option<i64>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model_seq_id: Option<u64>,
    #[schemars(schema_with = "crate::api::openapi::schema::tinker_path")]
    path: String,
    #[serde(default)]
    optimizer: bool,
    #[serde(default)]
    base_model: Option<String>,
    /// For a new run (`session_id` + `model_seq_id`): strings only, at most 16 KiB
    /// serialized; returned with the training run.
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::user_metadata")]
    user_metadata: Option<Value>,
    #[serde(default)]
    #[schemars(schema_with = "crate::api::openapi::schema::optimizer_config")]
    optimizer_config: Option<Value>,
}

/// Either create a model from a checkpoint (`session_id` + `model_seq_id`; the load is
/// its seq 0) or load into an existing model (`model_id` + `seq_id`). The checkpoint is
/// the tenant's own or a published one.
pub async fn load_weights(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<LoadWeights>,
) -> ApiResult<axum::Json<Value>> {
    let found = TinkerPath::parse(&req.path).and_then(|path| {
        let ckpt = s
            .engine
            .registry()
            .readable_checkpoint(&tenant, &path.key())?;
        Ok((path, ckpt))
    });
    let op = |path: &TinkerPath| Op::LoadState {
        name: path.key(),
        optimizer: req.optimizer,
    };
    match (req.session_id, req.model_seq_id, req.model_id, req.seq_id) {
        (Some(session), Some(n), _, _) => {
            let (path, ckpt) = found?;
            // The new run is on the checkpoint's base; a base_model naming another is refused.
            if let Some(b) = &req.base_model {
                let b = check_base_model(&s, b)?;
                if b != ckpt.base {
                    return Err(ApiError::invalid(
                        "base_model",
                        format!(
                            "{b:?}, but checkpoint {:?} was trained on {:?}",
                            req.path, ckpt.base
                        ),
                    ));
                }
            }
            check_optimizer(&req.optimizer_config)?;
            let user_metadata = UserMetadata::from_json("user_metadata", req.user_metadata)?;
            let model_id = format!("{session}:train:{n}");
            {
                let sess = s.tinker.session(&tenant, &session)?;
                let known = sess.model_creates.lock().get(n);
                if let Some((f, m)) = known {
                    return Ok(future_json(&f, Some(&m)));
                }
                sess.models.lock().push(model_id.clone());
            }
            let config = ckpt.config.clone();
            // The load below is a job: a tenant at its queued-jobs quota is refused before
            // the model exists, so its retry does not find the id taken.
            if let Err(e) = s.engine.admit_job(&tenant) {
                forget_model(&s, &session, &model_id);
                return Err(e.into());
            }
            let created = s
                .engine
                .create_model_as(
                    &tenant,
                    AdapterId(model_id.clone()),
                    config,
                    Some(0),
                    RunMeta {
                        base: Some(ckpt.base.clone()),
                        session: Some(session.clone()),
                        user_metadata,
                    },
                )
                .await;
            if let Err(e) = created {
                forget_model(&s, &session, &model_id);
                return Err(e.into());
            }
            let f = submit(&s, &tenant, &model_id, 0, Ok(op(&path))).await?;
            if let Ok(sess) = s.tinker.session(&tenant, &session) {
                sess.model_creates
                    .lock()
                    .insert(n, (f.clone(), model_id.clone()));
            }
            Ok(future_json(&f, Some(&model_id)))
        }
        (_, _, Some(model_id), Some(seq_id)) => {
            let op = found.map(|(path, _)| op(&path));
            let f = submit(&s, &tenant, &model_id, seq("seq_id", seq_id)?, op).await?;
            Ok(future_json(&f, Some(&model_id)))
        }
        _ => Err(ApiError::invalid(
            "load_weights",
            "give session_id and model_seq_id (new model) or model_id and seq_id",
        )),
    }
}

pub async fn unload_model(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Json(req): Json<ModelRef>,
) -> ApiResult<axum::Json<Value>> {
    let id = AdapterId(req.model_id.clone());
    s.engine.registry().adapter(&tenant, &id)?;
    let engine = s.engine.clone();
    let t = tenant.clone();
    let state = s.clone();
    let f = s
        .engine
        .spawn_job(&tenant, JobKind::CreateModel, async move {
            engine.unload_model(&t, &id).await?;
            if let Ok(session) = session_of_model(&id.0) {
                forget_model(&state, session, &id.0);
            }
            Ok(JobOutput::ModelUnloaded(id))
        })?;
    Ok(future_json(&f, Some(&req.model_id)))
}

/// Take a model off its session's list once it is not live (unloaded, or never created),
/// so the list holds only live models. A model that exists stays (a failed create of an
/// id already taken).
fn forget_model(s: &Shared, session: &str, model: &str) {
    if s.engine.registry().exists(&AdapterId(model.to_owned())) {
        return;
    }
    if let Some(sess) = s.tinker.sessions.get(session) {
        sess.models.lock().retain(|m| m != model);
    }
}
