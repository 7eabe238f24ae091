//! `PluginHost`, the entry point: loads components (compile once per content
//! hash, memory and disk cache), decides which world each implements, and
//! runs calls, each in a fresh store with the limits. It knows nothing of
//! tenants or ownership: a plugin is known only by the hash of its bytes.
//! Compiled code stays loaded until [`PluginHost::unload`]; the API unloads a plugin once
//! no tenant owns it, so what is held is bounded by the tenants' plugin quotas.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};

use super::cache::{self, DiskCache};
use super::engine::PluginEngine;
use super::error::PluginError;
use super::limits::PluginLimits;
use super::loss::{self, LossDatum, LossOutput, LossPluginPre};
use super::sampler::{self, SamplerPluginPre, SamplerSession};
use super::sandbox::{self, PluginState};
use super::types::{ConfigValue, PluginId, PluginKind};

/// The plugin runtime of the process. Cheap to clone (an `Arc` inside),
/// `Send + Sync`: any thread may load plugins and run calls at once.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

struct Inner {
    engine: PluginEngine,
    linker: Linker<PluginState>,
    limits: PluginLimits,
    disk: Option<DiskCache>,
    loaded: RwLock<HashMap<PluginId, Arc<Loaded>>>,
}

/// A compiled component, checked against its world, ready to instantiate.
enum Loaded {
    Loss(LossPluginPre<PluginState>),
    Sampler(SamplerPluginPre<PluginState>),
}

impl Loaded {
    fn kind(&self) -> PluginKind {
        match self {
            Loaded::Loss(_) => PluginKind::Loss,
            Loaded::Sampler(_) => PluginKind::Sampler,
        }
    }
}

