//! loraplex: many tenants fine-tune their own LoRA adapters on one shared base model (or
//! on any of several served side by side, each run and sampling session naming its own).
//!
//! The parts, in the order a training request passes through them:
//! - [`model`]: the frozen base model (Llama family): weights, tokenizer, chat template, and
//!   the batched multi-adapter forward/backward pass and KV-cached decoding.
//! - [`lora`]: adapter parameters, their sites and initialisation, gradients, AdamW.
//! - [`train`]: built-in losses on per-token logprobs and the forward_backward / optim_step
//!   operations that tie model, losses and adapters together.
//! - [`sample`]: the decoding loop and sampling parameters, what a request asks of its
//!   prompt's logits, and the prefix cache of prompt KV.
//! - [`plugins`]: the wasmtime host for tenants' loss and sampler components (`wit/`).
//! - [`jobs`]: the job engine: futures, per-model ordering, the scheduler that batches
//!   many tenants' work into multi-adapter passes (one base model per pass), worker
//!   lanes, the sampling engine (a lane per base).
//! - [`api`]: the HTTP server: the Tinker SDK's wire protocol, the seed's REST routes,
//!   plugin upload, metrics, the web console (`/console`); [`auth`]: API keys and tenants; [`quota`]: what each tenant
//!   may hold and how fast it may call.
//! - [`store`]: durable state: the metadata database (SQLite), the futures kept in it,
//!   atomic checkpoint files, and PEFT export.
//! - [`config`]: every setting with its default and environment variable; [`failpoint`]:
//!   panics that tests inject to prove containment; [`progress`]: the start-up progress
//!   bar.

pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod jobs;
pub mod lora;
pub mod model;
pub mod plugins;
pub mod progress;
pub mod quota;
pub mod sample;
pub mod store;
pub mod train;
pub mod util;
pub mod view;

pub use error::{Error, Result};
