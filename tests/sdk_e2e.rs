//! The official `tinker` SDK, unchanged, against a real `loraplex serve` process on
//! SmolLM2: tests/sdk/tinker_sdk_e2e.py drives training (cross_entropy with the loss
//! falling, importance_sampling, ppo, cispo, dro, forward_backward_custom when torch is
//! there; stable_reinforce on samples recorded with `record_stability_info` and datums
//! carrying the cookbook's provenance spans, and gspo with its `sequence_ratio_mask`),
//! sampler checkpoints, sampling with stop tokens and prompt logprobs,
//! compute_logprobs, save_state / list / restore with optimizer, and a refused request;
//! and the replaced Flask server's own client (tests/flask/test_concurrent_users.py).
//!
//! The Python comes from `LORAPLEX_SDK_PYTHON`, else the virtualenv that
//! `scripts/setup-sdk.sh` makes (part of `scripts/setup.sh`). Missing, the test fails and
//! says how to make it: it never passes without running the SDK.

mod common;

use common::server::{sdk_python, start_server};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[test]
fn official_tinker_sdk_trains_samples_and_checkpoints() {
    let python = sdk_python();
    assert!(
        python.exists(),
        "no Python with the tinker SDK at {}: run ./scripts/setup-sdk.sh or set LORAPLEX_SDK_PYTHON",
        python.display()
    );
    let dir = std::env::temp_dir().join(format!("loraplex-sdk-e2e-{}", std::process::id()));
    let (_server, port) = start_server(&dir);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/tinker_sdk_e2e.py");
    let t = Instant::now();
    let status = Command::new(&python)
        .arg(&script)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .env("TINKER_TELEMETRY", "0")
        .status()
        .expect("run the SDK script");
    eprintln!("SDK script took {:.1} s", t.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "the tinker SDK script failed: {status}");
}

/// The replaced Flask server's own concurrency client, its request bodies unchanged
/// (`"base_model": "base"` on `/add_lora`, chat conversations, polling `/retrieve_future`
/// through 202s): tests/flask/test_concurrent_users.py against a real `loraplex serve`.
#[test]
fn replaced_flask_servers_client_runs_unchanged() {
    let python = sdk_python();
    assert!(
        python.exists(),
        "no Python with requests at {}: run ./scripts/setup-sdk.sh or set LORAPLEX_SDK_PYTHON",
        python.display()
    );
    let dir = std::env::temp_dir().join(format!("loraplex-flask-client-{}", std::process::id()));
    let (_server, port) = start_server(&dir);
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/flask/test_concurrent_users.py");
    let status = Command::new(&python)
        .arg(&script)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .status()
        .expect("run the Flask client");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.success(),
        "the Flask server's client failed: {status}"
    );
}
