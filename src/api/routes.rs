//! The one table of every route: method, path, handler, request body, query, reply and
//! summary. [`router`] builds the axum router from it and [`super::openapi`] the OpenAPI
//! document, so the two cannot drift apart; `/metrics` labels requests by its paths. An
//! API route that is not in [`ROUTES`] does not exist; the web console's HTML pages
//! ([`super::console`]) have their own small router.

use super::tinker::{download, futures, runs, sampling, session, training};
use super::{history, ops, plugins, rest, usage, Shared};
use axum::extract::DefaultBodyLimit;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use schemars::{JsonSchema, Schema, SchemaGenerator};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    pub fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }

    /// Lower case, as OpenAPI names operations.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Delete => "delete",
        }
    }
}

/// A JSON Schema for a body or query, `$ref`-ed into the document's components.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T` (a `$ref` to `#/components/schemas/<name>`).
pub fn json<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// What a request carries.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// A JSON body the handler ignores (the SDK sends one).
    Ignored,
    Json(SchemaFn),
    /// `application/x-protobuf`: a `ForwardBackwardRequest` (src/api/proto.rs), documented
    /// as a JSON schema of its fields for fuzzers that encode it (tests/fuzz/hooks.py).
    Protobuf,
    /// `application/wasm`: a component's bytes.
    Wasm,
}

/// What a success looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Json,
    /// Tinker's `retrieve_future`: JSON, or protobuf for forward / forward_backward /
    /// sample results.
    JsonOrProtobuf,
    /// REST `/retrieve_future`: 200 with the result, 202 while pending.
    JsonOrPending,
    /// 200, or 410 for a closed session.
    JsonOrGone,
    Tar,
    /// A file's bytes (a downloaded adapter file).
    File,
    Text,
}

pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    /// The handler for this path and method.
    pub handler: fn(MethodFilter) -> MethodRouter<Shared>,
    pub body: Body,
    pub query: Option<SchemaFn>,
    pub reply: Reply,
    pub summary: &'static str,
    /// Answered without an API key.
    pub public: bool,
}

/// `|m| on(m, handler)`: the table names each method once.
macro_rules! h {
    ($f:path) => {
        |m| on(m, $f)
    };
}

/// A route with a key, a JSON reply and no query (most of them).
const fn r(
    verb: Verb,
    path: &'static str,
    handler: fn(MethodFilter) -> MethodRouter<Shared>,
    body: Body,
    summary: &'static str,
) -> Route {
    Route {
        verb,
        path,
        handler,
        body,
        query: None,
        reply: Reply::Json,
        summary,
        public: false,
    }
}

/// The same, answered without an API key.
const fn public(mut route: Route) -> Route {
    route.public = true;
    route
}

const fn reply(mut route: Route, reply: Reply) -> Route {
    route.reply = reply;
    route
}

const fn query(mut route: Route, q: SchemaFn) -> Route {
    route.query = Some(q);
    route
}

use Body::{Ignored, Json, None as NoBody, Protobuf, Wasm};
use Verb::{Delete, Get, Post, Put};

