//! API fuzzing: schemathesis against the `/openapi.json` of a real `loraplex serve` on
//! SmolLM2, as a tenant, over every operation, for a fixed time budget. The run passes only
//! if schemathesis finds nothing (checks `not_a_server_error`, `status_code_conformance`,
//! `content_type_conformance`), the server is still alive afterwards, and its own counters
//! (`/metrics`) show no 5xx answer at all. tests/fuzz/hooks.py encodes the protobuf and
//! wasm bodies, adds hostile tensors, and puts real ids (a session, a training model,
//! checkpoints, plugins) into most requests so they reach the handlers; a per-operation
//! table of answers shows how deep the run got. A crash inside schemathesis's own data
//! generation (Hypothesis `FlakyFailure`, no request sent) is reported but is not a finding
//! ([`classify`]).
//!
//! Settings: `LORAPLEX_FUZZ_SECONDS` (time budget, default 150), `LORAPLEX_FUZZ_SEED`,
//! `LORAPLEX_FUZZ_WORKERS` (default 2), `LORAPLEX_FUZZ_PYTHON` (else the virtualenv that
//! `scripts/setup-fuzz.sh` makes, part of `scripts/setup.sh`). Without schemathesis the
//! test fails and says how to install it: it never passes without fuzzing.

mod common;

