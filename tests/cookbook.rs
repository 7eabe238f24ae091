//! tinker-cookbook 0.6.1's own loops, unchanged, against a real `loraplex serve` on
//! SmolLM2: supervised.train (loss falls, evaluator, checkpoints, resume, message
//! completer), rl.train sync (importance_sampling) and async (stable_reinforce), and a DPO
//! run (forward_backward_custom). tests/cookbook/run_cookbook.py drives them and asserts.
//!
//! The tokenizer comes from the served GGUF: `loraplex export-hf --tokenizer-only` writes
//! it into a Hugging Face cache directory that the cookbook reads with the Hub offline,
//! as a user without Hub access would. The Python comes from `LORAPLEX_COOKBOOK_PYTHON`,
//! else the virtualenv `scripts/setup-cookbook.sh` makes (part of `scripts/setup.sh`).
//! Missing, the test fails and says how to make it: it never passes without the cookbook.

mod common;

use common::server::start_server;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn cookbook_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAPLEX_COOKBOOK_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/loraplex/venv-cookbook/bin/python")
}

/// A Hugging Face cache (`$HF_HOME`) holding the served model's tokenizer files under the
/// Hub name clients use, exported from the GGUF by the binary under test.
fn offline_hf_home(dir: &Path, model_name: &str) -> PathBuf {
    let home = dir.join("hf");
    let repo = home
        .join("hub")
        .join(format!("models--{}", model_name.replace('/', "--")));
    let snapshot = repo.join("snapshots").join("loraplex");
    let status = Command::new(env!("CARGO_BIN_EXE_loraplex"))
        .args(["export-hf", "--tokenizer-only", "--out"])
        .arg(&snapshot)
        .env("LORAPLEX_MODEL_PATH", common::model_path())
        .env("LORAPLEX_MODEL_NAME", model_name)
        .status()
        .expect("run loraplex export-hf");
    assert!(status.success(), "export-hf failed: {status}");
    std::fs::create_dir_all(repo.join("refs")).expect("refs dir");
    std::fs::write(repo.join("refs").join("main"), "loraplex").expect("refs/main");
    home
}

#[test]
fn tinker_cookbook_loops_run_unchanged() {
    let python = cookbook_python();
    assert!(
        python.exists(),
        "no Python with tinker-cookbook at {}: run ./scripts/setup-cookbook.sh or set LORAPLEX_COOKBOOK_PYTHON",
        python.display()
    );
    let dir = std::env::temp_dir().join(format!("loraplex-cookbook-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let model_name = loraplex::config::DEFAULT_MODEL_NAME;
    let hf_home = offline_hf_home(&dir, model_name);
    let (_server, port) = start_server(&dir.join("data"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cookbook/run_cookbook.py");
    let t = Instant::now();
    let status = Command::new(&python)
        .arg(&script)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .env("LORAPLEX_MODEL_NAME", model_name)
        .env("LORAPLEX_COOKBOOK_WORK", &work)
        .env("TINKER_API_KEY", "tml-cookbook")
        .env("TINKER_TELEMETRY", "0")
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("WANDB_MODE", "disabled")
        .status()
        .expect("run the cookbook script");
    eprintln!("cookbook script took {:.1} s", t.elapsed().as_secs_f64());
    if status.success() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        status.success(),
        "the tinker-cookbook loops failed: {status} (files under {})",
        dir.display()
    );
}
