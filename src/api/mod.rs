//! The HTTP API (`loraplex serve`): what users touch.
//!
//! Three families of routes share one state and one error mapping ([`error`]):
//! - [`tinker`]: the wire protocol of the official `tinker` Python SDK (JSON and protobuf
//!   bodies, futures polled through `retrieve_future`, sessions and heartbeats);
//! - [`rest`]: the simple REST routes of the Flask server loraplex replaces;
//! - [`plugins`]: upload, list and delete of a tenant's wasm components.
//!
//! Plus [`console`]: the web console (HTML pages for people, `/console`); [`ops`]: health
//! and Prometheus metrics; [`usage`]: a tenant's usage against its
//! quotas; [`history`]: a training run's metrics per step. [`routes`] is the one table of every route, from which both the router and the
//! OpenAPI document ([`openapi`]) are built.
//!
//! The path of a request: route → tenant from the API key ([`extract::Tenant`]) →
//! validated engine call ([`crate::jobs::Engine`]) → future → `retrieve_future`. Handlers
//! never run model work themselves and never block tokio's workers.

pub mod console;
pub mod error;
pub mod extract;
pub mod history;
pub mod openapi;
pub mod ops;
pub mod plugins;
pub mod proto;
pub mod rest;
pub mod routes;
pub mod tinker;
pub mod usage;

use crate::auth::Auth;
use crate::config::{EngineConfig, PluginLimits, ServeConfig, ServedModels};
use crate::error::{Error, Result};
use crate::jobs::{Engine, ModelLoader};
use crate::model::BaseModel;
use crate::store::{Durable, FutureStoreConfig, SqliteFutureStore};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub cfg: ServeConfig,
    pub auth: Auth,
    pub plugins: plugins::PluginStore,
    pub tinker: tinker::TinkerState,
    pub metrics: ops::HttpMetrics,
    pub started: Instant,
    /// The database, checkpoint files and plugin bytes (`None`: in memory only, as in
    /// tests of the API alone: then nothing outlives the process, and an unloaded
    /// training run is forgotten).
    pub durable: Option<Arc<Durable>>,
    /// Signs checkpoint download links (its key lives in the data directory).
    pub url_signer: tinker::download::UrlSigner,
    /// Console sign-ins and the operator view's samples.
    pub console: console::ConsoleState,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(
        engine: Engine,
        cfg: ServeConfig,
        auth: Auth,
        limits: PluginLimits,
        durable: Option<Arc<Durable>>,
    ) -> Result<Shared> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let plugins = plugins::PluginStore::new(limits, Some(cfg.data_dir.join("plugin-cache")))?;
        let records = tinker::provenance::RecordLimits {
            per_scope: cfg.max_recorded_sequences_per_session,
            max_bytes: cfg.max_recorded_bytes,
            ttl: Duration::from_secs(cfg.recorded_ttl_s),
        };
        let url_signer = tinker::download::UrlSigner::load_or_create(&cfg.data_dir)?;
        let console = console::ConsoleState::new(Duration::from_secs(cfg.console_login_ttl_s));
        Ok(Arc::new(AppState {
            engine,
            cfg,
            auth,
            plugins,
            tinker: tinker::TinkerState::new(records),
            metrics: ops::HttpMetrics::default(),
            started: Instant::now(),
            durable,
            url_signer,
            console,
        }))
    }
}

/// Every route, with the body limit, request ids and JSON 404s.
pub fn router(state: Shared) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .merge(routes::router())
        .merge(console::router())
        .fallback(no_route)
        .layer(axum::middleware::from_fn(catch_panic))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_span,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// A handler that panics fails its own request with a 500 JSON body; the server, and every
/// other request, go on. The panic's message goes to the log only.
async fn catch_panic(req: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(resp) => resp,
        Err(payload) => {
            tracing::error!(panic = %crate::util::panic_message(&*payload), "handler panicked");
            error::ApiError::from(Error::Panic("the request's handler failed".into()))
                .into_response()
        }
    }
}

