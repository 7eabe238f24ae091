//! Plugins over HTTP: a tenant uploads a wasm component (raw bytes) and gets its content
//! hash as the plugin id; lists and deletes its own. A plugin belongs to the tenants that
//! uploaded it: only they can name it as a loss (`loss_fn = "plugin:<id>"`, or Tinker's
//! `"custom"` with config `plugin = <id>`) or as a sampler. Owns the ownership table and the
//! resolution of loss and sampler names; compiling and running is [`crate::plugins`]'s job.
//!
//! Bounds: the ownership table holds one entry per (tenant, plugin) uploaded and not
//! deleted (the per-tenant plugin quota caps it); the host's compiled code is held only
//! while some tenant owns the plugin.

use super::error::{ApiError, ApiResult};
use super::extract::{Path, Tenant};
use super::Shared;
use crate::error::Error;
use crate::jobs::{TenantId, TokenSampler};
use crate::plugins::{PluginHost, PluginId, PluginKind, PluginLimits, PluginLoss, PluginSampler};
use crate::train::loss::{BuiltinLoss, ConfigValue, LossConfig, LossFunction};
use axum::body::Bytes;
use axum::extract::{FromRequest, State};
use dashmap::DashMap;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// Largest component accepted (the plugin host's own cap).
pub const MAX_PLUGIN_BYTES: usize = crate::plugins::MAX_COMPONENT_BYTES;

pub struct PluginMeta {
    pub kind: PluginKind,
    pub size: usize,
    pub created: SystemTime,
}

pub struct PluginStore {
    pub host: PluginHost,
    owned: DashMap<(TenantId, PluginId), PluginMeta>,
}

impl PluginStore {
    pub fn new(limits: PluginLimits, cache: Option<PathBuf>) -> crate::Result<Self> {
        Ok(PluginStore {
            host: PluginHost::new(limits, cache).map_err(Error::Plugin)?,
            owned: DashMap::new(),
        })
    }

    /// Drop the compiled code of a plugin no tenant owns.
    pub fn unload_if_unowned(&self, id: &PluginId) {
        if !self.owned.iter().any(|e| &e.key().1 == id) {
            self.host.unload(id);
        }
    }

    fn owned_kind(&self, tenant: &TenantId, id: &str) -> ApiResult<(PluginId, PluginKind)> {
        let pid = PluginId(id.to_owned());
        match self.owned.get(&(tenant.clone(), pid.clone())) {
            Some(m) => Ok((pid, m.kind)),
            None => Err(ApiError::not_found("plugin", id)),
        }
    }

    /// A built-in loss by name, or the tenant's loss plugin.
    pub fn resolve_loss(
        &self,
        tenant: &TenantId,
        name: &str,
        config: &LossConfig,
    ) -> ApiResult<Arc<dyn LossFunction>> {
        let plugin = if let Some(id) = name.strip_prefix("plugin:") {
            Some(id.to_owned())
        } else if name == "custom" {
            match config.get("plugin").or_else(|| config.get("loss_id")) {
                Some(ConfigValue::Text(id)) => Some(id.clone()),
                _ => {
                    return Err(ApiError::invalid(
                        "loss_fn_config.plugin",
                        "loss_fn \"custom\" needs the id of an uploaded loss plugin in config key \"plugin\"",
                    ))
                }
            }
        } else {
            None
        };
        match plugin {
            None => Ok(Arc::new(BuiltinLoss::parse(name)?)),
            Some(id) => {
                let (pid, kind) = self.owned_kind(tenant, &id)?;
                if kind != PluginKind::Loss {
                    return Err(ApiError::invalid(
                        "loss_fn",
                        format!("plugin {id} is a {kind} plugin, not a loss"),
                    ));
                }
                Ok(Arc::new(PluginLoss {
                    host: self.host.clone(),
                    id: pid,
                }))
            }
        }
    }

    /// Ids of the tenant's loss plugins.
    pub fn loss_plugins(&self, tenant: &TenantId) -> Vec<String> {
        let mut v: Vec<String> = self
            .owned
            .iter()
            .filter(|e| &e.key().0 == tenant && e.value().kind == PluginKind::Loss)
            .map(|e| e.key().1 .0.clone())
            .collect();
        v.sort();
        v
    }

    /// The tenant's sampler plugin with its config.
    pub fn resolve_sampler(
        &self,
        tenant: &TenantId,
        id: &str,
        config: BTreeMap<String, ConfigValue>,
    ) -> ApiResult<Arc<dyn TokenSampler>> {
        let (pid, kind) = self.owned_kind(tenant, id)?;
        if kind != PluginKind::Sampler {
            return Err(ApiError::invalid(
                "sampler",
                format!("plugin {id} is a {kind} plugin, not a sampler"),
            ));
        }
        Ok(Arc::new(PluginSampler {
            host: self.host.clone(),
            id: pid,
            config,
        }))
    }
}