impl PluginHost {
    /// Starts the engine and its epoch ticker. With `cache_dir`, compiled
    /// components are also kept on disk there, for the next process.
    pub fn new(limits: PluginLimits, cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        limits.validate()?;
        let engine = PluginEngine::new(&limits)?;
        let linker = sandbox::linker(&engine.engine)?;
        let disk = cache_dir
            .map(|dir| DiskCache::new(dir, engine.fingerprint()))
            .transpose()?;
        Ok(PluginHost {
            inner: Arc::new(Inner {
                engine,
                linker,
                limits,
                disk,
                loaded: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &PluginLimits {
        &self.inner.limits
    }

    /// Loads a component (compiling it, or reusing the in-memory or on-disk
    /// artifact for the same bytes) and says which world it implements.
    pub fn load(&self, bytes: &[u8]) -> Result<(PluginId, PluginKind), PluginError> {
        let id = PluginId::of(bytes);
        if let Some(kind) = self.kind(&id) {
            return Ok((id, kind));
        }
        let inner = &self.inner;
        let component = cache::load(&inner.engine.engine, inner.disk.as_ref(), &id, bytes)?;
        let loaded = Arc::new(self.prepare(&component)?);
        let kind = loaded.kind();
        self.write_loaded().entry(id.clone()).or_insert(loaded);
        tracing::debug!(plugin = %id, %kind, "plugin loaded");
        Ok((id, kind))
    }

    /// The kind of a loaded plugin, or None if it is not loaded.
    pub fn kind(&self, id: &PluginId) -> Option<PluginKind> {
        self.read_loaded().get(id).map(|l| l.kind())
    }

    /// Forgets a loaded plugin (its disk artifact stays). Calls and sessions
    /// already running keep their own reference.
    pub fn unload(&self, id: &PluginId) -> bool {
        self.write_loaded().remove(id).is_some()
    }

    /// Runs a loss plugin over a batch, in a fresh store under the loss
    /// deadline and memory cap, and checks what it returns.
    pub fn compute_loss(
        &self,
        id: &PluginId,
        data: &[LossDatum],
        config: &BTreeMap<String, ConfigValue>,
    ) -> Result<LossOutput, PluginError> {
        let loaded = self.get(id)?;
        let Loaded::Loss(pre) = &*loaded else {
            return Err(PluginError::wrong_kind(PluginKind::Loss, loaded.kind()));
        };
        let deadline = self.inner.limits.loss_deadline;
        let store = sandbox::new_store(
            &self.inner.engine.engine,
            &self.inner.limits,
            deadline,
            self.inner.engine.ticks(deadline),
        );
        loss::compute(pre, store, &self.inner.limits, data, config)
    }

    /// Starts decoding one sequence with a sampler plugin: a fresh store
    /// and instance that live as long as the session.
    pub fn new_sampler(
        &self,
        id: &PluginId,
        prompt: &[u32],
        config: &BTreeMap<String, ConfigValue>,
        vocab_size: usize,
    ) -> Result<SamplerSession, PluginError> {
        let loaded = self.get(id)?;
        let Loaded::Sampler(pre) = &*loaded else {
            return Err(PluginError::wrong_kind(PluginKind::Sampler, loaded.kind()));
        };
        let deadline = self.inner.limits.sampler_step_deadline;
        let ticks = self.inner.engine.ticks(deadline);
        // Instantiation and `create` get the same budget as one step.
        let store = sandbox::new_store(
            &self.inner.engine.engine,
            &self.inner.limits,
            deadline,
            ticks,
        );
        SamplerSession::start(pre, store, prompt, config, vocab_size, ticks)
    }

    fn get(&self, id: &PluginId) -> Result<Arc<Loaded>, PluginError> {
        self.read_loaded()
            .get(id)
            .cloned()
            .ok_or_else(|| PluginError::UnknownPlugin(id.clone()))
    }

    /// Finds which world the component exports and checks it against that
    /// world's types; anything else is refused.
    fn prepare(&self, component: &Component) -> Result<Loaded, PluginError> {
        let engine = &self.inner.engine.engine;
        let exports: Vec<String> = component
            .component_type()
            .exports(engine)
            .map(|(name, item)| match item.ty {
                ComponentItem::ComponentInstance(_) => name.to_string(),
                _ => format!("{name} (not an interface)"),
            })
            .collect();
        let has = |kind: PluginKind| exports.iter().any(|e| e == kind.export_name());
        let expected = || {
            format!(
                "a component exporting {} or {}",
                PluginKind::Loss.export_name(),
                PluginKind::Sampler.export_name()
            )
        };
        let kind = match (has(PluginKind::Loss), has(PluginKind::Sampler)) {
            (true, false) => PluginKind::Loss,
            (false, true) => PluginKind::Sampler,
            (both, _) => {
                let found = if both {
                    "both worlds in one component".to_string()
                } else if exports.is_empty() {
                    "no exports".to_string()
                } else {
                    format!("exports [{}]", exports.join(", "))
                };
                return Err(PluginError::WrongWorld {
                    expected: expected(),
                    found,
                });
            }
        };
        let mismatch = |e: wasmtime::Error| PluginError::WrongWorld {
            expected: kind.world().to_string(),
            found: format!("{e:#}"),
        };
        let pre =
            self.inner
                .linker
                .instantiate_pre(component)
                .map_err(|e| PluginError::WrongWorld {
                    expected: format!("{} importing only wasi:*@0.2", kind.world()),
                    found: format!("{e:#}"),
                })?;
        Ok(match kind {
            PluginKind::Loss => Loaded::Loss(loss::prepare(pre).map_err(mismatch)?),
            PluginKind::Sampler => Loaded::Sampler(sampler::prepare(pre).map_err(mismatch)?),
        })
    }

    fn read_loaded(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PluginId, Arc<Loaded>>> {
        // A panic elsewhere while holding the lock leaves the map itself intact.
        self.inner
            .loaded
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_loaded(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PluginId, Arc<Loaded>>> {
        self.inner
            .loaded
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn host_is_shareable_and_sessions_can_move() {
        assert_send_sync::<PluginHost>();
        assert_send::<SamplerSession>();
    }

    #[test]
    fn garbage_and_core_modules_are_refused() {
        let host = PluginHost::new(PluginLimits::default(), None).expect("host");
        let err = host.load(b"not wasm at all").expect_err("garbage");
        assert!(matches!(err, PluginError::InvalidComponent { .. }), "{err}");
        // The smallest core module: header only.
        let err = host
            .load(&[0, b'a', b's', b'm', 1, 0, 0, 0])
            .expect_err("core module");
        assert!(err.to_string().contains("core wasm module"), "{err}");
    }
}
