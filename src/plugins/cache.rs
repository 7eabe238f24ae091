//! Compiled components on disk. Owns turning component bytes into a
//! `Component`, reusing an artifact serialized by an earlier run when one
//! exists for the same content hash AND the same engine fingerprint (an
//! artifact only loads into an engine configured like the one that made it).
//! It must never load an artifact from anywhere but its own directory: the
//! directory has to be writable by the server alone, as deserializing trusts
//! its contents.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::error::PluginError;
use super::limits::MAX_COMPONENT_BYTES;
use super::types::PluginId;

/// Precompiled components in one directory, named `<sha256>-<engine>.cwasm`.
pub(crate) struct DiskCache {
    dir: PathBuf,
    fingerprint: String,
}

/// `\0asm` followed by the core module version 1.
const CORE_MODULE_HEADER: [u8; 8] = [0, b'a', b's', b'm', 1, 0, 0, 0];

impl DiskCache {
    pub fn new(dir: PathBuf, fingerprint: String) -> Result<Self, PluginError> {
        fs::create_dir_all(&dir).map_err(|e| {
            PluginError::Host(format!("creating plugin cache dir {}: {e}", dir.display()))
        })?;
        Ok(DiskCache { dir, fingerprint })
    }

    fn path(&self, id: &PluginId) -> PathBuf {
        self.dir.join(format!("{id}-{}.cwasm", self.fingerprint))
    }

    /// The cached artifact for `id`, if there is a usable one.
    pub fn get(&self, engine: &Engine, id: &PluginId) -> Option<Component> {
        let path = self.path(id);
        // Read into memory rather than `deserialize_file`: that one maps the
        // file, and anything truncating it later would crash the process.
        let bytes = fs::read(&path).ok()?;
        // SAFETY: the file was written by `put` below into a directory only
        // this server writes (see the module doc); wasmtime still checks the
        // header, version and engine compatibility.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable plugin artifact: {e:#}");
                None
            }
        }
    }

    /// Stores `component` for later runs. Failing to write only costs a
    /// recompilation later, so it is logged, not returned.
    pub fn put(&self, id: &PluginId, component: &Component) {
        let path = self.path(id);
        if let Err(e) = component
            .serialize()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| write_atomically(&path, &bytes).map_err(|e| e.to_string()))
        {
            tracing::warn!(path = %path.display(), "could not cache plugin artifact: {e}");
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Unique per process and per write: two threads may cache the same id.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Compiles component bytes, with an error that says what the bytes are.
pub(crate) fn compile(engine: &Engine, bytes: &[u8]) -> Result<Component, PluginError> {
    if bytes.len() > MAX_COMPONENT_BYTES {
        return Err(PluginError::InvalidComponent {
            reason: format!("{} bytes, the limit is {MAX_COMPONENT_BYTES}", bytes.len()),
        });
    }
    if bytes.starts_with(&CORE_MODULE_HEADER) {
        return Err(PluginError::InvalidComponent {
            reason: "this is a core wasm module, not a component; build for wasm32-wasip2 \
                     (or wrap it with `wasm-tools component new`)"
                .into(),
        });
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(PluginError::InvalidComponent {
            reason: "not WebAssembly (no \\0asm header)".into(),
        });
    }
    Component::new(engine, bytes).map_err(|e| PluginError::InvalidComponent {
        reason: format!("{e:#}"),
    })
}

/// A component from the disk cache, or compiled and then cached.
pub(crate) fn load(
    engine: &Engine,
    disk: Option<&DiskCache>,
    id: &PluginId,
    bytes: &[u8],
) -> Result<Component, PluginError> {
    if let Some(c) = disk.and_then(|d| d.get(engine, id)) {
        return Ok(c);
    }
    let component = compile(engine, bytes)?;
    if let Some(d) = disk {
        d.put(id, &component);
    }
    Ok(component)
}