/// Reload the plugins a previous run stored. Compiled code comes from the on-disk cache,
/// so nothing is recompiled.
pub async fn restore(s: &Shared) -> crate::Result<()> {
    let Some(d) = s.durable.clone() else {
        return Ok(());
    };
    let stored = tokio::task::spawn_blocking(move || d.stored_plugins())
        .await
        .map_err(|e| Error::Unavailable(format!("plugin restore panicked: {e}")))??;
    for (rec, bytes) in stored {
        let host = s.plugins.host.clone();
        let size = bytes.len();
        let loaded = tokio::task::spawn_blocking(move || host.load(&bytes))
            .await
            .map_err(|e| Error::Unavailable(format!("plugin load panicked: {e}")))?;
        match loaded {
            Ok((id, kind)) => {
                s.plugins.owned.insert(
                    (rec.tenant.clone(), id),
                    PluginMeta {
                        kind,
                        size,
                        created: rec.created,
                    },
                );
            }
            Err(e) => {
                tracing::error!(plugin = %rec.content_hash, error = %e, "stored plugin no longer loads")
            }
        }
    }
    Ok(())
}

/// The raw `.wasm` body, at most [`MAX_PLUGIN_BYTES`]; a larger one is a JSON 413.
pub struct WasmBody(pub Bytes);

impl FromRequest<Shared> for WasmBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &Shared) -> ApiResult<Self> {
        Bytes::from_request(req, state)
            .await
            .map(WasmBody)
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge {
                        limit: MAX_PLUGIN_BYTES,
                    }
                } else {
                    ApiError::Malformed(e.body_text())
                }
            })
    }
}

fn meta_json(id: &PluginId, m: &PluginMeta) -> Value {
    json!({
        "plugin_id": id.0,
        "kind": m.kind,
        "world": m.kind.world(),
        "size_bytes": m.size,
        "created": super::tinker::rfc3339(m.created),
    })
}

/// Upload a component: the body is the raw `.wasm` bytes.
pub(crate) async fn upload(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    WasmBody(body): WasmBody,
) -> ApiResult<axum::Json<Value>> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "empty; send the component's .wasm bytes",
        ));
    }
    check_quota(&s, &tenant, &PluginId::of(&body), body.len() as u64)?;
    let host = s.plugins.host.clone();
    let bytes = body.clone();
    let (id, kind) = tokio::task::spawn_blocking(move || host.load(&bytes))
        .await
        .map_err(|e| Error::Unavailable(format!("plugin compiler panicked: {e}")))?
        .map_err(Error::Plugin)?;
    let meta = PluginMeta {
        kind,
        size: body.len(),
        created: SystemTime::now(),
    };
    let out = meta_json(&id, &meta);
    // Again after compiling: another upload of the tenant's may have landed meanwhile.
    check_quota(&s, &tenant, &id, body.len() as u64)?;
    if let Some(d) = &s.durable {
        let stored = d
            .plugin_uploaded(&tenant, &id.0, &kind.to_string(), &body)
            .await;
        if let Err(e) = stored {
            // Compiled but owned by nobody: not kept.
            s.plugins.unload_if_unowned(&id);
            return Err(e.into());
        }
    }
    s.plugins.owned.insert((tenant.clone(), id.clone()), meta);
    tracing::info!(tenant = %tenant, plugin = %id, %kind, "plugin uploaded");
    Ok(axum::Json(out))
}

/// Plugins and their bytes `tenant` owns (its `plugins` and `plugin_bytes` usage).
pub fn usage(s: &Shared, tenant: &TenantId) -> (u64, u64) {
    s.plugins
        .owned
        .iter()
        .filter(|e| &e.key().0 == tenant)
        .fold((0, 0), |(n, b), e| (n + 1, b + e.value().size as u64))
}

/// Refuse an upload that would take `tenant` over its plugin quotas. Uploading a plugin it
/// owns already costs nothing.
fn check_quota(s: &Shared, tenant: &TenantId, id: &PluginId, size: u64) -> ApiResult<()> {
    use crate::quota::Quota;
    if s.plugins.owned.contains_key(&(tenant.clone(), id.clone())) {
        return Ok(());
    }
    let (n, bytes) = usage(s, tenant);
    let q = s.engine.quotas();
    q.check(tenant, Quota::Plugins, n, 1)?;
    q.check(tenant, Quota::PluginBytes, bytes, size)?;
    Ok(())
}

pub(crate) async fn list(State(s): State<Shared>, Tenant(tenant): Tenant) -> axum::Json<Value> {
    let items: Vec<Value> = s
        .plugins
        .owned
        .iter()
        .filter(|e| e.key().0 == tenant)
        .map(|e| meta_json(&e.key().1, e.value()))
        .collect();
    axum::Json(json!({ "plugins": items }))
}

pub(crate) async fn describe(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let key = (tenant, PluginId(id.clone()));
    let m = s
        .plugins
        .owned
        .get(&key)
        .ok_or_else(|| ApiError::not_found("plugin", &id))?;
    Ok(axum::Json(meta_json(&key.1, &m)))
}

/// Forget a tenant's plugin; the compiled code goes once no tenant owns it.
pub(crate) async fn remove(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let pid = PluginId(id.clone());
    s.plugins
        .owned
        .remove(&(tenant.clone(), pid.clone()))
        .ok_or_else(|| ApiError::not_found("plugin", &id))?;
    if let Some(d) = &s.durable {
        d.plugin_deleted(&tenant, &id).await?;
    }
    s.plugins.unload_if_unowned(&pid);
    Ok(axum::Json(json!({"deleted": id})))
}
