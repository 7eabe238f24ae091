//! The one wasmtime `Engine` of the process, its configuration, and the
//! epoch ticker thread that turns deadlines into interrupts. It owns the
//! engine fingerprint that keys compiled artifacts on disk. It must never
//! enable anything that gives plugins more than the sandbox allows (no
//! threads, no shared memory).

use std::hash::Hasher;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::error::PluginError;
use super::limits::PluginLimits;

/// Core instances a Rust wasm32-wasip2 component creates (its module plus
/// the adapter shims), with headroom.
const CORE_INSTANCES_PER_COMPONENT: u32 = 8;

/// The shared engine and the epoch tick length.
pub(crate) struct PluginEngine {
    pub engine: Engine,
    pub tick: Duration,
}

impl PluginEngine {
    pub fn new(limits: &PluginLimits) -> Result<Self, PluginError> {
        let n = limits.max_instances;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .max_memory_size(limits.memory_bytes_in_pages());

        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .parallel_compilation(true);

        let engine = Engine::new(&config)
            .map_err(|e| PluginError::Host(format!("creating the wasmtime engine: {e:#}")))?;
        let tick = tick_for(limits);
        spawn_ticker(&engine, tick)?;
        Ok(PluginEngine { engine, tick })
    }

    /// Epochs to wait for `deadline`: rounded up, plus one because the
    /// current tick may be about to end.
    pub fn ticks(&self, deadline: Duration) -> u64 {
        let t = self.tick.as_nanos().max(1);
        (deadline.as_nanos().div_ceil(t) as u64).saturating_add(1)
    }

    /// Hex digest of everything that makes a compiled artifact loadable by
    /// this engine (wasmtime version, target, features, tunables).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.engine)
    }
}

fn fingerprint(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
    hex::encode(&h.0.finalize()[..12])
}

/// A tenth of the shortest deadline, between 1 and 10 ms: deadlines are met
/// within about 10%, and the ticker wakes at most 1000 times a second.
fn tick_for(limits: &PluginLimits) -> Duration {
    let shortest = limits.loss_deadline.min(limits.sampler_step_deadline);
    (shortest / 10).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

/// One thread for the whole engine; it ends once the engine is dropped.
fn spawn_ticker(engine: &Engine, tick: Duration) -> Result<(), PluginError> {
    let weak = engine.weak();
    thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                thread::sleep(tick);
            }
        })
        .map_err(|e| PluginError::Host(format!("starting the epoch ticker: {e}")))?;
    Ok(())
}

/// Feeds `Hash` output into sha256, so the fingerprint is stable across
/// processes (std's hashers are not promised to be).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_the_engine_configuration() {
        let ours = PluginEngine::new(&PluginLimits::default()).expect("engine");
        let again = PluginEngine::new(&PluginLimits::default()).expect("engine");
        assert_eq!(ours.fingerprint(), again.fingerprint());
        // Artifacts made without epoch checks must not load into our engine.
        let mut config = Config::new();
        config.epoch_interruption(false);
        let other = Engine::new(&config).expect("engine");
        assert_ne!(ours.fingerprint(), fingerprint(&other));
    }

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        let e = PluginEngine::new(&PluginLimits::default()).expect("engine");
        assert_eq!(e.tick, Duration::from_millis(5));
        assert_eq!(e.ticks(Duration::from_millis(50)), 11);
        assert_eq!(e.ticks(Duration::from_millis(51)), 12);
    }
}
