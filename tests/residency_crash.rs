//! Residency through a real crash: a `loraplex serve` whose adapter memory holds two of
//! its four training runs (so every round of steps evicts and loads adapters) is killed
//! with SIGKILL while steps are in flight, and restarted on the same data directory. Every
//! run is back with every step that was acknowledged (an unacknowledged one may or may
//! not have landed), and trains on from there.

mod common;

use common::server::start_server_with;
use common::wire::{datum, fb, get, post, retrieve};
use serde_json::json;

fn optim(port: u16, model: &str, seq: i32) -> String {
    let (s, o) = post(
        port,
        "/api/v1/optim_step",
        json!({"model_id": model, "seq_id": seq, "adam_params": {"learning_rate": 0.003}}),
    );
    assert_eq!(s, 200, "{o}");
    o["request_id"].as_str().expect("request id").to_owned()
}

fn metric(port: u16, name: &str) -> f64 {
    let text = common::server::get(port, "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Two rank-4 adapters on all sites fit (about 19.6 MB each on SmolLM2), four do not.
const BUDGET: &str = "42MB";

#[test]
fn a_kill_while_adapters_are_evicted_and_loaded_loses_no_acknowledged_step() {
    let dir = std::env::temp_dir().join(format!("loraplex-res-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let env = [("LORAPLEX_ADAPTER_MEMORY", BUDGET)];
    let (mut server, port) = start_server_with(&dir, &env);
    let mut models = Vec::new();
    for _ in 0..4 {
        let (s, add) = post(port, "/add_lora", json!({"rank": 4}));
        assert_eq!(s, 200, "{add}");
        models.push(add["model_id"].as_str().unwrap().to_owned());
    }
    let mut seq = vec![0i32; models.len()];
    let mut acked = vec![0u64; models.len()];
    // Rounds of one acknowledged step per run: each round evicts and loads adapters.
    for _ in 0..2 {
        for (i, m) in models.iter().enumerate() {
            let f = fb(port, m, seq[i], false, vec![datum(12)]);
            let o = optim(port, m, seq[i] + 1);
            seq[i] += 2;
            retrieve(port, &f).unwrap_err();
            retrieve(port, &o).unwrap();
            acked[i] += 1;
        }
    }
    assert!(metric(port, "loraplex_adapter_evictions_total") > 0.0);
    assert!(metric(port, "loraplex_adapter_loads_total") >= 8.0);
    assert!(
        metric(port, "loraplex_resident_adapter_bytes") <= 42e6,
        "over the budget"
    );
    // A burst of steps on every run (loads and evictions under way), then SIGKILL.
    for (i, m) in models.iter().enumerate() {
        fb(port, m, seq[i], false, vec![datum(12)]);
        optim(port, m, seq[i] + 1);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    server.0.kill().expect("SIGKILL");
    let _ = server.0.wait();
    drop(server);

    let (_server, port) = start_server_with(&dir, &env);
    for (i, m) in models.iter().enumerate() {
        let (s, run) = get(port, &format!("/api/v1/training_runs/{m}"));
        assert_eq!(s, 200, "{run}");
        let listed = run["step"].as_u64().expect("step");
        assert!(
            listed >= acked[i],
            "run {m}: {} steps acknowledged, listed at {listed}",
            acked[i]
        );
        // It loads (cold after the restart) at its newest state and trains on from there.
        let f = fb(port, m, 1000, false, vec![datum(12)]);
        retrieve(port, &f).unwrap_err();
        retrieve(port, &optim(port, m, 1001)).unwrap();
        let (_, run) = get(port, &format!("/api/v1/training_runs/{m}"));
        let step = run["step"].as_u64().expect("step");
        assert!(
            step == acked[i] + 1 || step == acked[i] + 2,
            "run {m}: {} steps acknowledged before the kill, one after; at {step}",
            acked[i]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
