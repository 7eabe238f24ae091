//! Shared by the plugin tests: finding the built components.
//!
//! Components come from `plugins/dist/` (or `$LORAPLEX_PLUGIN_DIST`). The
//! first test that needs one runs `plugins/build.sh` once per test binary:
//! it is a no-op of about a second when CI already ran it, and builds from
//! source on a fresh clone. Set `LORAPLEX_SKIP_PLUGIN_BUILD=1` to only read
//! what is there.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub fn dist_dir() -> PathBuf {
    std::env::var_os("LORAPLEX_PLUGIN_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist"))
}

fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("LORAPLEX_SKIP_PLUGIN_BUILD").is_some() {
            return;
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("LORAPLEX_PLUGIN_DIST", dist_dir())
            .output()
            .expect("running plugins/build.sh");
        assert!(
            out.status.success(),
            "plugins/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The bytes of a built plugin, by crate name (e.g. "ppo-clip").
pub fn component(name: &str) -> Vec<u8> {
    ensure_built();
    let path = dist_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
