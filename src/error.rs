//! The crate's typed error. Every fallible library call returns [`Error`]; the API layer is the
//! one place that turns it into an HTTP status and a JSON body. User mistakes name the field.

use std::path::PathBuf;

/// Whether an error is the caller's fault (4xx, "user") or ours (5xx, "server").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    User,
    Server,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong: out-of-range token id, mismatched shape, unknown name...
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// A well-formed request for something this build does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("cannot load model from {path}: {message}")]
    ModelLoad { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A tenant's plugin failed its own call (trap, deadline, memory cap, bad output...).
    #[error("plugin: {0}")]
    Plugin(#[source] crate::plugins::PluginError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// An id that does not exist, or belongs to another tenant (never say which).
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A bounded queue is full: retry after the given delay (the API answers 429).
    #[error("busy: {what} is full, retry in {retry_after_ms} ms")]
    Busy {
        what: &'static str,
        retry_after_ms: u64,
    },
    /// A tenant's hard quota would be exceeded ([`crate::quota`]). Not transient: the
    /// tenant must free something first, so it is a 403 the SDK does not retry.
    #[error("quota exceeded: {quota} is limited to {limit} per tenant ({used} in use, {requested} more requested)")]
    QuotaExceeded {
        quota: &'static str,
        limit: u64,
        used: u64,
        requested: u64,
    },
    /// A tenant is over a rate or its queued-jobs quota: retry after the delay (429).
    #[error(
        "rate limited: {quota} is limited to {limit} per tenant; retry in {retry_after_ms} ms"
    )]
    RateLimited {
        quota: &'static str,
        limit: u64,
        retry_after_ms: u64,
    },
    /// A credential other than the API key (a signed download link, a console form's CSRF
    /// token) is invalid or expired, or a signed-in tenant asks for what only an operator sees.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A job failed; what it failed with, as stored in its future.
    #[error("{message}")]
    JobFailed { message: String, category: Category },
    /// The engine is shutting down or one of its parts stopped.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// Code of ours panicked while serving this request or job; only it failed.
    #[error("internal error: {0}")]
    Panic(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn load(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::ModelLoad {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// Whose fault the error is; see [`Error::class`].
    pub fn category(&self) -> Category {
        self.class().category
    }

    /// The one classification of a failure: whose fault it is, the HTTP status a handler
    /// answers with, and a short machine-readable kind. A failure is classified the same
    /// whether a handler returns it or a job's future fails with it.
    pub fn class(&self) -> Class {
        use Category::{Server, User};
        let (category, status, kind) = match self {
            Error::InvalidInput { .. } => (User, 400, "invalid_input"),
            Error::Unsupported(_) => (User, 400, "unsupported"),
            Error::Template(_) => (User, 400, "chat_template"),
            // Raised on what a request sent: token ids to decode, text to encode.
            Error::Tokenizer(_) => (User, 400, "tokenizer"),
            Error::Plugin(_) => (User, 400, "plugin"),
            Error::NotFound { .. } => (User, 404, "not_found"),
            Error::Busy { .. } => (User, 429, "busy"),
            Error::QuotaExceeded { .. } => (User, 403, "quota_exceeded"),
            Error::Forbidden(_) => (User, 403, "forbidden"),
            Error::RateLimited { .. } => (User, 429, "rate_limited"),
            Error::Unavailable(_) => (Server, 503, "unavailable"),
            Error::ModelLoad { .. } => (Server, 503, "model_load"),
            Error::JobFailed { category, .. } => match category {
                User => (User, 400, "job_failed"),
                Server => (Server, 500, "job_failed"),
            },
            Error::Tensor(_) | Error::Io(_) | Error::Panic(_) => (Server, 500, "internal"),
        };
        Class {
            category,
            status,
            kind,
        }
    }
}

/// How a failure is reported (see [`Error::class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub category: Category,
    /// The HTTP status: 4xx for [`Category::User`], 5xx for [`Category::Server`].
    pub status: u16,
    pub kind: &'static str,
}

impl Error {
    /// Whether the same request may succeed later unchanged (the API adds Retry-After).
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Error::Busy { retry_after_ms, .. } | Error::RateLimited { retry_after_ms, .. } => {
                Some(*retry_after_ms)
            }
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
