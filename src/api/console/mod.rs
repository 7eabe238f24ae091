//! The web console, `/console`: pages a person opens in a browser to watch and manage
//! what their tenant holds, rendered on the server (minijinja templates compiled into the
//! binary, charts as SVG), usable without JavaScript except for the live refresh and
//! the playground, and with no file from anywhere but this server.
//!
//! - [`login`]: sign-in with an API key into an HttpOnly, SameSite=Strict cookie; CSRF
//!   tokens for every form that changes something.
//! - [`pages`]: a tenant's sessions, training runs, curves, checkpoints, sampling and
//!   playground, plugins, usage. Data comes from the same handlers and lookups as the
//!   API, with the signed-in tenant: another tenant's ids are 404 here as there.
//! - [`chart`]: SVG line charts (log scale, smoothing).
//! - [`live`]: server-sent events of a run's new metric points.
//! - [`operator`]: the operator view (every tenant, queue, throughput, batches, errors),
//!   for operator keys only.
//!
//! The console never runs model work itself and never sees an API key after sign-in.
//! Its routes are not part of the API's route table ([`crate::api::routes`]): they
//! answer HTML, not JSON, and are left out of the OpenAPI document.

pub mod chart;
pub mod live;
pub mod login;
pub mod operator;
pub mod pages;

pub use login::ConsoleState;

use crate::api::error::ApiError;
use crate::api::Shared;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::Environment;
use std::sync::OnceLock;

/// Every console route.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/console", get(pages::runs))
        .route("/console/", get(pages::runs))
        .route(
            "/console/sign-in",
            get(login::sign_in_page).post(login::sign_in),
        )
        .route("/console/sign-out", post(login::sign_out))
        .route("/console/runs/{id}", get(pages::run))
        .route("/console/runs/{id}/charts", get(pages::charts_fragment))
        .route("/console/runs/{id}/events", get(live::events))
        .route(
            "/console/runs/{id}/checkpoints/{kind}/{name}/peft",
            get(pages::download_peft),
        )
        .route(
            "/console/runs/{id}/checkpoints/{kind}/{name}/delete",
            post(pages::delete_checkpoint),
        )
        .route(
            "/console/runs/{id}/checkpoints/{kind}/{name}/ttl",
            post(pages::set_ttl),
        )
        .route(
            "/console/runs/{id}/checkpoints/{kind}/{name}/publish",
            post(pages::set_published),
        )
        .route("/console/sampling", get(pages::sampling))
        .route("/console/playground", post(pages::playground))
        .route("/console/plugins", get(pages::plugins))
        .route("/console/usage", get(pages::usage))
        .route("/console/operator", get(operator::view))
        .route("/console/static/{file}", get(static_file))
        .layer(axum::middleware::map_response(secure_headers))
}

/// What every console answer carries: no caching of tenant data, nothing but this
/// server's own files, no framing.
async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// The templates, compiled into the binary, HTML-escaped by default.
fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        env.add_filter("urlencode", |s: String| pages::urlencode(&s));
        for &(name, text) in TEMPLATES {
            if let Err(e) = env.add_template(name, text) {
                // A template that does not parse is a bug caught by the tests.
                tracing::error!(template = name, error = %e, "console template does not parse");
            }
        }
        env
    })
}

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("sign_in.html", include_str!("templates/sign_in.html")),
    ("error.html", include_str!("templates/error.html")),
    ("runs.html", include_str!("templates/runs.html")),
    ("run.html", include_str!("templates/run.html")),
    ("charts.html", include_str!("templates/charts.html")),
    ("sampling.html", include_str!("templates/sampling.html")),
    ("plugins.html", include_str!("templates/plugins.html")),
    ("usage.html", include_str!("templates/usage.html")),
    ("operator.html", include_str!("templates/operator.html")),
];

/// Render a template.
pub fn page(name: &str, ctx: minijinja::Value) -> Result<Html<String>, ConsoleError> {
    env()
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map(Html)
        .map_err(|e| {
            ConsoleError::Api(ApiError::Engine(crate::Error::Unavailable(format!(
                "console template {name}: {e}"
            ))))
        })
}

/// Why a console page was not shown.
#[derive(Debug)]
pub enum ConsoleError {
    /// Not signed in, on a page: go to the sign-in form.
    SignIn,
    /// Anything else, with the API's status for it (404 for another tenant's ids).
    Api(ApiError),
}

impl ConsoleError {
    pub fn forbidden(why: &'static str) -> Self {
        ConsoleError::Api(ApiError::Engine(crate::Error::Forbidden(why.into())))
    }
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        ConsoleError::Api(e)
    }
}

impl From<crate::Error> for ConsoleError {
    fn from(e: crate::Error) -> Self {
        ConsoleError::Api(e.into())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match self {
            ConsoleError::SignIn => Redirect::to("/console/sign-in").into_response(),
            ConsoleError::Api(e) => {
                let status = e.status();
                if status.is_server_error() {
                    tracing::error!(error = %e, "console page failed");
                }
                let ctx = minijinja::context! {
                    title => status.canonical_reason().unwrap_or("Error"),
                    status => status.as_u16(),
                    kind => e.kind(),
                    message => e.to_string(),
                };
                match page("error.html", ctx) {
                    Ok(html) => (status, html).into_response(),
                    Err(_) => (status, e.to_string()).into_response(),
                }
            }
        }
    }
}

/// The stylesheet and the small script, from the binary.
async fn static_file(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, ct) = match file.as_str() {
        "console.css" => (
            include_str!("static/console.css"),
            "text/css; charset=utf-8",
        ),
        "console.js" => (
            include_str!("static/console.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses_and_escapes() {
        for &(name, _) in TEMPLATES {
            assert!(env().get_template(name).is_ok(), "{name} does not parse");
        }
        let html = page(
            "error.html",
            minijinja::context! { title => "Not Found", status => 404, message => "<script>x</script>" },
        )
        .expect("renders")
        .0;
        assert!(
            html.contains("&lt;script&gt;x&lt;&#x2f;script&gt;") && !html.contains("<script>x")
        );
    }
}
