//! The one place where errors become HTTP responses. Every failure the API answers with
//! has a status that tells a client whether to retry and a JSON body that names the
//! problem: `{"error": {"type", "message"}, "detail": message}` (`detail` is what the
//! Tinker SDK and FastAPI-style clients print). User mistakes are 4xx, never 5xx or 409
//! (the SDK retries those); transient conditions are 429/503 with `Retry-After`.

use crate::error::{Category, Class, Error};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error on its way to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Engine(#[from] Error),
    #[error("missing or unknown API key: send it in the X-API-Key header")]
    Unauthorized,
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("malformed request body: {0}")]
    Malformed(String),
    #[error("no route {method} {path}")]
    NoRoute { method: String, path: String },
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Engine(Error::invalid(field, message))
    }

    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        ApiError::Engine(Error::NotFound {
            kind,
            id: id.into(),
        })
    }

    /// Whose fault, which status, which kind: the engine's one classification
    /// ([`Error::class`]) plus the refusals that happen before a request reaches it.
    pub fn class(&self) -> Class {
        let user = |status, kind| Class {
            category: Category::User,
            status,
            kind,
        };
        match self {
            ApiError::Unauthorized => user(401, "unauthorized"),
            ApiError::TooLarge { .. } => user(413, "payload_too_large"),
            ApiError::Malformed(_) => user(400, "malformed_request"),
            ApiError::NoRoute { .. } => user(404, "no_route"),
            ApiError::Engine(e) => e.class(),
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.class().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// A short machine-readable name for the kind of failure.
    pub fn kind(&self) -> &'static str {
        self.class().kind
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        if status.is_server_error() {
            tracing::error!(error = %message, "request failed");
        } else {
            tracing::info!(error = %message, status = status.as_u16(), "request refused");
        }
        let body = serde_json::json!({
            "error": {"type": self.kind(), "message": message},
            "detail": message,
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::Engine(e) = &self {
            if let Some(ms) = e.retry_after_ms() {
                let h = resp.headers_mut();
                let secs = ms.div_ceil(1000).max(1);
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    h.insert(header::RETRY_AFTER, v);
                }
                if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
                    h.insert("retry-after-ms", v);
                }
            }
        }
        resp
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;
