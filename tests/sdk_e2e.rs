//! The official `tinker` SDK, unchanged, against a real `loraplex serve` process on
//! SmolLM2: tests/sdk/tinker_sdk_e2e.py drives training (cross_entropy with the loss
//! falling, importance_sampling, ppo, cispo, dro, forward_backward_custom when torch is
//! there), sampler checkpoints, sampling with stop tokens and prompt logprobs,
//! compute_logprobs, save_state / list / restore with optimizer, and a refused request.
//!
//! The Python comes from `LORAPLEX_SDK_PYTHON`, else the virtualenv that
//! `scripts/setup-sdk.sh` makes (part of `scripts/setup.sh`). Missing, the test fails and
//! says how to make it: it never passes without running the SDK.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET a path; the response's status line and body (tiny HTTP/1.1 client, no deps).
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn sdk_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAPLEX_SDK_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/loraplex/venv-sdk/bin/python")
}

fn start_server(data_dir: &std::path::Path) -> (Server, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_loraplex"))
        .arg("serve")
        .env("LORAPLEX_ADDR", format!("127.0.0.1:{port}"))
        .env("LORAPLEX_DATA_DIR", data_dir)
        .env("LORAPLEX_MODEL_PATH", common::model_path())
        .env("RUST_LOG", "warn,loraplex=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loraplex serve");
    let mut server = Server(child);
    // Forward the server's log to ours (visible with --nocapture).
    if let Some(err) = server.0.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
            }
        });
    }
    let t = Instant::now();
    loop {
        if let Some(r) = get(port, "/healthz") {
            if r.contains("\"model_loaded\":true") {
                break;
            }
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("loraplex serve exited early: {status}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "server not ready in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (server, port)
}

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
