//! What a plugin sees of the outside world: nothing. Owns the per-store state
//! (`PluginState`), the inert WASI context and the linker that satisfies a
//! wasm32-wasip2 component's imports. It must never hand a plugin a real
//! file, socket, variable, clock or source of entropy.
//!
//! Components built for wasm32-wasip2 import `wasi:cli`, `wasi:io`,
//! `wasi:clocks`, `wasi:random`, `wasi:filesystem` and `wasi:sockets` even
//! when they never use them, so the linker provides all of them through
//! wasmtime-wasi's synchronous p2 implementation over an empty `WasiCtx`:
//!
//! | interface | what a plugin gets |
//! |---|---|
//! | `wasi:cli/environment` | no variables, no arguments, no cwd |
//! | `wasi:cli/stdin` | an empty stream (immediate end of file) |
//! | `wasi:cli/stdout` | a sink: writes succeed and are discarded |
//! | `wasi:cli/stderr` | the first 4 KiB are kept for error messages (a panic message shows up in `PluginError::Trap`), the rest is refused |
//! | `wasi:cli/exit` | ends the call with a trap |
//! | `wasi:cli/terminal-*` | no terminal |
//! | `wasi:io/*` | streams and pollables over the above |
//! | `wasi:clocks/wall-clock`, `monotonic-clock` | frozen at 0: plugins cannot observe time; `subscribe-duration` / `subscribe-instant` trap, so a plugin cannot sleep past its deadline inside the host |
//! | `wasi:random/*` | a fixed byte pattern, so plugins are deterministic: randomness comes from the host's `random` argument |
//! | `wasi:filesystem/*` | no preopened directories: nothing to open |
//! | `wasi:sockets/*` | every address denied, no name lookup |

use std::time::Duration;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::random::Deterministic;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::error::{classify, CallContext, PluginError};
use super::limits::{CallLimiter, PluginLimits};

/// How much of a plugin's stderr is kept.
const STDERR_CAPTURE_BYTES: usize = 4096;

/// The wasmtime-wasi p2 version whose clock functions are replaced.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The data of one store (one plugin call or one sampler session).
pub(crate) struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    pub limiter: CallLimiter,
    memory_limit: usize,
    deadline: Duration,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The bytes `wasi:random` cycles through.
const FIXED_RANDOM: [u8; 16] = *b"loraplex-no-rng!";

impl PluginState {
    fn new(limits: &PluginLimits, deadline: Duration) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(Deterministic::new(FIXED_RANDOM.to_vec()))
            .insecure_random(Deterministic::new(FIXED_RANDOM.to_vec()))
            .insecure_random_seed(0)
            .allow_blocking_current_thread(false)
            .build();
        PluginState {
            wasi,
            table: ResourceTable::new(),
            stderr,
            limiter: CallLimiter::new(limits),
            memory_limit: limits.memory_bytes,
            deadline,
        }
    }

    /// The deadline this store's calls run under.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }
}

/// Builds the linker shared by every instantiation.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<PluginState>, PluginError> {
    let host_err = |e: wasmtime::Error| PluginError::Host(format!("linking WASI: {e:#}"));
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(host_err)?;
    // Waiting on a clock would block the host thread where no epoch deadline
    // reaches: refuse it.
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK).map_err(host_err)?;
    for name in ["subscribe-duration", "subscribe-instant"] {
        clock
            .func_new(name, |_store, _ty, _params, _results| {
                Err(wasmtime::Error::msg(
                    "plugins may not wait on clocks (wasi:clocks/monotonic-clock subscribe)",
                ))
            })
            .map_err(host_err)?;
    }
    linker.allow_shadowing(false);
    Ok(linker)
}

/// A fresh store with the call limits and a deadline `ticks` epochs away.
pub(crate) fn new_store(
    engine: &Engine,
    limits: &PluginLimits,
    deadline: Duration,
    ticks: u64,
) -> Store<PluginState> {
    let mut store = Store::new(engine, PluginState::new(limits, deadline));
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(ticks);
    store.epoch_deadline_trap();
    store
}

/// Maps an error from a call into `store` to a `PluginError`.
pub(crate) fn call_error(store: &Store<PluginState>, err: wasmtime::Error) -> PluginError {
    let state = store.data();
    let stderr = state.stderr.contents();
    classify(
        err,
        &CallContext {
            deadline: state.deadline,
            memory_limit_hit: state.limiter.memory_limit_hit,
            memory_limit: state.memory_limit,
            stderr: &stderr,
        },
    )
}
