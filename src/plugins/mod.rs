//! The WebAssembly plugin host: tenants' custom losses and samplers run as
//! sandboxed wasm components (the contract is `wit/plugin.wit`,
//! `loraplex:plugin@0.1.0`).
//!
//! Parts, and the path of a call:
//! - `types`: `PluginId` (sha256 of the bytes), `PluginKind`, `ConfigValue`.
//! - `limits`: `PluginLimits` (deadlines, memory cap, output caps) and the
//!   per-store resource limiter.
//! - `engine`: the one wasmtime `Engine` (pooling allocator, epoch
//!   interruption) and its ticker thread.
//! - `cache`: bytes → compiled `Component`, reusing artifacts on disk keyed
//!   by content hash and engine fingerprint.
//! - `sandbox`: the store state and the inert WASI the plugin sees.
//! - `loss` / `sampler`: the two worlds: conversions, calls, output
//!   checks.
//! - `host`: `PluginHost`, which ties them together.
//! - `loss_fn`: `PluginLoss`, a loaded loss component as a training `LossFunction`.
//! - `sampler_fn`: `PluginSampler`, a loaded sampler component as the engine's `TokenSampler`.
//! - [`bench`]: the wasm-vs-native benchmark table.
//!
//! `PluginHost::load(bytes)` compiles (or reuses) the component, checks the
//! world it exports and keeps an `InstancePre`. `compute_loss` instantiates it
//! into a fresh store (deadline, memory cap), calls `compute`, and checks the
//! output. `new_sampler` makes a store and instance for one sequence;
//! `SamplerSession::step` calls into it under a per-step deadline.
//!
//! The host never decides who may use a plugin: ownership lives with the
//! caller.

pub mod bench;
mod cache;
mod engine;
mod error;
mod host;
mod limits;
mod loss;
mod loss_fn;
mod sampler;
mod sampler_fn;
mod sandbox;
mod types;

pub use error::PluginError;
pub use host::PluginHost;
pub use limits::{PluginLimits, MAX_COMPONENT_BYTES, MAX_METRIC_KEY_LEN};
pub use loss::{LossDatum, LossOutput, NamedTensor, TensorData};
pub use loss_fn::PluginLoss;
pub use sampler::{SamplerChoice, SamplerSession};
pub use sampler_fn::PluginSampler;
pub use types::{ConfigValue, PluginId, PluginKind};
