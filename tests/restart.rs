//! Durable state through a real crash: a `loraplex serve` process is killed with SIGKILL
//! while a request is in flight and restarted on the same data directory. The client finds
//! its model at its step count, giving the same forward-pass loss as before the kill; its
//! finished futures are still retrievable; the interrupted one fails with category server
//! and says the server restarted; the explicit checkpoint, the session and the uploaded
//! plugin are back; and a deleted model's files are gone.

mod common;

use common::server::{http, start_server};
use common::wire::{datum, fb, get, post, retrieve, KEY, SEQ};
use loraplex::api::proto;
use prost::Message;
use serde_json::{json, Value};

fn loss_of(bytes: Vec<u8>) -> f64 {
    proto::ForwardBackwardOutput::decode(&*bytes)
        .expect("proto")
        .metrics["loss:sum"]
}

#[test]
fn a_killed_server_comes_back_with_models_checkpoints_and_futures() {
    let dir = std::env::temp_dir().join(format!("loraplex-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut server, port) = start_server(&dir);

    let (_, s) = post(
        port,
        "/api/v1/create_session",
        json!({"sdk_version": "0.38.0"}),
    );
    let session = s["session_id"].as_str().unwrap().to_owned();
    let (_, c) = post(
        port,
        "/api/v1/create_model",
        json!({"session_id": session, "model_seq_id": 0,
        "base_model": loraplex::config::DEFAULT_MODEL_NAME, "lora_config": {"rank": 4}}),
    );
    let model = retrieve(port, c["request_id"].as_str().unwrap()).unwrap()["model_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Two steps of training.
    for (fb_seq, opt_seq) in [(1, 2), (3, 4)] {
        retrieve(port, &fb(port, &model, fb_seq, false, vec![datum(12)])).unwrap_err();
        let (_, o) = post(
            port,
            "/api/v1/optim_step",
            json!({"model_id": model, "seq_id": opt_seq,
            "adam_params": {"learning_rate": 0.003}}),
        );
        retrieve(port, o["request_id"].as_str().unwrap()).unwrap();
    }
    let fwd_future = fb(port, &model, 5, true, vec![datum(12)]);
    let before = loss_of(retrieve(port, &fwd_future).unwrap_err());
    let (_, sv) = post(
        port,
        "/api/v1/save_weights",
        json!({"model_id": model, "path": "c1", "seq_id": 6}),
    );
    let ckpt = retrieve(port, sv.json_id()).unwrap()["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _, b) = http(
        port,
        "POST",
        "/api/v1/plugins",
        KEY,
        "application/wasm",
        &common::component("ppo-clip"),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let plugin: Value = serde_json::from_slice(&b).unwrap();
    // A second model, deleted before the crash: its files must go.
    let (_, add) = post(port, "/add_lora", json!({"rank": 2}));
    let doomed = add["model_id"].as_str().unwrap().to_owned();
    assert_eq!(
        post(
            port,
            "/api/v1/save_weights",
            json!({"model_id": doomed, "path": "x", "seq_id": 0})
        )
        .0,
        200
    );
    let doomed_dir = dir
        .join("checkpoints")
        .join(format!("dev-{}", &hex_key()[..16]))
        .join(&doomed);
    wait_for(|| doomed_dir.join("weights/x").exists());
    assert_eq!(
        post(port, "/remove_lora", json!({"model_id": doomed})).0,
        200
    );
    assert!(!doomed_dir.exists(), "a deleted model's files go");

    // A long request in flight, then SIGKILL.
    let interrupted = fb(port, &model, 7, false, (0..8).map(|_| datum(256)).collect());
    server.0.kill().expect("SIGKILL");
    let _ = server.0.wait();
    drop(server);

    let (_server, port) = start_server(&dir);
    let (s, run) = get(port, &format!("/api/v1/training_runs/{model}"));
    assert_eq!(s, 200, "{run}");
    assert_eq!(run["step"], 2, "the model is back at its step count: {run}");
    // Finished futures are still there; the interrupted one failed, and says why.
    assert!((loss_of(retrieve(port, &fwd_future).unwrap_err()) - before).abs() < 1e-9);
    let f = retrieve(port, &interrupted).unwrap();
    assert_eq!(f["category"], "server", "{f}");
    assert!(f["error"].as_str().unwrap().contains("restarted"), "{f}");
    // Same weights: the same forward loss. The model takes the next seq_id it is sent.
    let after = loss_of(retrieve(port, &fb(port, &model, 8, true, vec![datum(12)])).unwrap_err());
    assert!(
        (after - before).abs() < 1e-4,
        "loss after restart {after} vs before {before}"
    );
    // The explicit checkpoint loads into a new model of the restored session.
    let (_, cks) = get(port, &format!("/api/v1/training_runs/{model}/checkpoints"));
    assert_eq!(cks["checkpoints"][0]["tinker_path"], json!(ckpt), "{cks}");
    let (s, lw) = post(
        port,
        "/api/v1/load_weights",
        json!({"session_id": session, "model_seq_id": 1,
        "path": ckpt, "optimizer": true}),
    );
    assert_eq!(s, 200, "{lw}");
    retrieve(port, lw["request_id"].as_str().unwrap()).unwrap();
    let m2 = lw["model_id"].as_str().unwrap().to_owned();
    let l2 = loss_of(retrieve(port, &fb(port, &m2, 1, true, vec![datum(12)])).unwrap_err());
    assert!(
        (l2 - before).abs() < 1e-4,
        "checkpoint loss {l2} vs {before}"
    );
    // The session and the plugin came back.
    assert_eq!(
        post(
            port,
            "/api/v1/session_heartbeat",
            json!({"session_id": session})
        )
        .0,
        200
    );
    let (_, pl) = get(port, "/api/v1/plugins");
    assert_eq!(pl["plugins"][0]["plugin_id"], plugin["plugin_id"], "{pl}");
    // Only the newest automatic checkpoint is kept.
    let model_dir = dir
        .join("checkpoints")
        .join(format!("dev-{}", &hex_key()[..16]))
        .join(model.replace(':', "."))
        .join("weights");
    let autos: Vec<_> = std::fs::read_dir(&model_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("auto-"))
        .collect();
    assert_eq!(
        autos.len(),
        1,
        "{:?}",
        autos.iter().map(|e| e.file_name()).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

trait JsonId {
    fn json_id(&self) -> &str;
}

impl JsonId for Value {
    fn json_id(&self) -> &str {
        self["request_id"].as_str().expect("request id")
    }
}

/// The development-mode tenant id of [`KEY`] is `dev-` and the hex sha256 of the key.
fn hex_key() -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(KEY.as_bytes()))
}

fn wait_for(cond: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed().as_secs() < 60, "condition not met in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Poll a REST future (`/retrieve_future`: 202 while pending) to its JSON answer.
fn rest_result(port: u16, id: &str) -> Value {
    loop {
        let (s, v) = post(port, "/retrieve_future", json!({"request_id": id}));
        match s {
            200 => return v,
            202 => continue,
            _ => panic!("future {id}: {s} {v}"),
        }
    }
}

/// A sample with `prompt_logprobs_last_n` and a REST `/fwdbwd` (mean loss per trained
/// token) render byte for byte the same after the server restarts: what rendering needs is
/// stored with the result, not kept beside it in memory.
#[test]
fn results_read_after_a_restart_render_as_before() {
    let dir = std::env::temp_dir().join(format!("loraplex-rerender-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut server, port) = start_server(&dir);

    let (_, s) = post(port, "/api/v1/create_session", json!({}));
    let session = s["session_id"].as_str().unwrap().to_owned();
    let (_, sc) = post(
        port,
        "/api/v1/create_sampling_session",
        json!({"session_id": session, "sampling_session_seq_id": 0,
               "base_model": loraplex::config::DEFAULT_MODEL_NAME}),
    );
    let sid = sc["sampling_session_id"].as_str().unwrap().to_owned();
    let (st, a) = post(
        port,
        "/api/v1/asample",
        json!({"sampling_session_id": sid, "seq_id": 0, "num_samples": 2,
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": SEQ[..8]}]},
               "sampling_params": {"max_tokens": 3, "temperature": 0.0},
               "prompt_logprobs": true, "prompt_logprobs_last_n": 3}),
    );
    assert_eq!(st, 200, "{a}");
    let sample = a.json_id().to_owned();
    let before_sample = retrieve(port, &sample).unwrap_err();
    let decoded = proto::SampleResponse::decode(&*before_sample).expect("SampleResponse");
    let plp = proto::read_f32("p", decoded.prompt_logprobs.as_ref().unwrap()).unwrap();
    assert_eq!(plp.len(), 8);
    assert!(plp[..5].iter().all(|x| x.is_nan()), "{plp:?}");
    assert!(plp[5..].iter().all(|x| x.is_finite()), "{plp:?}");

    let (_, add) = post(port, "/add_lora", json!({"rank": 2}));
    let model = add["model_id"].as_str().unwrap().to_owned();
    rest_result(port, add.json_id());
    let conv = json!([[{"role": "user", "content": "What colour is the sky?"},
                       {"role": "assistant", "content": "The sky is blue."}]]);
    let (st, f) = post(port, "/fwdbwd", json!({"model_id": model, "data": conv}));
    assert_eq!(st, 200, "{f}");
    let fwdbwd = f.json_id().to_owned();
    let before_fwdbwd = rest_result(port, &fwdbwd);
    let tokens = before_fwdbwd["num_tokens"].as_f64().unwrap();
    assert!(tokens > 0.0, "{before_fwdbwd}");
    let (loss, sum) = (
        before_fwdbwd["loss"].as_f64().unwrap(),
        before_fwdbwd["loss_sum"].as_f64().unwrap(),
    );
    assert!((loss * tokens - sum).abs() < 1e-9 * sum.abs().max(1.0));

    // Outcomes are written behind; give the writer a moment, then crash.
    std::thread::sleep(std::time::Duration::from_millis(500));
    server.0.kill().expect("SIGKILL");
    let _ = server.0.wait();
    drop(server);

    let (_server, port) = start_server(&dir);
    assert_eq!(
        retrieve(port, &sample).unwrap_err(),
        before_sample,
        "the sample renders byte for byte as before"
    );
    assert_eq!(rest_result(port, &fwdbwd), before_fwdbwd);
    let _ = std::fs::remove_dir_all(&dir);
}
