//! The storage layer's typed error, and how it becomes the crate's [`Error`]. Owns no I/O.

use crate::error::Error;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint directory that exists but cannot be what we wrote.
    #[error("checkpoint {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column or metadata file that does not parse.
    #[error("stored {what} does not parse: {message}")]
    Decode { what: &'static str, message: String },
    /// Does not exist, or belongs to another tenant (never say which).
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// A caller-supplied name or value the store cannot accept.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    /// The database writer thread is gone (shutdown or a panic).
    #[error("store closed: {0}")]
    Closed(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, id } => Error::NotFound { kind, id },
            StoreError::AlreadyExists { kind, id } => {
                Error::invalid(kind, format!("{id} already exists"))
            }
            StoreError::Invalid { field, message } => Error::InvalidInput { field, message },
            StoreError::Tensor(t) => Error::Tensor(t),
            StoreError::Io { source, op, path } => Error::Io(std::io::Error::new(
                source.kind(),
                format!("{op} {}: {source}", path.display()),
            )),
            StoreError::Closed(m) => Error::Unavailable(m),
            other @ (StoreError::Corrupt { .. } | StoreError::Decode { .. }) => Error::Io(
                std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
            ),
            other @ (StoreError::Db(_) | StoreError::Migrate(_)) => {
                Error::Io(std::io::Error::other(other.to_string()))
            }
        }
    }
}
