//! `PluginError`, the one error type of the plugin host, and the mapping
//! from what wasmtime reports (traps, limiter refusals) to its variants.
//! Every failure of a plugin call ends up here as a value; nothing in the host
//! panics on what a plugin does.

use std::time::Duration;

use wasmtime::Trap;

use super::types::{PluginId, PluginKind};

/// What went wrong with a plugin or a plugin call.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a WebAssembly component this engine can compile.
    #[error("invalid component: {reason}")]
    InvalidComponent { reason: String },

    /// The component does not implement the world it was loaded or called as.
    #[error("wrong world: expected {expected}, found {found}")]
    WrongWorld { expected: String, found: String },

    /// No plugin with this id was loaded into this host.
    #[error("unknown plugin {0}")]
    UnknownPlugin(PluginId),

    /// The call ran past its epoch deadline and was interrupted.
    #[error("plugin exceeded its deadline of {deadline:?}")]
    Timeout { deadline: Duration },

    /// The plugin tried to grow its memory past the cap.
    #[error("plugin exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit { limit_bytes: usize },

    /// The plugin recursed past the wasm stack limit.
    #[error("plugin overflowed its stack")]
    StackOverflow,

    /// The plugin trapped (a panic, `unreachable`, an out-of-bounds access, a
    /// forbidden host call). `message` holds the trap and what the plugin
    /// wrote to stderr, if anything.
    #[error("plugin trapped: {message}")]
    Trap { message: String },

    /// The plugin ran to completion and reported an error of its own (e.g. a
    /// missing input or a bad config value).
    #[error("plugin reported an error: {message}")]
    PluginFailed { message: String },

    /// The plugin returned something the host refuses: a gradient of the
    /// wrong length, a non-finite number, a bad metric, a token outside the
    /// vocabulary.
    #[error("plugin returned bad output: {what}")]
    BadOutput { what: String },

    /// The caller passed something the plugin contract does not allow.
    #[error("bad input for plugin: {what}")]
    BadInput { what: String },

    /// The host is at its limit of concurrently live plugin instances.
    #[error("plugin capacity exhausted: {what}")]
    Capacity { what: String },

    /// The sampler session failed earlier and cannot be stepped again.
    #[error("sampler session is closed: {reason}")]
    SessionClosed { reason: String },

    /// A setting is invalid (e.g. a `LORAPLEX_PLUGIN_*` variable).
    #[error("invalid plugin setting {name}: {reason}")]
    Config { name: &'static str, reason: String },

    /// The engine could not be set up, or another host-side failure.
    #[error("plugin host error: {0}")]
    Host(String),
}

impl PluginError {
    pub(crate) fn wrong_kind(expected: PluginKind, found: PluginKind) -> Self {
        PluginError::WrongWorld {
            expected: expected.world().to_string(),
            found: found.world().to_string(),
        }
    }

    /// True when the error came from the plugin's behaviour rather than the
    /// caller or the host (useful for metrics and for blaming the tenant).
    pub fn is_plugin_fault(&self) -> bool {
        matches!(
            self,
            PluginError::Timeout { .. }
                | PluginError::MemoryLimit { .. }
                | PluginError::StackOverflow
                | PluginError::Trap { .. }
                | PluginError::PluginFailed { .. }
                | PluginError::BadOutput { .. }
        )
    }
}

/// What the store saw during a failed call, to tell the causes apart.
pub(crate) struct CallContext<'a> {
    pub deadline: Duration,
    pub memory_limit_hit: bool,
    pub memory_limit: usize,
    pub stderr: &'a [u8],
}

/// Most of a plugin's stderr that goes into an error message.
const STDERR_IN_MESSAGE: usize = 1024;

/// Maps a failed wasmtime call (instantiation or export call) to a variant.
pub(crate) fn classify(err: wasmtime::Error, cx: &CallContext<'_>) -> PluginError {
    if cx.memory_limit_hit {
        return PluginError::MemoryLimit {
            limit_bytes: cx.memory_limit,
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            return PluginError::Timeout {
                deadline: cx.deadline,
            }
        }
        Some(Trap::StackOverflow) => return PluginError::StackOverflow,
        _ => {}
    }
    let text = format!("{err:#}");
    if text.contains("concurrent") && text.contains("limit") {
        // The pooling allocator has no free slot.
        return PluginError::Capacity {
            what: err.root_cause().to_string(),
        };
    }
    // The full chain carries a wasm backtrace: keep it for the log, and give
    // the caller the cause itself.
    tracing::debug!("plugin call failed: {text}");
    let text = match err.downcast_ref::<Trap>() {
        Some(trap) => format!("wasm trap: {trap}"),
        None => err.root_cause().to_string(),
    };
    let mut message = text;
    let stderr = String::from_utf8_lossy(cx.stderr);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        let cut: String = stderr.chars().take(STDERR_IN_MESSAGE).collect();
        message.push_str("; plugin stderr: ");
        message.push_str(&cut);
    }
    PluginError::Trap { message }
}
