//! The one place where errors become HTTP responses. Every failure the API answers with
//! has a status that tells a client whether to retry and a JSON body that names the
//! problem: `{"error": {"type", "message"}, "detail": message}` (`detail` is what the
//! Tinker SDK and FastAPI-style clients print). User mistakes are 4xx, never 5xx or 409
//! (the SDK retries those); transient conditions are 429/503 with `Retry-After`.

use crate::error::{Category, Error};
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

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::Engine(e) => match e {
                Error::InvalidInput { .. }
                | Error::Unsupported(_)
                | Error::Template(_)
                | Error::Tokenizer(_)
                | Error::Plugin(_) => StatusCode::BAD_REQUEST,
                Error::NotFound { .. } => StatusCode::NOT_FOUND,
                Error::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
                Error::Unavailable(_) | Error::ModelLoad { .. } => StatusCode::SERVICE_UNAVAILABLE,
                Error::JobFailed { category, .. } => match category {
                    Category::User => StatusCode::BAD_REQUEST,
                    Category::Server => StatusCode::INTERNAL_SERVER_ERROR,
                },
                Error::Tensor(_) | Error::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// A short machine-readable name for the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::TooLarge { .. } => "payload_too_large",
            ApiError::Malformed(_) => "malformed_request",
            ApiError::NoRoute { .. } => "no_route",
            ApiError::Engine(e) => match e {
                Error::InvalidInput { .. } => "invalid_input",
                Error::Unsupported(_) => "unsupported",
                Error::Template(_) => "chat_template",
                Error::Tokenizer(_) => "tokenizer",
                Error::Plugin(_) => "plugin",
                Error::NotFound { .. } => "not_found",
                Error::Busy { .. } => "busy",
                Error::Unavailable(_) => "unavailable",
                Error::ModelLoad { .. } => "model_load",
                Error::JobFailed { .. } => "job_failed",
                Error::Tensor(_) | Error::Io(_) => "internal",
            },
        }
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