/// A request id (the client's `x-request-id`, or a fresh one) in a tracing span around the
/// whole request and in the response headers; HTTP counters for `/metrics`.
async fn request_span(State(state): State<Shared>, req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            crate::jobs::FutureId::generate()
                .0
                .replacen("future", "req", 1)
        });
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path()
    );
    let route = ops::route_label(req.uri().path());
    let method = req.method().clone();
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span).await;
    let status = resp.status().as_u16();
    state
        .console
        .ops
        .request_failed(method.as_str(), route.clone(), status);
    state.metrics.record(route, status, started.elapsed());
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Build the engine and state from settings: open the data directory (database,
/// checkpoints, plugins), load every served base model, and bring back what a previous
/// run left (models at their newest checkpoint on their own base, checkpoints, sessions,
/// plugins; unfinished futures fail with category server). `models`: a [`ServedModels`],
/// or the one model of a [`crate::config::ModelArgs`].
pub async fn build(
    serve: ServeConfig,
    models: impl Into<ServedModels>,
    engine_cfg: EngineConfig,
) -> Result<(Shared, Router)> {
    crate::failpoint::arm_from_env();
    let specs = models.into().specs()?;
    let mut overrides = std::collections::HashMap::new();
    let auth = match &serve.keys_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)?;
            overrides = crate::quota::overrides_from_keys(&text, &engine_cfg.quotas)
                .map_err(|e| Error::invalid(p.display().to_string(), e))?;
            Auth::from_file(p)?
        }
        None => {
            tracing::warn!(
                "no keys file: development mode, every distinct API key is its own tenant"
            );
            Auth::Development
        }
    };
    let bases: Vec<(String, ModelLoader)> = specs
        .iter()
        .map(|spec| {
            let (path, name) = (spec.path.clone(), spec.name.clone());
            let base_dtype = spec.base_dtype.unwrap_or_default();
            let loader: ModelLoader = Arc::new(move || {
                let t = Instant::now();
                tracing::info!(base = %name, path = %path.display(), "loading a base model");
                let (dev, dt) = crate::model::default_device();
                let bar = Arc::new(crate::progress::Bar::new(format!("loading {name}")));
                let b = bar.clone();
                crate::model::weights::on_layer_loading(Some(Box::new(move |i, n| b.set(i, n))));
                let loaded = BaseModel::load_as(&path, &name, &dev, dt, base_dtype);
                crate::model::weights::on_layer_loading(None);
                let m = loaded?;
                bar.finish(m.config.num_layers);
                tracing::info!(
                    base = %name,
                    seconds = t.elapsed().as_secs_f32(),
                    device = ?m.device,
                    dtype = ?m.dtype,
                    layers = m.config.num_layers,
                    vocab = m.config.vocab_size,
                    weight_bytes = m.weight_bytes(),
                    weights = %m.weights.layout(),
                    "base model loaded"
                );
                Ok(Arc::new(m))
            });
            (spec.name.clone(), loader)
        })
        .collect();
    std::fs::create_dir_all(&serve.data_dir)?;
    // Opening waits on the database: off tokio's workers.
    let (dir, name, every) = (
        serve.data_dir.clone(),
        specs[0].name.clone(),
        serve.auto_checkpoint_steps,
    );
    let store_cfg = FutureStoreConfig {
        result_ttl: Duration::from_secs(serve.result_ttl_s),
        unread_ttl: Duration::from_secs(serve.unread_result_ttl_s),
        max_records: serve.max_futures.max(1),
        ..FutureStoreConfig::default()
    };
    let (durable, futures) = tokio::task::spawn_blocking(move || {
        let durable = Durable::open(&dir, &name, every)?;
        let futures =
            SqliteFutureStore::open(&durable.db_path(), store_cfg).map_err(Error::from)?;
        Ok::<_, Error>((durable, futures))
    })
    .await
    .map_err(|e| Error::Unavailable(format!("opening the store panicked: {e}")))??;
    if futures.recovered() > 0 {
        tracing::warn!(
            futures = futures.recovered(),
            "failed the requests a previous run left unfinished"
        );
    }
    let persist: Arc<dyn crate::jobs::registry::Persist> = durable.clone();
    let engine = Engine::start_bases(engine_cfg, bases, Arc::new(futures), Some(persist))?;
    engine
        .history()
        .attach(Arc::new(crate::store::DurableHistory {
            durable: durable.clone(),
            max_points_per_run: serve.max_metric_points.max(1),
        }));
    engine.quotas().set_overrides(overrides);
    let state = AppState::new(
        engine.clone(),
        serve,
        auth,
        PluginLimits::from_env().map_err(Error::Plugin)?,
        Some(durable.clone()),
    )?;
    // Every base, before restoring: runs come back on their own base.
    for spec in &specs {
        engine.base_model_named(&spec.name).await?;
    }
    let (d, e) = (durable.clone(), engine.clone());
    let restored = tokio::task::spawn_blocking(move || d.restore(&e))
        .await
        .map_err(|e| Error::Unavailable(format!("restore panicked: {e}")))??;
    tinker::session::restore(&state, &restored);
    plugins::restore(&state).await?;
    tracing::info!(
        models = restored.models,
        checkpoints = restored.checkpoints,
        sessions = restored.sessions.len(),
        "state restored"
    );
    tokio::spawn(tinker::reap_sessions(state.clone()));
    tokio::spawn(console::operator::sample_throughput(state.clone()));
    tokio::spawn(tinker::sweep_expired_checkpoints(state.clone()));
    Ok((state.clone(), router(state)))
}

/// Serve until Ctrl-C or SIGTERM; then stop accepting, let in-flight requests finish.
pub async fn serve(
    serve_cfg: ServeConfig,
    models: ServedModels,
    engine: EngineConfig,
) -> Result<()> {
    let addr = serve_cfg.addr;
    let (state, app) = build(serve_cfg, models, engine).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "loraplex listening");
    eprintln!("loraplex listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(Error::Io)?;
    // Requests are answered; let accepted jobs finish (their results are in memory only
    // until the durable store lands, so this is what a client can still fetch).
    let grace = Duration::from_secs(SHUTDOWN_GRACE_S);
    if !state.engine.drain(grace).await {
        tracing::warn!(
            seconds = SHUTDOWN_GRACE_S,
            "jobs still running at shutdown; stopping anyway"
        );
    }
    Ok(())
}

/// How long a shutdown waits for accepted jobs to finish.
const SHUTDOWN_GRACE_S: u64 = 30;

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing in-flight requests");
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        error::ApiError::from(self).into_response()
    }
}
