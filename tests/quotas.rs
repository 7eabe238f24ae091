//! Per-tenant quotas and rate limits as a tenant meets them, on the shipped SmolLM2 through
//! the in-process router: each hard quota refuses at its limit with a 403 whose JSON names
//! the quota and its limit (a checkpoint save over its quota fails its future instead, and
//! writes nothing); going over the request rate or the queued-jobs quota is a 429 with
//! Retry-After; `GET /api/v1/usage` reports the numbers, also after a restart; and one
//! tenant at its limits neither blocks nor slows another.

mod common;

use axum::http::{Method, StatusCode};
use axum::Router;
use common::http::{call, get, post, Resp};
use loraplex::api::Shared;
use loraplex::config::{EngineConfig, ModelArgs, QuotaConfig, ServeConfig};
use loraplex::jobs::{Engine, TenantId};
use loraplex::quota::{Limits, Quota};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const A: &str = "tml-quota-alice";
const B: &str = "tml-quota-bob";
const MODEL: &str = loraplex::config::DEFAULT_MODEL_NAME;

fn temp_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "loraplex-quotas-{tag}-{}-{}",
        std::process::id(),
        loraplex::jobs::FutureId::generate()
    ))
}

/// An in-memory server whose engine runs with `cfg` (quotas included).
fn app(cfg: EngineConfig) -> (Router, Shared) {
    let engine = Engine::with_model(cfg, common::http::smollm2_arc()).expect("engine");
    common::http::app_on(engine, |_| {})
}

fn tenant(s: &Shared, key: &str) -> TenantId {
    s.auth.tenant(key).expect("tenant")
}

/// Give one tenant its own limits, the others keep the defaults.
fn set_limits(s: &Shared, key: &str, f: impl FnOnce(&mut Limits)) {
    let t = tenant(s, key);
    let mut l = s.engine.quotas().limits(&t);
    f(&mut l);
    s.engine
        .quotas()
        .set_overrides([(t, l)].into_iter().collect());
}

async fn usage(app: &Router, key: &str) -> Value {
    get(app, "/api/v1/usage", key).await.ok()
}

/// Long-poll a Tinker future to its end; its JSON (a failure is `{error, category}`).
async fn retrieve(app: &Router, key: &str, id: &str) -> Value {
    for _ in 0..100 {
        let v = post(
            app,
            "/api/v1/retrieve_future",
            key,
            json!({"request_id": id}),
        )
        .await
        .ok();
        if v["type"] != "try_again" {
            return v;
        }
    }
    panic!("future {id} never finished");
}

async fn session(app: &Router, key: &str) -> String {
    post(app, "/api/v1/create_session", key, json!({}))
        .await
        .ok()["session_id"]
        .as_str()
        .expect("session id")
        .to_owned()
}

fn create_model_body(session: &str, n: u64) -> Value {
    json!({"session_id": session, "model_seq_id": n, "base_model": MODEL,
           "lora_config": {"rank": 2, "train_mlp": false, "train_attn": true, "train_unembed": false}})
}

/// A Tinker training run in `session`; its model id.
async fn tinker_model(app: &Router, key: &str, session: &str, n: u64) -> String {
    let f = post(
        app,
        "/api/v1/create_model",
        key,
        create_model_body(session, n),
    )
    .await
    .ok();
    let r = retrieve(app, key, f["request_id"].as_str().unwrap()).await;
    r["model_id"].as_str().expect("model id").to_owned()
}

async fn add_lora(app: &Router, key: &str) -> Resp {
    post(
        app,
        "/add_lora",
        key,
        json!({"base_model": MODEL, "rank": 2}),
    )
    .await
}

/// Save a checkpoint of `model` at `seq`; the future's JSON.
async fn save(app: &Router, key: &str, model: &str, name: &str, seq: i64) -> Value {
    let f = post(
        app,
        "/api/v1/save_weights",
        key,
        json!({"model_id": model, "path": name, "seq_id": seq, "overwrite": true}),
    )
    .await
    .ok();
    retrieve(app, key, f["request_id"].as_str().unwrap()).await
}

async fn upload(app: &Router, key: &str, bytes: Vec<u8>) -> Resp {
    call(
        app,
        Method::POST,
        "/api/v1/plugins",
        Some(key),
        "application/wasm",
        bytes,
    )
    .await
}

