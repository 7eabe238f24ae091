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
    /// A job failed; what it failed with, as stored in its future.
    #[error("{message}")]
    JobFailed { message: String, category: Category },
    /// The engine is shutting down or one of its parts stopped.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
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

    pub fn category(&self) -> Category {
        match self {
            Error::InvalidInput { .. }
            | Error::Unsupported(_)
            | Error::Template(_)
            | Error::Plugin(_)
            | Error::NotFound { .. }
            | Error::Busy { .. } => Category::User,
            Error::JobFailed { category, .. } => *category,
            _ => Category::Server,
        }
    }
}

impl Error {
    /// Whether the same request may succeed later unchanged (the API adds Retry-After).
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Error::Busy { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
