//! The web console in a real headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol by Python playwright: tests/console/console_browser.py) against a
//! real `loraplex serve`: sign in; train through the official SDK and watch the run's
//! curve gain points live; switch to log scale and smoothing without JavaScript; download
//! a checkpoint as PEFT; sample in the playground; another tenant's key sees none of it
//! (404); the pages without JavaScript; the operator view (and a tenant refused it); sign
//! out. It asserts on the DOM and saves screenshots (docs/console/ holds a
//! few; `LORAPLEX_CONSOLE_SHOTS=dir` writes them there).
//!
//! Needs `scripts/setup-console.sh` (part of `scripts/setup.sh`); without the browser or
//! playwright the test fails and says so: it never passes without a browser.

mod common;

use common::server::{sdk_python, start_server_with};
use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_console_in_a_real_browser() {
    let python = sdk_python();
    let chromium = std::env::var_os("LORAPLEX_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let has_playwright = Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        chromium.exists() && has_playwright,
        "no chromium at {} or no playwright in {}: run ./scripts/setup-console.sh",
        chromium.display(),
        python.display()
    );
    let dir = std::env::temp_dir().join(format!("loraplex-console-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.txt");
    std::fs::write(
        &keys,
        "tml-alice alice\ntml-bob bob\ntml-root ops operator\n",
    )
    .unwrap();
    let shots = std::env::var_os("LORAPLEX_CONSOLE_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("shots"));
    std::fs::create_dir_all(&shots).unwrap();
    let (_server, port) =
        start_server_with(&dir, &[("LORAPLEX_KEYS_FILE", keys.to_str().unwrap())]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/console_browser.py");
    let status = Command::new(&python)
        .arg(&script)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .env("LORAPLEX_CHROMIUM", &chromium)
        .env("LORAPLEX_SHOTS", &shots)
        .env("TINKER_TELEMETRY", "0")
        .status()
        .expect("run the browser script");
    assert!(
        status.success(),
        "the console browser script failed: {status}"
    );
    for shot in [
        "sign-in.png",
        "run-live.png",
        "playground.png",
        "operator.png",
    ] {
        assert!(shots.join(shot).exists(), "no screenshot {shot}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