fn used(u: &Value, q: &str) -> (u64, u64) {
    (
        u[q]["used"]
            .as_u64()
            .unwrap_or_else(|| panic!("{q} in {u}")),
        u[q]["limit"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hard_quota_refuses_at_its_limit_with_a_403_naming_it() {
    let (app, s) = app(EngineConfig::default());
    set_limits(&s, A, |l| {
        l.set(Quota::TrainingRuns, 2);
        l.set(Quota::SamplingSessions, 2);
        l.set(Quota::Plugins, 1);
    });

    // Training runs: REST and Tinker creates, and load_weights as a create.
    let sess = session(&app, A).await;
    let m0 = tinker_model(&app, A, &sess, 0).await;
    let rest = add_lora(&app, A).await.ok()["model_id"]
        .as_str()
        .unwrap()
        .to_owned();
    add_lora(&app, A)
        .await
        .assert_quota(403, "quota_exceeded", "training_runs", 2);
    post(&app, "/api/v1/create_model", A, create_model_body(&sess, 1))
        .await
        .assert_quota(403, "quota_exceeded", "training_runs", 2);
    let c1 = save(&app, A, &m0, "c1", 1).await;
    let path = c1["path"].as_str().expect("saved").to_owned();
    let load = json!({"session_id": sess, "model_seq_id": 2, "path": path});
    post(&app, "/api/v1/load_weights", A, load.clone())
        .await
        .assert_quota(403, "quota_exceeded", "training_runs", 2);
    // Bob is not touched by Alice's limit, nor by the defaults.
    add_lora(&app, B).await.ok();
    // Freeing a run frees its place.
    post(&app, "/remove_lora", A, json!({"model_id": rest}))
        .await
        .ok();
    let f = post(&app, "/api/v1/load_weights", A, load).await.ok();
    assert_eq!(
        retrieve(&app, A, f["request_id"].as_str().unwrap()).await["type"],
        "load_weights"
    );
    assert_eq!(used(&usage(&app, A).await, "training_runs"), (2, 2));

    // Sampling sessions: create_sampling_session, then an ephemeral one through
    // save_weights_for_sampler, whose future fails with category user.
    for n in 0..2 {
        post(
            &app,
            "/api/v1/create_sampling_session",
            A,
            json!({"session_id": sess, "sampling_session_seq_id": n, "base_model": MODEL}),
        )
        .await
        .ok();
    }
    post(
        &app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": sess, "sampling_session_seq_id": 2, "model_path": path}),
    )
    .await
    .assert_quota(403, "quota_exceeded", "sampling_sessions", 2);
    let f = post(
        &app,
        "/api/v1/save_weights_for_sampler",
        A,
        json!({"model_id": m0, "seq_id": 2, "sampling_session_seq_id": 3}),
    )
    .await
    .ok();
    let failed = retrieve(&app, A, f["request_id"].as_str().unwrap()).await;
    assert_eq!(failed["category"], "user", "{failed}");
    let msg = failed["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("sampling_sessions") && msg.contains("limited to 2 "),
        "{msg}"
    );

    // Checkpoint bytes: a save over the quota fails its future, names the quota, and
    // leaves no checkpoint; replacing a checkpoint costs only the difference.
    let u = usage(&app, A).await;
    let one = used(&u, "checkpoint_bytes").0;
    assert!(one > 0, "{u}");
    let limit = one + one / 2;
    set_limits(&s, A, |l| {
        l.set(Quota::TrainingRuns, 2);
        l.set(Quota::SamplingSessions, 2);
        l.set(Quota::Plugins, 1);
        l.set(Quota::CheckpointBytes, limit);
    });
    let over = save(&app, A, &m0, "c2", 3).await;
    assert_eq!(over["category"], "user", "{over}");
    let msg = over["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("checkpoint_bytes") && msg.contains(&format!("limited to {limit} ")),
        "{msg}"
    );
    let listed = get(&app, &format!("/api/v1/training_runs/{m0}/checkpoints"), A)
        .await
        .ok();
    let names: Vec<&str> = listed["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["checkpoint_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["weights/c1"]);
    assert!(save(&app, A, &m0, "c1", 4).await["path"].is_string());
    assert_eq!(
        used(&usage(&app, A).await, "checkpoint_bytes"),
        (one, limit)
    );

    // Plugins: count, then bytes. Uploading one it owns already costs nothing.
    let ppo = common::component("ppo-clip");
    let dro = common::component("dro");
    upload(&app, A, ppo.clone()).await.ok();
    upload(&app, A, dro.clone())
        .await
        .assert_quota(403, "quota_exceeded", "plugins", 1);
    upload(&app, A, ppo.clone()).await.ok();
    let cap = ppo.len() as u64 + 1;
    set_limits(&s, A, |l| {
        l.set(Quota::Plugins, 10);
        l.set(Quota::PluginBytes, cap);
    });
    upload(&app, A, dro)
        .await
        .assert_quota(403, "quota_exceeded", "plugin_bytes", cap);

    // The usage route, for both tenants.
    let u = usage(&app, A).await;
    assert_eq!(u["tenant"], tenant(&s, A).0);
    assert_eq!(used(&u, "training_runs").0, 2);
    assert_eq!(used(&u, "sampling_sessions").0, 2);
    assert_eq!(used(&u, "queued_jobs").0, 0);
    assert_eq!(used(&u, "plugins"), (1, 10));
    assert_eq!(used(&u, "plugin_bytes"), (ppo.len() as u64, cap));
    let d = QuotaConfig::default();
    let ub = usage(&app, B).await;
    assert_eq!(used(&ub, "training_runs"), (1, d.training_runs));
    assert_eq!(used(&ub, "plugins"), (0, d.plugins));
    assert_eq!(used(&ub, "checkpoint_bytes"), (0, d.checkpoint_bytes));
    assert_eq!(
        ub["requests_per_second"]["limit"].as_u64(),
        Some(d.requests_per_second)
    );
}

/// Alice's training run waits for a seq_id that never comes, so her jobs stay queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_over_the_quota_are_a_429_and_another_tenant_goes_on() {
    let (app, _s) = app(EngineConfig {
        seq_timeout_ms: 3_000,
        quotas: QuotaConfig {
            queued_jobs: 3,
            ..QuotaConfig::default()
        },
        ..EngineConfig::default()
    });
    let sess = session(&app, A).await;
    let m = tinker_model(&app, A, &sess, 0).await;
    let step =
        |seq: i64| json!({"model_id": m, "seq_id": seq, "adam_params": {"learning_rate": 1e-4}});
    // seq 1 is missing: 2, 3, 4 wait for it.
    for seq in 2..5 {
        post(&app, "/api/v1/optim_step", A, step(seq)).await.ok();
    }
    post(&app, "/api/v1/optim_step", A, step(5))
        .await
        .assert_quota(429, "rate_limited", "queued_jobs", 3);
    add_lora(&app, A)
        .await
        .assert_quota(429, "rate_limited", "queued_jobs", 3);
    assert_eq!(used(&usage(&app, A).await, "queued_jobs"), (3, 3));

    // Bob trains and samples meanwhile, Alice hammering at her limit all along.
    let hammer = {
        let app = app.clone();
        let step5 = step(5);
        tokio::spawn(async move {
            let mut refused = 0;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                let r = post(&app, "/api/v1/optim_step", A, step5.clone()).await;
                refused += usize::from(r.status == StatusCode::TOO_MANY_REQUESTS);
                // Under her request rate: what refuses her is the queued-jobs quota.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            refused
        })
    };
    let t = Instant::now();
    let bm = add_lora(&app, B).await.ok()["model_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let conv = json!([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]]);
    let fb = post(&app, "/fwdbwd", B, json!({"model_id": bm, "data": conv}))
        .await
        .ok();
    let id = fb["request_id"].as_str().unwrap().to_owned();
    let done = loop {
        let r = post(&app, "/retrieve_future", B, json!({"request_id": id})).await;
        if r.status == StatusCode::OK {
            break r.json();
        }
        assert_eq!(r.status, StatusCode::ACCEPTED);
    };
    assert!(done["loss"].as_f64().is_some_and(f64::is_finite), "{done}");
    let sampled = post(
        &app,
        "/api/v1/sample",
        B,
        json!({"model_id": bm, "prompts": ["Hi"], "sampling_params": {"max_tokens": 2}}),
    )
    .await
    .ok();
    assert_eq!(sampled["generated_text"].as_array().map(Vec::len), Some(1));
    // Generous: a train step and a short sample of a 135M model on a busy CI machine.
    assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
    assert!(hammer.await.unwrap() > 0, "Alice stayed at her limit");

    // Once her jobs end (the missing seq_id times out), Alice is admitted again.
    let t = Instant::now();
    while used(&usage(&app, A).await, "queued_jobs").0 > 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "jobs never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    add_lora(&app, A).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_is_a_429_with_retry_after_and_spares_other_tenants() {
    // Everyone but Alice refills at once, so idle buckets are full as soon as they exist.
    let (app, s) = app(EngineConfig {
        quotas: QuotaConfig {
            requests_per_second: 1_000_000,
            request_burst: 2,
            ..QuotaConfig::default()
        },
        ..EngineConfig::default()
    });
    set_limits(&s, A, |l| {
        l.set(Quota::RequestsPerSecond, 2);
        l.set(Quota::RequestBurst, 5);
    });
    for _ in 0..5 {
        get(&app, "/api/v1/usage", A).await.ok();
    }
    let r = get(&app, "/api/v1/usage", A).await;
    r.assert_quota(429, "rate_limited", "requests_per_second", 2);
    assert_eq!(r.json()["error"]["type"], "rate_limited");

    // Bob's requests while Alice floods: all answered, and quickly.
    let flood = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut n429 = 0;
            for _ in 0..2_000 {
                let r = get(&app, "/api/v1/sessions", A).await;
                n429 += usize::from(r.status == StatusCode::TOO_MANY_REQUESTS);
            }
            n429
        })
    };
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        get(&app, "/api/v1/sessions", B).await.ok();
        worst = worst.max(t.elapsed());
    }
    let n429 = flood.await.unwrap();
    assert!(n429 > 1_900, "Alice was limited: {n429} refusals of 2000");
    assert!(
        worst < Duration::from_secs(1),
        "Bob's slowest request: {worst:?}"
    );

    // The bucket refills: after Retry-After, Alice is served again.
    let wait: u64 = r.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(wait.max(600))).await;
    get(&app, "/api/v1/usage", A).await.ok();

    // Development mode makes every key a tenant: the buckets stay bounded.
    for i in 0..3_000 {
        get(&app, "/api/v1/sessions", &format!("tml-many-{i}"))
            .await
            .ok();
    }
    let held = s.engine.quotas().buckets_held();
    assert!(held <= 1_024 + 256, "{held} buckets for 3000 keys");
}

