//! The web console's data, in process on SmolLM2 with a data directory: every
//! forward_backward and optim_step result lands in the run's metrics history (bounded,
//! surviving a restart, deleted with the run, another tenant's run is a 404).

mod common;

use axum::http::StatusCode;
use axum::Router;
use common::http::*;
use loraplex::api::Shared;
use loraplex::config::{EngineConfig, ModelArgs, ServeConfig, DEFAULT_MODEL_NAME};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "loraplex-console-{tag}-{}-{}",
        std::process::id(),
        loraplex::jobs::FutureId::generate()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server on a data directory, as `loraplex serve` builds it, on a runtime of its own so
/// that it can be dropped and built again (a restart).
struct Server {
    rt: tokio::runtime::Runtime,
    app: Router,
    state: Shared,
}

fn server(data: &Path, f: impl FnOnce(&mut ServeConfig)) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut serve = ServeConfig::for_tests(data.to_owned());
    serve.long_poll_ms = 2_000;
    f(&mut serve);
    let model = ModelArgs {
        model_path: common::model_path(),
        model_name: DEFAULT_MODEL_NAME.into(),
    };
    let (state, app) = rt
        .block_on(loraplex::api::build(serve, model, EngineConfig::default()))
        .expect("build");
    Server { rt, app, state }
}

/// Keys with tenants `alice` and `bob`.
const KEYS: &str = "tml-alice alice\ntml-bob bob\n";

fn keys_file(data: &Path) -> PathBuf {
    let p = data.join("keys.txt");
    std::fs::write(&p, KEYS).unwrap();
    p
}