/// Every route.
#[rustfmt::skip]
pub static ROUTES: &[Route] = &[
    // Tinker: client configuration and sessions.
    public(r(Post, "/api/v1/client/config", h!(session::client_config), Ignored, "SDK feature flags")),
    public(r(Post, "/api/v1/client/dynamic_config", h!(session::dynamic_config), Ignored, "SDK dynamic settings")),
    r(Post, "/api/v1/create_session", h!(session::create_session), Json(json::<session::CreateSession>), "Open a Tinker session"),
    reply(
        r(Post, "/api/v1/session_heartbeat", h!(session::heartbeat), Json(json::<session::Heartbeat>), "Keep a session alive (410 once closed)"),
        Reply::JsonOrGone,
    ),
    r(Post, "/api/v1/sessions/{id}/finish", h!(session::finish), Ignored, "Close a session and release its models"),
    query(r(Get, "/api/v1/sessions", h!(session::list_sessions), NoBody, "The tenant's sessions, newest first (paginated)"), json::<session::Page>),
    r(Get, "/api/v1/sessions/{id}", h!(session::get_session), NoBody, "A session's training runs, samplers and user_metadata"),
    public(r(Post, "/api/v1/telemetry", h!(session::telemetry), Ignored, "Accepted and dropped")),
    public(r(Get, "/api/v1/get_server_capabilities", h!(session::capabilities), NoBody, "Served base models")),
    public(r(Get, "/api/v1/healthz", h!(ops::healthz), NoBody, "Liveness")),
    // Tinker: training.
    r(Post, "/api/v1/create_model", h!(training::create_model), Json(json::<training::CreateModel>), "Create a LoRA training model (future)"),
    r(Post, "/api/v1/get_info", h!(training::get_info), Json(json::<training::ModelRef>), "A training model's description"),
    r(Post, "/api/v1/forward_backward", h!(training::forward_backward), Protobuf, "forward or forward_backward (future, protobuf result)"),
    r(Post, "/api/v1/optim_step", h!(training::optim_step), Json(json::<training::OptimStep>), "AdamW step (future)"),
    r(Post, "/api/v1/save_weights", h!(training::save_weights), Json(json::<training::SaveWeights>), "Save weights and optimizer state (future)"),
    r(Post, "/api/v1/save_weights_for_sampler", h!(training::save_weights_for_sampler), Json(json::<training::SaveWeights>), "Save weights for sampling, or open an ephemeral sampler (future)"),
    r(Post, "/api/v1/load_weights", h!(training::load_weights), Json(json::<training::LoadWeights>), "Load a checkpoint, or create a model from one (future)"),
    r(Post, "/api/v1/unload_model", h!(training::unload_model), Json(json::<training::ModelRef>), "Free a training model's memory; its run stays listed (future)"),
    r(Post, "/api/v1/save_weights_external", h!(training::save_weights_external), Json(json::<training::SaveWeightsExternal>), "Save weights for download as a PEFT adapter (future)"),
    // Tinker: training runs and checkpoints (RestClient, the tinker CLI).
    query(r(Get, "/api/v1/training_runs", h!(runs::list_training_runs), NoBody, "The tenant's training runs, loaded or not, newest first"), json::<session::Page>),
    query(r(Get, "/api/v1/training_runs/{id}", h!(runs::get_training_run), NoBody, "One training run, loaded or not"), json::<runs::Scope>),
    r(Get, "/api/v1/training_runs/{id}/checkpoints", h!(runs::list_checkpoints), NoBody, "A run's checkpoints, newest first"),
    query(r(Get, "/api/v1/training_runs/{id}/metrics", h!(history::run_metrics), NoBody, "A run's metrics per step (every forward_backward and optim_step result), paginated"), json::<history::MetricsRange>),
    r(Delete, "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}", h!(runs::delete_checkpoint), NoBody, "Delete a checkpoint"),
    r(Put, "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/ttl", h!(runs::set_checkpoint_ttl), Json(json::<runs::Ttl>), "Set a checkpoint's time to live (expired: deleted)"),
    r(Post, "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/publish", h!(runs::publish), Ignored, "Let every tenant read a checkpoint"),
    r(Delete, "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/publish", h!(runs::unpublish), NoBody, "Make a published checkpoint private again"),
    reply(
        r(Get, "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/peft", h!(runs::download_peft), NoBody, "Download a checkpoint's adapter as a PEFT .tar"),
        Reply::Tar,
    ),
    r(Get, "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/external_weights_urls", h!(download::external_weights_urls), NoBody, "Signed, expiring URLs of a checkpoint's PEFT files"),
    public(reply(r(Get, "/api/v1/download/{token}/{file}", h!(download::download), NoBody, "One PEFT file of a checkpoint, by a signed URL (no API key)"), Reply::File)),
    query(r(Get, "/api/v1/checkpoints", h!(runs::list_user_checkpoints), NoBody, "All the tenant's checkpoints, newest first"), json::<session::Page>),
    r(Post, "/api/v1/weights_info", h!(runs::weights_info), Json(json::<runs::WeightsInfo>), "What a checkpoint holds"),
    r(Post, "/api/v1/copy_weights", h!(runs::copy_weights), Json(json::<runs::CopyWeights>), "Copy a readable checkpoint into a new run of the caller's"),
    // Tinker: sampling and futures.
    r(Post, "/api/v1/create_sampling_session", h!(sampling::create_sampling_session), Json(json::<sampling::CreateSamplingSession>), "Sampling session on the base model or a checkpoint"),
    r(Get, "/api/v1/samplers/{id}", h!(sampling::get_sampler), NoBody, "A sampling session's description"),
    r(Post, "/api/v1/asample", h!(sampling::asample), Json(json::<sampling::Asample>), "Sample (future, protobuf result)"),
    reply(
        r(Post, "/api/v1/retrieve_future", h!(futures::retrieve_future), Json(json::<futures::Retrieve>), "Long-poll a future"),
        Reply::JsonOrProtobuf,
    ),
    // Plugins.
    r(
        Post,
        "/api/v1/plugins",
        |m| on(m, plugins::upload).layer(DefaultBodyLimit::max(plugins::MAX_PLUGIN_BYTES)),
        Wasm,
        "Upload a wasm component; its id is its sha256",
    ),
    r(Get, "/api/v1/plugins", h!(plugins::list), NoBody, "The tenant's plugins"),
    r(Get, "/api/v1/plugins/{id}", h!(plugins::describe), NoBody, "One plugin"),
    r(Delete, "/api/v1/plugins/{id}", h!(plugins::remove), NoBody, "Delete a plugin"),
    // Quotas.
    r(Get, "/api/v1/usage", h!(usage::usage), NoBody, "The tenant's usage and limits, per quota"),
    // The seed's REST routes.
    r(Post, "/add_lora", h!(rest::add_lora), Json(json::<rest::AddLora>), "REST: create an adapter (future holds model_id)"),
    r(Post, "/fwdbwd", h!(rest::fwdbwd), Json(json::<rest::FwdBwd>), "REST: forward_backward on chat conversations (future holds loss)"),
    r(Post, "/optim_step", h!(rest::optim_step), Json(json::<rest::OptimStep>), "REST: AdamW step (future)"),
    reply(
        r(Post, "/retrieve_future", h!(rest::retrieve_future), Json(json::<rest::Retrieve>), "REST: 202 while pending, 200 with the result"),
        Reply::JsonOrPending,
    ),
    r(Post, "/remove_lora", h!(rest::remove_lora), Json(json::<rest::RemoveLora>), "REST: delete an adapter"),
    r(Post, "/api/v1/sample", h!(rest::sample), Json(json::<rest::Sample>), "REST: synchronous text sampling"),
    r(Post, "/api/v1/add_lora_async", h!(rest::add_lora), Json(json::<rest::AddLora>), "REST alias of /add_lora"),
    r(Post, "/api/v1/fwdbwd_async", h!(rest::fwdbwd), Json(json::<rest::FwdBwd>), "REST alias of /fwdbwd"),
    r(Post, "/api/v1/optim_step_async", h!(rest::optim_step), Json(json::<rest::OptimStep>), "REST alias of /optim_step"),
    r(Post, "/api/v1/sample_async", h!(rest::sample_async), Json(json::<rest::Sample>), "REST: sampling as a future"),
    r(Post, "/api/v1/remove_lora", h!(rest::remove_lora), Json(json::<rest::RemoveLora>), "REST alias of /remove_lora"),
    r(Get, "/list_loss_functions", h!(rest::list_loss_functions), NoBody, "REST: built-in losses and the tenant's loss plugins"),
    public(r(Get, "/get_server_capabilities", h!(session::capabilities), NoBody, "REST: served base models")),
    // Operations.
    public(r(Get, "/healthz", h!(ops::healthz), NoBody, "Liveness and whether the base model is loaded")),
    public(reply(r(Get, "/metrics", h!(ops::metrics), NoBody, "Prometheus metrics"), Reply::Text)),
    public(r(Get, "/openapi.json", h!(ops::openapi), NoBody, "This document")),
];

/// The paths of the routes that need no API key.
pub fn public_paths() -> impl Iterator<Item = &'static str> {
    ROUTES.iter().filter(|r| r.public).map(|r| r.path)
}

/// Every route of [`ROUTES`] (the same path under several methods merges into one entry).
pub fn router() -> Router<Shared> {
    ROUTES.iter().fold(Router::new(), |router, r| {
        router.route(r.path, (r.handler)(r.verb.filter()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_and_path_appears_once() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.verb, r.path)),
                "{:?} {} twice",
                r.verb,
                r.path
            );
        }
        assert!(public_paths().any(|p| p == "/healthz"));
        assert!(!public_paths().any(|p| p == "/api/v1/create_model"));
    }
}
