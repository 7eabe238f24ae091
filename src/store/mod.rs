//! Durable state: what must survive a restart, and nothing that runs.
//!
//! - [`db`]: the metadata database (SQLite, WAL, migrations in `migrations/`): tenants,
//!   client sessions (open and ended), training runs (loaded, unloaded or deleted, with
//!   their `user_metadata`), futures, checkpoints (training, sampler, external; public or
//!   not), sampling sessions, plugins, and every training result's metrics (history).
//! - [`future_store`]: the engine's `FutureStore` on that database, with a memory map in
//!   front and a writer thread; unfinished futures fail after a restart.
//! - [`checkpoint`]: adapter checkpoints on disk (safetensors + JSON), written atomically.
//! - [`peft`]: export of an adapter in Hugging Face PEFT layout, as files or a `.tar`.
//! - [`atomic`]: the atomic-directory mechanics both file formats use.
//! - [`durable`]: all of it behind one handle for a running server: the engine's
//!   `Persist`, plugin bytes, sessions, and the rebuild after a restart.
//!
//! The store records what the engine and the API decide; it never schedules, runs model
//! work, or checks API keys. Every lookup takes the tenant and treats another tenant's ids
//! as not found. Errors are [`StoreError`], which converts into [`crate::Error`].

pub mod atomic;
pub mod checkpoint;
pub mod db;
pub mod durable;
pub mod error;
pub mod future_store;
pub mod peft;

pub use checkpoint::{Checkpoint, CheckpointKind, CheckpointMeta, CheckpointStore};
pub use db::{Db, RESTARTED_MESSAGE};
pub use durable::{Durable, DurableHistory};
pub use error::StoreError;
pub use future_store::{FutureStoreConfig, SqliteFutureStore};