use common::server::{get, start_server_with};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn fuzz_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAPLEX_FUZZ_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/loraplex/venv-fuzz/bin/python")
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `loraplex_http_requests_total{route, status}` lines with a 5xx status.
fn server_errors(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("loraplex_http_requests_total{"))
        .filter(|l| l.contains("status=\"5"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn schemathesis_finds_no_server_error_and_no_crash() {
    let python = fuzz_python();
    assert!(
        python.exists(),
        "no Python with schemathesis at {}: run ./scripts/setup-fuzz.sh or set LORAPLEX_FUZZ_PYTHON",
        python.display()
    );
    // The wasm bodies include the real components.
    let _ = common::component("ppo-clip");
    let dir = std::env::temp_dir().join(format!("loraplex-fuzz-{}", std::process::id()));
    // Short long-polls and seq_id gaps, so no fuzzed request waits long.
    let (mut server, port) = start_server_with(
        &dir,
        &[
            ("LORAPLEX_LONG_POLL_MS", "500"),
            ("LORAPLEX_SEQ_TIMEOUT_MS", "3000"),
        ],
    );
    let seconds = env_or("LORAPLEX_FUZZ_SECONDS", 150);
    let seed = env_or("LORAPLEX_FUZZ_SEED", rand_seed());
    let workers = env_or("LORAPLEX_FUZZ_WORKERS", 2);
    let stats = dir.join("fuzz-stats.txt");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let t = Instant::now();
    let out = Command::new(&python)
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("http://127.0.0.1:{port}/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance",
            "-H",
            "X-API-Key: tml-fuzz",
            "--generation-with-security-parameters",
            "false",
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "60",
            "--no-color",
        ])
        .args(["--max-time", &seconds.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--workers", &workers.to_string()])
        .env("PYTHONPATH", root.join("tests/fuzz"))
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("LORAPLEX_FUZZ_URL", format!("http://127.0.0.1:{port}"))
        .env("LORAPLEX_FUZZ_KEY", "tml-fuzz")
        .env("LORAPLEX_FUZZ_STATS", &stats)
        .env("LORAPLEX_PLUGIN_DIST", common::dist_dir())
        .current_dir(&dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run schemathesis");
    let took = t.elapsed().as_secs_f64();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    let status = out.status;
    let (findings, tool_errors) = classify(&report);

    // Per operation: requests, 2xx, 4xx, 5xx.
    let text = std::fs::read_to_string(&stats).unwrap_or_default();
    let mut ops: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    // schemathesis leaves out the document it reads.
    for route in loraplex::api::routes::ROUTES
        .iter()
        .filter(|r| r.path != "/openapi.json")
    {
        ops.insert(
            format!("{} {}", route.verb.as_str().to_uppercase(), route.path),
            [0; 4],
        );
    }
    for line in text.lines() {
        let Some((op, code)) = line.rsplit_once(' ') else {
            continue;
        };
        let code: u16 = code.parse().unwrap_or(0);
        let e = ops.entry(op.to_owned()).or_default();
        e[0] += 1;
        match code {
            200..=299 => e[1] += 1,
            400..=499 => e[2] += 1,
            500..=599 => e[3] += 1,
            _ => {}
        }
    }
    eprintln!(
        "{:<72} {:>8} {:>6} {:>6} {:>4}",
        "operation", "requests", "2xx", "4xx", "5xx"
    );
    for (op, [n, ok, user, server]) in &ops {
        eprintln!("{op:<72} {n:>8} {ok:>6} {user:>6} {server:>4}");
    }
    let total: u64 = ops.values().map(|v| v[0]).sum();
    let covered = ops.values().filter(|v| v[0] > 0).count();
    let with_2xx = ops.values().filter(|v| v[1] > 0).count();
    eprintln!(
        "schemathesis: {total} requests in {took:.0} s (seed {seed}), {covered} of {} operations \
         reached, {with_2xx} with a 2xx answer; schemathesis {status}",
        ops.len()
    );

    let alive = server.0.try_wait().expect("wait on the server").is_none();
    let metrics = get(port, "/metrics").unwrap_or_default();
    let errors = server_errors(&metrics);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        alive,
        "the server died during the fuzzing run (see its log above)"
    );
    assert!(
        metrics.contains("loraplex_http_requests_total"),
        "no metrics from the server:\n{metrics}"
    );
    assert!(
        errors.is_empty(),
        "the server answered with 5xx:\n{}",
        errors.join("\n")
    );
    for op in &tool_errors {
        eprintln!("schemathesis failed inside its own data generation for {op} (hypothesis FlakyFailure); not a finding about the server");
    }
    assert!(
        status.success() || (findings.is_empty() && !tool_errors.is_empty()),
        "schemathesis found failures ({status}): {findings:?}"
    );
    assert_eq!(covered, ops.len(), "operations never requested");
    assert!(
        with_2xx * 4 >= ops.len() * 3,
        "only {with_2xx} of {} operations got a 2xx answer",
        ops.len()
    );
}

/// Split schemathesis's report into findings (every FAILURES entry, and every ERRORS entry
/// but one kind) and its own generation crashes: a `Runtime Error` that is Hypothesis's
/// `FlakyFailure` while drawing a test case, raised in schemathesis's coverage phase with
/// two workers (seen once in CI, seed 103712310, not reproducible with the same seed). Such
/// an entry sent no request, so it says nothing about the server; network errors and
/// timeouts stay findings.
fn classify(report: &str) -> (Vec<String>, Vec<String>) {
    let mut findings = Vec::new();
    let mut tool = Vec::new();
    let mut section = "";
    let mut entry: Option<(String, String)> = None;
    let mut flush = |section: &str, entry: Option<(String, String)>| {
        if let Some((op, body)) = entry {
            let generation_crash = section == "ERRORS"
                && body.contains("Runtime Error")
                && body.contains("hypothesis.errors.FlakyFailure")
                && !body.contains("Network Error")
                && !body.contains("timed out");
            if generation_crash {
                tool.push(op);
            } else {
                findings.push(format!("{section}: {op}"));
            }
        }
    };
    for line in report.lines() {
        let t = line.trim();
        if t.starts_with("====") && t.ends_with("====") {
            flush(section, entry.take());
            section = t.trim_matches('=').trim();
            section = match section {
                "ERRORS" => "ERRORS",
                "FAILURES" => "FAILURES",
                _ => "",
            };
        } else if t.starts_with("____") && t.ends_with("____") && !section.is_empty() {
            flush(section, entry.take());
            entry = Some((t.trim_matches('_').trim().to_owned(), String::new()));
        } else if let Some((_, body)) = entry.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(section, entry.take());
    (findings, tool)
}

#[test]
fn a_generation_crash_is_told_apart_from_a_finding() {
    let crash = "==== ERRORS ====\n____ POST /api/v1/asample ____\nRuntime Error\nInconsistent results\n  | hypothesis.errors.FlakyFailure: x\n==== SUMMARY ====\n";
    assert_eq!(
        classify(crash),
        (vec![], vec!["POST /api/v1/asample".to_owned()])
    );
    let timeout = "==== ERRORS ====\n____ POST /a ____\nNetwork Error\nRead timed out\n";
    assert_eq!(classify(timeout).0, vec!["ERRORS: POST /a".to_owned()]);
    let failure = "==== FAILURES ====\n____ GET /b ____\n1. Undocumented HTTP status code\n==== ERRORS ====\n____ POST /c ____\nRuntime Error\nhypothesis.errors.FlakyFailure\n";
    let (f, t) = classify(failure);
    assert_eq!(f, vec!["FAILURES: GET /b".to_owned()]);
    assert_eq!(t, vec!["POST /c".to_owned()]);
}

/// A seed that differs between runs (printed, so a failure can be replayed).
fn rand_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(1)
}

/// What the fuzzer found first: on a server with its database, setting a checkpoint's time
/// to live or deleting it panicked (database work blocked a tokio worker), and a time to
/// live past the clock's range overflowed. Each is now an answer.
#[test]
fn checkpoint_ttl_and_delete_answer_on_a_durable_server() {
    use common::server::http;
    use serde_json::{json, Value};
    let dir = std::env::temp_dir().join(format!("loraplex-fuzz-ttl-{}", std::process::id()));
    let (_server, port) = start_server_with(&dir, &[]);
    let key = "tml-ttl";
    let post = |path: &str, v: Value| -> (u16, Value) {
        let (status, _, body) = http(
            port,
            "POST",
            path,
            key,
            "application/json",
            v.to_string().as_bytes(),
        );
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    };
    let wait = |id: &Value| {
        for _ in 0..600 {
            let (_, v) = post("/api/v1/retrieve_future", json!({ "request_id": id }));
            if v["type"] != "try_again" {
                assert!(v.get("error").is_none(), "{v}");
                return;
            }
        }
        panic!("future {id} never finished");
    };
    let (_, v) = post("/api/v1/create_session", json!({}));
    let session = v["session_id"].clone();
    let (_, v) = post(
        "/api/v1/create_model",
        json!({"session_id": session, "model_seq_id": 0,
               "base_model": loraplex::config::DEFAULT_MODEL_NAME,
               "lora_config": {"rank": 1, "train_unembed": false}}),
    );
    wait(&v["request_id"]);
    let model = v["model_id"].as_str().expect("model_id").to_owned();
    let (status, v) = post(
        "/api/v1/save_weights",
        json!({"model_id": model, "path": "c1", "seq_id": 1}),
    );
    assert_eq!(status, 200, "{v}");
    wait(&v["request_id"]);
    let (status, v) = post(
        "/api/v1/save_weights",
        json!({"model_id": model, "path": "c2", "seq_id": 2, "ttl_seconds": u64::MAX}),
    );
    assert_eq!(status, 200, "{v}");
    let (_, v) = post(
        "/api/v1/retrieve_future",
        json!({"request_id": v["request_id"]}),
    );
    assert_eq!(v["category"], "user", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("ttl_seconds"),
        "{v}"
    );

    let ttl = format!("/api/v1/training_runs/{model}/checkpoints/weights/c1/ttl");
    let put = |body: Value| {
        let (status, _, b) = http(
            port,
            "PUT",
            &ttl,
            key,
            "application/json",
            body.to_string().as_bytes(),
        );
        (status, String::from_utf8_lossy(&b).to_string())
    };
    assert_eq!(put(json!({"ttl_seconds": 3600})).0, 200);
    assert_eq!(put(json!({"ttl_seconds": null})).0, 200);
    let (status, text) = put(json!({ "ttl_seconds": u64::MAX }));
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("ttl_seconds") && text.contains("limit"),
        "{text}"
    );

    let path = format!("/api/v1/training_runs/{model}/checkpoints/weights/c1");
    let (status, _, b) = http(port, "DELETE", &path, key, "application/json", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    let (status, _, _) = http(port, "DELETE", &path, key, "application/json", b"");
    assert_eq!(status, 404, "deleted once");
    let _ = std::fs::remove_dir_all(&dir);
}