/// A real server's data directory: the usage a tenant reads is the same after a restart,
/// and a refused checkpoint left no files. Limits come from the keys file.
#[test]
fn usage_is_right_after_a_restart_and_a_refused_save_writes_nothing() {
    let dir = temp_dir("restart");
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(
        &keys,
        format!("{A} alice training_runs=3 plugins=2\n{B} bob\n"),
    )
    .unwrap();
    let serve = {
        let mut c = ServeConfig::for_tests(dir.join("data"));
        c.keys_file = Some(keys);
        c.long_poll_ms = 2_000;
        c
    };
    let model_args = ModelArgs {
        model_path: common::model_path(),
        model_name: MODEL.into(),
        base_dtype: Default::default(),
    };
    let run = |phase: u8| {
        let (serve, model_args) = (serve.clone(), model_args.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let out = rt.block_on(async move {
                let (_, app) = loraplex::api::build(serve, model_args, EngineConfig::default())
                    .await
                    .expect("build");
                if phase == 0 {
                    let sess = session(&app, A).await;
                    let m = tinker_model(&app, A, &sess, 0).await;
                    add_lora(&app, A).await.ok();
                    assert!(save(&app, A, &m, "kept", 1).await["path"].is_string());
                    upload(&app, A, common::component("ppo-clip")).await.ok();
                }
                usage(&app, A).await
            });
            // The server stops with its runtime, as a process would at exit.
            rt.shutdown_timeout(Duration::from_secs(5));
            out
        })
        .join()
        .expect("phase")
    };
    let before = run(0);
    assert_eq!(used(&before, "training_runs"), (2, 3));
    assert_eq!(used(&before, "plugins"), (1, 2));
    let ck = used(&before, "checkpoint_bytes").0;
    assert!(ck > 0);
    let after = run(1);
    for q in [
        "training_runs",
        "checkpoint_bytes",
        "plugins",
        "plugin_bytes",
        "queued_jobs",
    ] {
        assert_eq!(
            used(&after, q),
            used(&before, q),
            "{q}: {before} vs {after}"
        );
    }

    // Over the checkpoint quota: the save fails and no file of it exists.
    let mut serve2 = serve.clone();
    let keys2 = dir.join("keys2");
    std::fs::write(&keys2, format!("{A} alice checkpoint_bytes={ck}\n")).unwrap();
    serve2.keys_file = Some(keys2);
    let data = serve2.data_dir.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let (_, app) = loraplex::api::build(serve2, model_args, EngineConfig::default())
                .await
                .expect("build");
            let sess = session(&app, A).await;
            let m = tinker_model(&app, A, &sess, 0).await;
            let over = save(&app, A, &m, "refused", 1).await;
            assert_eq!(over["category"], "user", "{over}");
            assert!(over["error"]
                .as_str()
                .unwrap_or_default()
                .contains("checkpoint_bytes"));
        });
        rt.shutdown_timeout(Duration::from_secs(5));
    })
    .join()
    .expect("phase 2");
    assert!(
        !contains_name(&data.join("checkpoints"), "refused"),
        "a refused save left files"
    );
    assert!(contains_name(&data.join("checkpoints"), "kept"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn contains_name(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name().to_string_lossy().contains(needle)
                || (e.path().is_dir() && contains_name(&e.path(), needle))
        })
}
