//! What one plugin call may use: its deadline, its memory, the size of what
//! it returns, and how many instances may live at once. Owns the defaults,
//! the reasons for them, and their `LORAPLEX_PLUGIN_*` variables. It must
//! never be bypassed: every store the host creates gets these limits.

use std::time::Duration;

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

use super::error::PluginError;

/// Limits applied to every plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimits {
    /// Wall-clock budget of one `compute_loss` call (instantiation included).
    /// 2 s: a 4x128 loss takes microseconds; the budget is for big batches and
    /// stays far below a training step, so a stuck plugin costs little.
    /// `LORAPLEX_PLUGIN_LOSS_DEADLINE_MS`.
    pub loss_deadline: Duration,
    /// Budget of one sampler step. 50 ms: a decode step of the base model
    /// takes about as long, so a plugin may at most double it.
    /// `LORAPLEX_PLUGIN_SAMPLER_STEP_DEADLINE_MS`.
    pub sampler_step_deadline: Duration,
    /// Linear memory cap per instance. 64 MiB holds a 49k-entry logit vector
    /// many times over and a batch of thousands of tokens.
    /// `LORAPLEX_PLUGIN_MEMORY_BYTES`.
    pub memory_bytes: usize,
    /// Most metrics a loss may return (1024). `LORAPLEX_PLUGIN_MAX_METRICS`.
    pub max_metrics: usize,
    /// Most plugin instances alive at once (loss calls in flight plus open
    /// sampler sessions): the pooling allocator's slot count. 256 slots
    /// reserve about 1 TiB of address space, none of it resident.
    /// `LORAPLEX_PLUGIN_MAX_INSTANCES`.
    pub max_instances: u32,
}

/// Longest metric key a plugin may return.
pub const MAX_METRIC_KEY_LEN: usize = 128;

/// Largest component accepted by `load` (32 MiB): compiling is host work no
/// deadline covers, so its input is bounded. Reference plugins are ~100 KB.
pub const MAX_COMPONENT_BYTES: usize = 32 << 20;

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            loss_deadline: Duration::from_secs(2),
            sampler_step_deadline: Duration::from_millis(50),
            memory_bytes: 64 << 20,
            max_metrics: 1024,
            max_instances: 256,
        }
    }
}

impl PluginLimits {
    /// Defaults overridden by the `LORAPLEX_PLUGIN_*` environment variables.
    pub fn from_env() -> Result<Self, PluginError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, PluginError> {
        fn parse(
            get: &impl Fn(&str) -> Option<String>,
            name: &'static str,
        ) -> Result<Option<u64>, PluginError> {
            match get(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => Err(PluginError::Config {
                        name,
                        reason: format!("expected a positive integer, got {v:?}"),
                    }),
                },
            }
        }
        let mut limits = PluginLimits::default();
        if let Some(ms) = parse(&get, "LORAPLEX_PLUGIN_LOSS_DEADLINE_MS")? {
            limits.loss_deadline = Duration::from_millis(ms);
        }
        if let Some(ms) = parse(&get, "LORAPLEX_PLUGIN_SAMPLER_STEP_DEADLINE_MS")? {
            limits.sampler_step_deadline = Duration::from_millis(ms);
        }
        if let Some(b) = parse(&get, "LORAPLEX_PLUGIN_MEMORY_BYTES")? {
            limits.memory_bytes = usize::try_from(b).map_err(|_| PluginError::Config {
                name: "LORAPLEX_PLUGIN_MEMORY_BYTES",
                reason: "too large".into(),
            })?;
        }
        if let Some(n) = parse(&get, "LORAPLEX_PLUGIN_MAX_METRICS")? {
            limits.max_metrics = n as usize;
        }
        if let Some(n) = parse(&get, "LORAPLEX_PLUGIN_MAX_INSTANCES")? {
            limits.max_instances = u32::try_from(n).map_err(|_| PluginError::Config {
                name: "LORAPLEX_PLUGIN_MAX_INSTANCES",
                reason: "too large".into(),
            })?;
        }
        limits.validate()?;
        Ok(limits)
    }

    pub(crate) fn validate(&self) -> Result<(), PluginError> {
        let bad = |name, reason: &str| {
            Err(PluginError::Config {
                name,
                reason: reason.to_string(),
            })
        };
        if self.loss_deadline.is_zero() {
            return bad("loss_deadline", "must be positive");
        }
        if self.sampler_step_deadline.is_zero() {
            return bad("sampler_step_deadline", "must be positive");
        }
        // A Rust guest starts with about 1.1 MiB (stack plus data).
        if self.memory_bytes < (2 << 20) || self.memory_bytes > (4 << 30) {
            return bad("memory_bytes", "must be between 2 MiB and 4 GiB");
        }
        if self.max_instances == 0 || self.max_instances > 10_000 {
            return bad("max_instances", "must be between 1 and 10000");
        }
        Ok(())
    }

    /// The memory cap rounded up to whole wasm pages, as the pool needs it.
    pub(crate) fn memory_bytes_in_pages(&self) -> usize {
        self.memory_bytes.div_ceil(65536) * 65536
    }
}

/// The store's resource limiter: wasmtime's `StoreLimits` (which traps on a
/// refused grow) plus a note of whether it refused memory, so that the error
/// can say "memory limit" instead of a generic trap.
pub(crate) struct CallLimiter {
    inner: StoreLimits,
    pub memory_limit_hit: bool,
}

impl CallLimiter {
    pub fn new(limits: &PluginLimits) -> Self {
        CallLimiter {
            inner: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .table_elements(100_000)
                .instances(64)
                .tables(64)
                .memories(8)
                .trap_on_grow_failure(true)
                .build(),
            memory_limit_hit: false,
        }
    }
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let answer = self.inner.memory_growing(current, desired, maximum);
        if !matches!(answer, Ok(true)) {
            self.memory_limit_hit = true;
        }
        answer
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_limit_hit = true;
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_defaults_and_rejects_garbage() {
        let limits = PluginLimits::from_lookup(|name| match name {
            "LORAPLEX_PLUGIN_LOSS_DEADLINE_MS" => Some("500".into()),
            "LORAPLEX_PLUGIN_MEMORY_BYTES" => Some("8388608".into()),
            _ => None,
        })
        .expect("valid settings");
        assert_eq!(limits.loss_deadline, Duration::from_millis(500));
        assert_eq!(limits.memory_bytes, 8 << 20);
        assert_eq!(limits.sampler_step_deadline, Duration::from_millis(50));

        let err = PluginLimits::from_lookup(|name| {
            (name == "LORAPLEX_PLUGIN_MAX_METRICS").then(|| "lots".to_string())
        })
        .expect_err("not a number");
        assert!(matches!(
            err,
            PluginError::Config {
                name: "LORAPLEX_PLUGIN_MAX_METRICS",
                ..
            }
        ));
    }
}
