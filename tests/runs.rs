//! Training runs and their checkpoints as a tenant manages them, in process on SmolLM2: a
//! run keeps its `user_metadata` and stays listable, describable and loadable after its
//! session ends and after a restart; checkpoints list newest first, expire (files and all),
//! can be published to other tenants read-only and copied; a checkpoint downloads as a
//! PEFT adapter through signed, expiring links that need no API key. Bad input is a 4xx
//! naming the field, and another tenant's things are 404.
//!
//! The same surface through the official SDK and the `tinker` CLI: tests/runs_cli.rs.

mod common;

use axum::http::{Method, StatusCode};
use axum::Router;
use common::http::durable_app as durable;
use common::http::*;
use loraplex::api::proto;
use loraplex::config::DEFAULT_MODEL_NAME;
use loraplex::jobs::AdapterId;
use loraplex::lora::Site;
use loraplex::store::peft::peft_tensor_name;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

async fn session(app: &Router, key: &str, meta: Value) -> String {
    post(
        app,
        "/api/v1/create_session",
        key,
        json!({"tags": [], "sdk_version": "0.38.0", "user_metadata": meta, "display_name": "runs test"}),
    )
    .await
    .ok()["session_id"]
        .as_str()
        .expect("session id")
        .to_owned()
}

/// The JSON result of a future submitted as `r`.
async fn done(app: &Router, key: &str, r: Resp) -> Value {
    let id = r.ok()["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    retrieve(app, key, &id).await.ok()
}

async fn create_model(app: &Router, key: &str, session: &str, n: u64, meta: Value) -> String {
    let r = post(
        app,
        "/api/v1/create_model",
        key,
        json!({"session_id": session, "model_seq_id": n, "base_model": DEFAULT_MODEL_NAME,
               "lora_config": {"rank": 2, "train_mlp": false, "train_attn": true, "train_unembed": false},
               "user_metadata": meta}),
    )
    .await;
    done(app, key, r).await["model_id"]
        .as_str()
        .expect("model id")
        .to_owned()
}

/// forward_backward + optim_step at seq and seq + 1.
async fn train_step(app: &Router, key: &str, model: &str, seq: i32) {
    let r = fb(
        app,
        key,
        model,
        seq,
        "cross_entropy",
        vec![ce_datum()],
        Default::default(),
    )
    .await;
    fb_result(app, key, &r).await;
    let o = post(
        app,
        "/api/v1/optim_step",
        key,
        json!({"model_id": model, "seq_id": seq + 1, "adam_params": {"learning_rate": 0.05}}),
    )
    .await;
    done(app, key, o).await;
}

/// The cross-entropy of the fixed sequence under `model` (a forward pass at `seq`).
async fn forward_loss(app: &Router, key: &str, model: &str, seq: i32) -> f64 {
    let req = proto::ForwardBackwardRequest {
        model_id: model.into(),
        seq_id: seq,
        data: vec![ce_datum()],
        loss_fn: "cross_entropy".into(),
        forward_only: true,
        ..Default::default()
    };
    let r = send_fb(app, key, &req).await;
    fb_result(app, key, &r).await.metrics["loss:sum"]
}

async fn save(app: &Router, key: &str, route: &str, model: &str, name: &str, seq: i64) -> String {
    let r = post(
        app,
        route,
        key,
        json!({"model_id": model, "path": name, "seq_id": seq}),
    )
    .await;
    done(app, key, r).await["path"]
        .as_str()
        .expect("path")
        .to_owned()
}

/// A new run `{session}:train:{n}` loaded from `path`; its id once the load is done.
async fn load_new(app: &Router, key: &str, session: &str, n: u64, path: &str, meta: Value) -> Resp {
    post(
        app,
        "/api/v1/load_weights",
        key,
        json!({"session_id": session, "model_seq_id": n, "path": path, "optimizer": true,
               "user_metadata": meta}),
    )
    .await
}

fn ids(list: &Value, field: &str, id: &str) -> Vec<String> {
    list[field]
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| c[id].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn runs_outlive_their_sessions_and_a_restart_with_their_metadata() {
    let data = temp_dir("outlive");
    let meta = json!({"renderer_name": "role_colon"});
    let (run, loss, weights_path, sampler_path, session_id) = {
        let d = durable(&data, |c| c.expiry_sweep_ms = 100);
        let app = &d.app;
        d.rt.block_on(async {
            let s = session(app, A, json!({"purpose": "nightly"})).await;
            let run = create_model(app, A, &s, 0, meta.clone()).await;
            // Described with its metadata while loaded.
            let r = get(app, &format!("/api/v1/training_runs/{run}"), A)
                .await
                .ok();
            assert_eq!(r["user_metadata"], meta);
            assert_eq!(r["lora_rank"], 2);
            train_step(app, A, &run, 1).await;
            let w = save(app, A, "/api/v1/save_weights", &run, "step-1", 3).await;
            let sp = save(app, A, "/api/v1/save_weights_for_sampler", &run, "s-1", 4).await;
            let short = save(app, A, "/api/v1/save_weights", &run, "short-lived", 5).await;
            let loss = forward_loss(app, A, &run, 6).await;
            // Newest first.
            let cks = get(app, &format!("/api/v1/training_runs/{run}/checkpoints"), A)
                .await
                .ok();
            assert_eq!(
                ids(&cks, "checkpoints", "tinker_path"),
                [short.as_str(), sp.as_str(), w.as_str()]
            );

            // A checkpoint past its time to live disappears, files and all.
            let ttl_path =
                format!("/api/v1/training_runs/{run}/checkpoints/weights/short-lived/ttl");
            call(
                app,
                Method::PUT,
                &ttl_path,
                Some(A),
                "application/json",
                json!({"ttl_seconds": 1}).to_string().into_bytes(),
            )
            .await
            .ok();
            let dir = checkpoint_dir(&data, &run, "weights", "short-lived");
            assert!(dir.is_dir(), "{}", dir.display());
            let t = Instant::now();
            while dir.exists() {
                assert!(t.elapsed() < Duration::from_secs(20), "expired files stay");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let cks = get(app, &format!("/api/v1/training_runs/{run}/checkpoints"), A)
                .await
                .ok();
            assert_eq!(
                ids(&cks, "checkpoints", "tinker_path"),
                [sp.as_str(), w.as_str()]
            );

            // The session ends: the run leaves memory, not the listings.
            post(app, &format!("/api/v1/sessions/{s}/finish"), A, json!({}))
                .await
                .ok();
            assert!(!d.state.engine.registry().exists(&AdapterId(run.clone())));
            check_unloaded_run(app, &run, &s, &meta, &w, &sp, loss).await;
            (run, loss, w, sp, s)
        })
    };
    // A restart on the same data directory.
    let d = durable(&data, |_| {});
    d.rt.block_on(async {
        let app = &d.app;
        assert!(!d.state.engine.registry().exists(&AdapterId(run.clone())));
        check_unloaded_run(
            app,
            &run,
            &session_id,
            &meta,
            &weights_path,
            &sampler_path,
            loss,
        )
        .await;
    });
    drop(d);
    let _ = std::fs::remove_dir_all(&data);
}

fn checkpoint_dir(data: &Path, run: &str, seg: &str, name: &str) -> PathBuf {
    let tenant = loraplex::auth::Auth::Development.tenant(A).unwrap();
    data.join("checkpoints")
        .join(tenant.as_str())
        .join(run.replace(':', "."))
        .join(seg)
        .join(name)
}

/// What an unloaded run still answers: its description with its metadata and step, the
/// listings, its ended session, and its checkpoints load into a new run and sample.
async fn check_unloaded_run(
    app: &Router,
    run: &str,
    old_session: &str,
    meta: &Value,
    weights: &str,
    sampler: &str,
    loss: f64,
) {
    let r = get(app, &format!("/api/v1/training_runs/{run}"), A)
        .await
        .ok();
    assert_eq!(r["user_metadata"], *meta, "{r}");
    assert_eq!(r["step"], 1);
    assert_eq!(r["last_checkpoint"]["tinker_path"], weights);
    assert_eq!(r["last_sampler_checkpoint"]["tinker_path"], sampler);
    let all = get(app, "/api/v1/training_runs?limit=100", A).await.ok();
    assert!(ids(&all, "training_runs", "training_run_id").contains(&run.to_owned()));
    let cks = get(app, &format!("/api/v1/training_runs/{run}/checkpoints"), A)
        .await
        .ok();
    assert_eq!(ids(&cks, "checkpoints", "tinker_path"), [sampler, weights]);
    // Not loaded: no training on it.
    post(app, "/api/v1/get_info", A, json!({"model_id": run}))
        .await
        .assert_error(404, "not found");
    // Its ended session still describes it.
    let s = get(app, &format!("/api/v1/sessions/{old_session}"), A)
        .await
        .ok();
    assert_eq!(s["training_run_ids"], json!([run]));
    assert_eq!(s["user_metadata"], json!({"purpose": "nightly"}));
    assert_eq!(s["display_name"], "runs test");
    let listed = get(app, "/api/v1/sessions?limit=1000", A).await.ok();
    assert!(listed["sessions"]
        .as_array()
        .unwrap()
        .contains(&json!(old_session)));
    // Its checkpoints start a new run, with the same weights.
    let s2 = session(app, A, json!({})).await;
    let out = done(
        app,
        A,
        load_new(app, A, &s2, 0, weights, json!({"renderer_name": "other"})).await,
    )
    .await;
    let run2 = format!("{s2}:train:0");
    assert_eq!(out["model_id"], run2);
    let again = forward_loss(app, A, &run2, 1).await;
    assert!(
        (again - loss).abs() < 1e-4 * loss.abs().max(1.0),
        "{again} vs {loss}"
    );
    let r2 = get(app, &format!("/api/v1/training_runs/{run2}"), A)
        .await
        .ok();
    assert_eq!(r2["user_metadata"], json!({"renderer_name": "other"}));
    let sc = post(
        app,
        "/api/v1/create_sampling_session",
        A,
        json!({"session_id": s2, "sampling_session_seq_id": 0, "model_path": sampler}),
    )
    .await
    .ok();
    assert!(sc["sampling_session_id"].is_string());
    post(app, &format!("/api/v1/sessions/{s2}/finish"), A, json!({}))
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field() {
    let (app, _) = app();
    for body in [
        json!({"user_metadata": ["a"]}),
        json!({"user_metadata": "renderer"}),
    ] {
        post(&app, "/api/v1/create_session", A, body)
            .await
            .assert_error(400, "user_metadata");
    }
    post(
        &app,
        "/api/v1/create_session",
        A,
        json!({"display_name": "x".repeat(300)}),
    )
    .await
    .assert_error(400, "display_name");
    // Values that are not strings are kept as their JSON text (the SDK reads strings).
    let s = session(&app, A, json!({"tenant": 3})).await;
    let got = get(&app, &format!("/api/v1/sessions/{s}"), A).await.ok();
    assert_eq!(got["user_metadata"], json!({"tenant": "3"}));
    let run = create_model(&app, A, &s, 5, json!({"step": 7, "ok": true})).await;
    let got = get(&app, &format!("/api/v1/training_runs/{run}"), A)
        .await
        .ok();
    assert_eq!(got["user_metadata"], json!({"step": "7", "ok": "true"}));
    post(
        &app,
        "/api/v1/create_model",
        A,
        json!({"session_id": s, "model_seq_id": 0, "base_model": DEFAULT_MODEL_NAME,
               "user_metadata": [1, 2]}),
    )
    .await
    .assert_error(400, "user_metadata");
    let big = json!({"a": "x".repeat(20_000)});
    post(
        &app,
        "/api/v1/create_model",
        A,
        json!({"session_id": s, "model_seq_id": 0, "base_model": DEFAULT_MODEL_NAME,
               "user_metadata": big}),
    )
    .await
    .assert_error(400, "at most 16384");
    for path in [
        "/api/v1/training_runs?limit=5000",
        "/api/v1/checkpoints?limit=1001",
        "/api/v1/sessions?limit=99999",
    ] {
        get(&app, path, A).await.assert_error(400, "limit");
    }
    get(&app, "/api/v1/training_runs?limit=-1", A)
        .await
        .assert_error(400, "limit");
    post(
        &app,
        "/api/v1/copy_weights",
        A,
        json!({"source_path": "tinker://x/weights/y"}),
    )
    .await
    .assert_error(400, "destination_project_id");
    post(
        &app,
        "/api/v1/copy_weights",
        A,
        json!({"source_path": "nope", "destination_project_id": "p"}),
    )
    .await
    .assert_error(400, "source_path");
    post(
        &app,
        "/api/v1/save_weights_external",
        A,
        json!({"model_id": "x", "path": "e", "seq_id": 1, "age_encryption_recipients": ["age1xyz"]}),
    )
    .await
    .assert_error(400, "age_encryption_recipients");
    let run = create_model(&app, A, &s, 0, json!({})).await;
    let ttl = format!("/api/v1/training_runs/{run}/checkpoints/weights/w/ttl");
    save(&app, A, "/api/v1/save_weights", &run, "w", 1).await;
    for bad in [json!({"ttl_seconds": 0}), json!({"ttl_seconds": -5})] {
        let r = call(
            &app,
            Method::PUT,
            &ttl,
            Some(A),
            "application/json",
            bad.to_string().into_bytes(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ttl_seconds"));
    }
}

/// The download link of `file` among `urls`, as a path on this server.
fn link(urls: &Value, file: &str) -> String {
    let u = urls["urls"][file].as_str().expect("a URL per file");
    let i = u.find("/api/v1/download/").expect("a download path");
    assert!(u.starts_with("http://"), "{u}");
    u[i..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_publish_copy_and_download_by_signed_links() {
    let (app, state) = app_with_cfg(|c| c.download_url_ttl_s = 2);
    let s = session(&app, A, json!({})).await;
    let run = create_model(&app, A, &s, 0, json!({})).await;
    train_step(&app, A, &run, 1).await;
    let w = save(&app, A, "/api/v1/save_weights", &run, "w", 3).await;
    let ext = save(&app, A, "/api/v1/save_weights_external", &run, "export", 4).await;
    assert_eq!(ext, format!("tinker://{run}/external_weights/export"));
    let cks = get(&app, &format!("/api/v1/training_runs/{run}/checkpoints"), A)
        .await
        .ok();
    assert_eq!(cks["checkpoints"][0]["checkpoint_type"], "external");
    assert_eq!(
        cks["checkpoints"][0]["checkpoint_id"],
        "external_weights/export"
    );
    let w_key = w.strip_prefix("tinker://").unwrap().to_owned();
    let (wid, wkind, wname) = {
        let p: Vec<&str> = w_key.split('/').collect();
        (p[0].to_owned(), p[1].to_owned(), p[2].to_owned())
    };
    let ck = |rest: &str| format!("/api/v1/training_runs/{wid}/checkpoints/{wkind}/{wname}{rest}");

    // Another tenant sees none of it.
    let sb = session(&app, B, json!({})).await;
    for path in [
        format!("/api/v1/training_runs/{run}"),
        format!("/api/v1/training_runs/{run}/checkpoints"),
        ck("/external_weights_urls"),
    ] {
        get(&app, &path, B).await.assert_error(404, "not found");
    }
    post(&app, "/api/v1/weights_info", B, json!({"tinker_path": w}))
        .await
        .assert_error(404, "not found");
    post(&app, &ck("/publish"), B, json!({}))
        .await
        .assert_error(404, "not found");
    load_new(&app, B, &sb, 0, &w, json!({}))
        .await
        .assert_error(404, "not found");
    post(
        &app,
        "/api/v1/copy_weights",
        B,
        json!({"source_path": w, "destination_project_id": "p"}),
    )
    .await
    .assert_error(404, "not found");

    // Published: readable by B (describe, load into its own run, sample, copy), never
    // changed or deleted by B.
    post(&app, &ck("/publish"), A, json!({})).await.ok();
    post(&app, &ck("/publish"), A, json!({})).await.ok();
    let info = post(&app, "/api/v1/weights_info", B, json!({"tinker_path": w}))
        .await
        .ok();
    assert_eq!(info["lora_rank"], 2);
    let listed = get(&app, &format!("/api/v1/training_runs/{run}/checkpoints"), A)
        .await
        .ok();
    let published: Vec<bool> = listed["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["public"].as_bool().unwrap())
        .collect();
    assert_eq!(published, [false, true]);
    let seen = get(
        &app,
        &format!("/api/v1/training_runs/{run}?access_scope=accessible"),
        B,
    )
    .await
    .ok();
    assert_eq!(seen["last_checkpoint"]["tinker_path"], w);
    assert_eq!(seen["last_sampler_checkpoint"], Value::Null);
    get(&app, &format!("/api/v1/training_runs/{run}"), B)
        .await
        .assert_error(404, "not found");
    let loss_a = forward_loss(&app, A, &run, 5).await;
    done(&app, B, load_new(&app, B, &sb, 0, &w, json!({})).await).await;
    let b_run = format!("{sb}:train:0");
    let loss_b = forward_loss(&app, B, &b_run, 1).await;
    assert!((loss_a - loss_b).abs() < 1e-4 * loss_a.abs().max(1.0));
    let sc = post(
        &app,
        "/api/v1/create_sampling_session",
        B,
        json!({"session_id": sb, "sampling_session_seq_id": 0, "model_path": w}),
    )
    .await;
    assert!(sc.ok()["sampling_session_id"].is_string());
    for (method, rest, body) in [
        (Method::DELETE, "", Vec::new()),
        (Method::DELETE, "/publish", Vec::new()),
        (
            Method::PUT,
            "/ttl",
            json!({"ttl_seconds": 5}).to_string().into_bytes(),
        ),
    ] {
        call(&app, method, &ck(rest), Some(B), "application/json", body)
            .await
            .assert_error(404, "not found");
    }
    // B copies it: the copy is B's own, and stays when A unpublishes.
    let copy = post(
        &app,
        "/api/v1/copy_weights",
        B,
        json!({"source_path": w, "destination_project_id": "archive"}),
    )
    .await
    .ok()["tinker_path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(copy.ends_with("/weights/w") && copy != w, "{copy}");
    let mine = get(&app, "/api/v1/checkpoints", B).await.ok();
    assert_eq!(ids(&mine, "checkpoints", "tinker_path"), [copy.as_str()]);
    call(
        &app,
        Method::DELETE,
        &ck("/publish"),
        Some(A),
        "",
        Vec::new(),
    )
    .await
    .ok();
    post(&app, "/api/v1/weights_info", B, json!({"tinker_path": w}))
        .await
        .assert_error(404, "not found");
    let info = post(
        &app,
        "/api/v1/weights_info",
        B,
        json!({"tinker_path": copy}),
    )
    .await
    .ok();
    assert_eq!(info["lora_rank"], 2);
    // A copy into a session slot, retried with the same idempotency key: one copy.
    let body = json!({"source_path": w, "session_id": s, "model_seq_id": 7}).to_string();
    let mut paths = Vec::new();
    for _ in 0..2 {
        let req = axum::http::Request::builder()
            .method(Method::POST)
            .uri("/api/v1/copy_weights")
            .header("x-api-key", A)
            .header("content-type", "application/json")
            .header("x-idempotency-key", "copy-once")
            .body(axum::body::Body::from(body.clone()))
            .unwrap();
        let resp = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let b = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&b).unwrap();
        paths.push(v["tinker_path"].as_str().unwrap().to_owned());
    }
    assert_eq!(paths[0], paths[1]);
    assert_eq!(paths[0], format!("tinker://{s}:train:7/weights/w"));

    // Signed links: the owner mints them; anyone fetches with no key, until they expire.
    let ext_key = ext.strip_prefix("tinker://").unwrap();
    let urls_path = format!(
        "/api/v1/training_runs/{}/checkpoints/external_weights/export/external_weights_urls",
        ext_key.split('/').next().unwrap()
    );
    let urls = get(&app, &urls_path, A).await.ok();
    assert!(urls["expires"].as_str().unwrap().ends_with('Z'));
    let cfg_link = link(&urls, "adapter_config.json");
    let st_link = link(&urls, "adapter_model.safetensors");
    let cfg = call(&app, Method::GET, &cfg_link, None, "", Vec::new()).await;
    let cfg = cfg.ok();
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["base_model_name_or_path"], DEFAULT_MODEL_NAME);
    let st = call(&app, Method::GET, &st_link, None, "", Vec::new()).await;
    assert_eq!(st.status, StatusCode::OK);
    assert_eq!(
        st.headers["content-length"].to_str().unwrap(),
        st.body.len().to_string()
    );
    // The file holds the run's weights under PEFT's names.
    let tensors = candle_core::safetensors::load_buffer(&st.body, &candle_core::Device::Cpu)
        .expect("safetensors");
    let tenant = loraplex::auth::Auth::Development.tenant(A).unwrap();
    let c = state
        .engine
        .registry()
        .checkpoint_entry(&tenant, ext_key)
        .unwrap();
    let cs = state.engine.checkpoint_state(c).await.unwrap();
    assert_eq!(tensors.len(), cs.weights.pairs.len() * 2);
    let mut trained = 0;
    for (site, p) in &cs.weights.pairs {
        for (is_b, want) in [(false, &p.a), (true, &p.b)] {
            let got = &tensors[&peft_tensor_name(*site, is_b)];
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{site:?}");
            if is_b
                && want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            {
                trained += 1;
            }
        }
    }
    assert!(trained > 0, "B matrices moved off zero after a step");
    assert!(matches!(
        cs.weights.pairs.keys().next(),
        Some(Site::Layer(0, _))
    ));
    // Tampered, for another file, unknown file: refused.
    let tampered = st_link.replacen("/api/v1/download/", "/api/v1/download/1", 1);
    let r = call(&app, Method::GET, &tampered, None, "", Vec::new()).await;
    r.assert_error(403, "invalid or has expired");
    let swapped = cfg_link.replace("adapter_config.json", "adapter_model.safetensors");
    call(&app, Method::GET, &swapped, None, "", Vec::new())
        .await
        .assert_error(403, "invalid");
    let other = cfg_link.replace("adapter_config.json", "secrets.txt");
    call(&app, Method::GET, &other, None, "", Vec::new())
        .await
        .assert_error(404, "not found");
    // Expired (links live 2 s here).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    call(&app, Method::GET, &cfg_link, None, "", Vec::new())
        .await
        .assert_error(403, "expired");
    // A fresh link does not outlive its checkpoint.
    let urls = get(&app, &urls_path, A).await.ok();
    let fresh = link(&urls, "adapter_config.json");
    call(&app, Method::GET, &fresh, None, "", Vec::new())
        .await
        .ok();
    let del = urls_path.replace("/external_weights_urls", "");
    call(&app, Method::DELETE, &del, Some(A), "", Vec::new())
        .await
        .ok();
    call(&app, Method::GET, &fresh, None, "", Vec::new())
        .await
        .assert_error(404, "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_list_newest_first_a_page_at_a_time() {
    let (app, _) = app();
    let mut made = Vec::new();
    for i in 0..3 {
        made.push(session(&app, A, json!({"i": i.to_string()})).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    session(&app, B, json!({})).await;
    let page = |q: &'static str| {
        let app = app.clone();
        async move { get(&app, &format!("/api/v1/sessions?{q}"), A).await.ok() }
    };
    let p = page("limit=2").await;
    assert_eq!(p["sessions"], json!([made[2], made[1]]));
    assert_eq!(p["cursor"]["total_count"], 3);
    assert_eq!(page("limit=2&offset=2").await["sessions"], json!([made[0]]));
    assert_eq!(page("offset=9").await["sessions"], json!([]));
    let one = get(&app, &format!("/api/v1/sessions/{}", made[1]), A)
        .await
        .ok();
    assert_eq!(one["user_metadata"], json!({"i": "1"}));
    get(&app, &format!("/api/v1/sessions/{}", made[1]), B)
        .await
        .assert_error(404, "not found");
}