/// The JSON result of a future submitted as `r`.
async fn done(app: &Router, key: &str, r: Resp) -> Value {
    let id = r.ok()["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    retrieve(app, key, &id).await.ok()
}

async fn new_run(app: &Router, key: &str, meta: Value) -> String {
    let s = post(
        app,
        "/api/v1/create_session",
        key,
        json!({"tags": [], "sdk_version": "0.38.0", "user_metadata": meta}),
    )
    .await
    .ok()["session_id"]
        .as_str()
        .expect("session id")
        .to_owned();
    let r = post(
        app,
        "/api/v1/create_model",
        key,
        json!({"session_id": s, "model_seq_id": 0, "base_model": DEFAULT_MODEL_NAME,
               "lora_config": {"rank": 2, "train_mlp": false, "train_attn": true, "train_unembed": false},
               "user_metadata": meta}),
    )
    .await;
    done(app, key, r).await["model_id"]
        .as_str()
        .expect("model id")
        .to_owned()
}

/// forward_backward at `seq` and optim_step at `seq + 1`; the forward_backward's loss:sum.
async fn train_step(app: &Router, key: &str, run: &str, seq: i32, lr: f64) -> f64 {
    let r = fb(
        app,
        key,
        run,
        seq,
        "cross_entropy",
        vec![ce_datum()],
        Default::default(),
    )
    .await;
    let loss = fb_result(app, key, &r).await.metrics["loss:sum"];
    let o = post(
        app,
        "/api/v1/optim_step",
        key,
        json!({"model_id": run, "seq_id": seq + 1, "adam_params": {"learning_rate": lr}}),
    )
    .await;
    done(app, key, o).await;
    loss
}

fn points(v: &Value) -> &Vec<Value> {
    v["points"].as_array().expect("points")
}

#[test]
fn every_training_result_is_kept_per_step_bounded_durable_and_private() {
    let data = temp_dir("history");
    let keys = keys_file(&data);
    let (run, losses) = {
        let s = server(&data, |c| {
            c.keys_file = Some(keys.clone());
            c.max_metric_points = 4;
        });
        let app = &s.app;
        s.rt.block_on(async {
            let run = new_run(app, "tml-alice", json!({"purpose": "curves"})).await;
            let mut losses = Vec::new();
            for i in 0..3 {
                losses.push(train_step(app, "tml-alice", &run, 1 + 2 * i, 0.01).await);
            }
            // The loss falls on a fixed sequence: the curve has something to show.
            assert!(losses[2] < losses[0], "{losses:?}");
            let h = get(
                app,
                &format!("/api/v1/training_runs/{run}/metrics"),
                "tml-alice",
            )
            .await
            .ok();
            assert_eq!(h["training_run_id"], run.as_str());
            // Six results, capped at the newest four: fb@1, optim→2, fb@2, optim→3.
            let p = points(&h);
            let shape: Vec<(u64, &str)> = p
                .iter()
                .map(|x| (x["step"].as_u64().unwrap(), x["kind"].as_str().unwrap()))
                .collect();
            assert_eq!(
                shape,
                [
                    (1, "forward_backward"),
                    (2, "optim_step"),
                    (2, "forward_backward"),
                    (3, "optim_step")
                ]
            );
            assert_eq!(p[0]["metrics"]["loss:sum"].as_f64(), Some(losses[1]));
            assert_eq!(p[2]["metrics"]["loss:sum"].as_f64(), Some(losses[2]));
            assert_eq!(p[2]["metrics"]["tokens"].as_f64(), Some(11.0));
            assert_eq!(p[2]["metrics"]["weight_sum"].as_f64(), Some(11.0));
            assert_eq!(p[1]["metrics"]["learning_rate"].as_f64(), Some(0.01));
            assert!(p[1]["metrics"]["grad_norm"].as_f64().unwrap() > 0.0);
            // By step range, and by pages that follow each other.
            let r = get(
                app,
                &format!("/api/v1/training_runs/{run}/metrics?from_step=2&to_step=2"),
                "tml-alice",
            )
            .await
            .ok();
            assert_eq!(points(&r).len(), 2);
            let page1 = get(
                app,
                &format!("/api/v1/training_runs/{run}/metrics?limit=3"),
                "tml-alice",
            )
            .await
            .ok();
            assert_eq!(points(&page1).len(), 3);
            let next = page1["next_after"]
                .as_i64()
                .expect("a full page has a next");
            let page2 = get(
                app,
                &format!("/api/v1/training_runs/{run}/metrics?limit=3&after={next}"),
                "tml-alice",
            )
            .await
            .ok();
            assert_eq!(points(&page2).len(), 1);
            assert_eq!(page2["next_after"], Value::Null);
            assert_eq!(points(&page2)[0], p[3]);
            // Bad ranges name the field.
            let bad = get(
                app,
                &format!("/api/v1/training_runs/{run}/metrics?limit=0"),
                "tml-alice",
            )
            .await;
            assert_eq!(bad.status, StatusCode::BAD_REQUEST);
            assert!(bad.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("limit"));
            // Another tenant's run is not found.
            let foreign = get(
                app,
                &format!("/api/v1/training_runs/{run}/metrics"),
                "tml-bob",
            )
            .await;
            assert_eq!(foreign.status, StatusCode::NOT_FOUND);
            (run, losses)
        })
    };
    // After a restart the history is still there.
    let s = server(&data, |c| c.keys_file = Some(keys.clone()));
    let app = &s.app;
    s.rt.block_on(async {
        let h = get(
            app,
            &format!("/api/v1/training_runs/{run}/metrics"),
            "tml-alice",
        )
        .await
        .ok();
        assert_eq!(points(&h).len(), 4);
        assert_eq!(
            points(&h)[2]["metrics"]["loss:sum"].as_f64(),
            Some(losses[2])
        );
        // Deleted with the run.
        post(app, "/remove_lora", "tml-alice", json!({"model_id": run}))
            .await
            .ok();
        let gone = get(
            app,
            &format!("/api/v1/training_runs/{run}/metrics"),
            "tml-alice",
        )
        .await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
        let d = s.state.durable.clone().expect("a store");
        let (t, m) = (
            loraplex::jobs::TenantId::from("alice"),
            loraplex::jobs::AdapterId(run.clone()),
        );
        let left = d
            .call(move |db| async move { db.count_metric_points(&t, &m).await })
            .await
            .unwrap();
        assert_eq!(left, 0);
    });
}
