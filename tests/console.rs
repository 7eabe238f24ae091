//! The web console's data and pages, in process on SmolLM2 with a data directory: every
//! forward_backward and optim_step result lands in the run's metrics history (bounded,
//! surviving a restart, deleted with the run, another tenant's run is a 404);
//! `/console` signs in with an API key into an HttpOnly, SameSite=Strict cookie, renders
//! runs, curves, checkpoints, plugins and usage for the signed-in tenant only, refuses
//! state-changing forms without the CSRF token, and keeps the operator view to operator
//! keys. The browser side (a real Chromium): tests/console_browser.rs.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use common::http::durable_app as server;
use common::http::*;
use http_body_util::BodyExt;
use loraplex::config::DEFAULT_MODEL_NAME;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tower::ServiceExt;

/// Keys with tenants `alice` and `bob`, and an operator key.
const KEYS: &str = "tml-alice alice\ntml-bob bob\ntml-root ops operator\n";

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

/// A request as a browser sends it: the console cookie, and a form body for POSTs.
async fn browse(
    app: &Router,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header("cookie", format!("loraplex_console={c}"));
    }
    let body = match form {
        Some(f) => {
            req = req.header("content-type", "application/x-www-form-urlencoded");
            Body::from(f.to_owned())
        }
        None => Body::empty(),
    };
    let resp = app
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .expect("infallible");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

fn html(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn location(r: &Resp) -> &str {
    r.headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Sign in with `key`: the cookie's token.
async fn sign_in(app: &Router, key: &str) -> String {
    let r = browse(
        app,
        Method::POST,
        "/console/sign-in",
        None,
        Some(&format!("key={key}")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", html(&r));
    assert_eq!(location(&r), "/console");
    let cookie = r.headers["set-cookie"].to_str().unwrap().to_owned();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=43200",
        "Path=/console",
    ] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains(key), "the key never travels back");
    assert!(!cookie.contains("Secure"), "plain HTTP here");
    let token = cookie
        .strip_prefix("loraplex_console=")
        .and_then(|c| c.split(';').next())
        .expect("the cookie")
        .to_owned();
    assert_eq!(token.len(), 64);
    token
}

/// The CSRF token the page's forms carry.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..at + 64].to_owned()
}

#[test]
fn the_console_shows_a_tenant_only_its_own_and_guards_every_change() {
    let data = temp_dir("pages");
    let keys = keys_file(&data);
    let s = server(&data, |c| c.keys_file = Some(keys.clone()));
    let app = &s.app;
    s.rt.block_on(async {
        // Not signed in: pages redirect to the form, anything else is a 401.
        let r = browse(app, Method::GET, "/console", None, None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(location(&r), "/console/sign-in");
        let r = browse(app, Method::POST, "/console/runs/x/checkpoints/weights/a/delete", None, Some("csrf=x")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = browse(app, Method::GET, "/console/sign-in", None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(html(&r).contains("<label for=\"key\">API key</label>"));
        assert!(r.headers["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
        let r = browse(app, Method::POST, "/console/sign-in", None, Some("key=tml-nobody")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.headers.get("set-cookie").is_none());
        // A forged cookie is no sign-in.
        let r = browse(app, Method::GET, "/console", Some(&"ab".repeat(32)), None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);

        // Alice trains and saves; her console shows it.
        let run = new_run(app, "tml-alice", json!({"experiment": "console-test"})).await;
        train_step(app, "tml-alice", &run, 1, 0.01).await;
        train_step(app, "tml-alice", &run, 3, 0.01).await;
        let r = post(app, "/api/v1/save_weights_for_sampler", "tml-alice", json!({"model_id": run, "path": "c1", "seq_id": 5})).await;
        let ck = done(app, "tml-alice", r).await["path"].as_str().expect("path").to_owned();
        let alice = sign_in(app, "tml-alice").await;
        let r = browse(app, Method::GET, "/console", Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::OK);
        let page = html(&r);
        assert!(page.contains(&run) && page.contains("experiment: console-test"), "{page}");
        assert!(page.contains("<strong id=\"tenant\">alice</strong>"));
        assert!(!page.contains("/console/operator"), "no operator link for a tenant");
        let run_path = format!("/console/runs/{run}");
        let r = browse(app, Method::GET, &run_path, Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::OK);
        let page = html(&r);
        assert!(page.contains("<svg class=\"chart\"") && page.contains("class=\"raw\""), "{page}");
        assert!(page.contains("loss:sum (forward_backward)"));
        assert!(page.contains(&escaped(&ck)), "the checkpoint is listed");
        assert!(!page.contains("class=\"smooth\""));
        let r = browse(app, Method::GET, &format!("{run_path}?log=1&smooth=0.6"), Some(&alice), None).await;
        let smooth = html(&r);
        assert!(smooth.contains("class=\"smooth\"") && smooth.contains("log scale"));
        let token = csrf(&page);

        // Bob signs in and sees none of it: 404s, and his CSRF token changes nothing.
        let bob = sign_in(app, "tml-bob").await;
        let bob_page = html(&browse(app, Method::GET, "/console", Some(&bob), None).await);
        assert!(!bob_page.contains(&run));
        let bob_token = csrf(&bob_page);
        let ck_base = format!("{run_path}/checkpoints/sampler_weights/c1");
        for path in [run_path.clone(), format!("{run_path}/charts"), format!("{run_path}/events"), format!("{ck_base}/peft")] {
            let r = browse(app, Method::GET, &path, Some(&bob), None).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        }
        let r = browse(app, Method::POST, &format!("{ck_base}/delete"), Some(&bob), Some(&format!("csrf={bob_token}"))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = browse(app, Method::POST, "/console/playground", Some(&bob), Some(&format!("csrf={bob_token}&checkpoint={}&prompt=Hi&max_tokens=2&temperature=0", urlenc(&ck)))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);

        // Alice's changes need her CSRF token.
        let foreign_csrf = format!("csrf={bob_token}");
        for form in ["", "csrf=", foreign_csrf.as_str()] {
            let r = browse(app, Method::POST, &format!("{ck_base}/delete"), Some(&alice), Some(form)).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{form}");
        }
        let r = browse(app, Method::POST, &format!("{ck_base}/publish"), Some(&alice), Some(&format!("csrf={bob_token}&public=1"))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let listed = |v: Value| v["checkpoints"][0].clone();
        let c = listed(get(app, &format!("/api/v1/training_runs/{run}/checkpoints"), "tml-alice").await.ok());
        assert_eq!(c["public"], false);
        let r = browse(app, Method::POST, &format!("{ck_base}/publish"), Some(&alice), Some(&format!("csrf={token}&public=1"))).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(location(&r), run_path);
        let r = browse(app, Method::POST, &format!("{ck_base}/ttl"), Some(&alice), Some(&format!("csrf={token}&ttl_seconds=3600"))).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let c = listed(get(app, &format!("/api/v1/training_runs/{run}/checkpoints"), "tml-alice").await.ok());
        assert_eq!(c["public"], true);
        assert!(c["expires_at"].is_string());

        // The PEFT download is the API's, byte for byte.
        let r = browse(app, Method::GET, &format!("{ck_base}/peft"), Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], "application/x-tar");
        let api = get(app, &format!("/api/v1/training_runs/{run}/checkpoints/sampler_weights/c1/peft"), "tml-alice").await;
        assert_eq!(r.body, api.body);

        // The playground samples from the checkpoint and shows each token's logprob.
        let r = browse(app, Method::GET, "/console/sampling", Some(&alice), None).await;
        assert!(html(&r).contains(&format!("<option value=\"{}\"", escaped(&ck))));
        let form = format!("csrf={token}&checkpoint={}&prompt=The+capital+of+France+is&max_tokens=4&temperature=0&seed=", urlenc(&ck));
        let r = browse(app, Method::POST, "/console/playground", Some(&alice), Some(&form)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", html(&r));
        let out = html(&r);
        let lps: Vec<f64> = out
            .split("<td class=\"logprob\">")
            .skip(1)
            .map(|x| x.split('<').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(lps.len(), 4, "{out}");
        assert!(lps.iter().all(|lp| *lp <= 0.0));
        let r = browse(app, Method::POST, "/console/playground", Some(&alice), Some(&format!("csrf={token}&checkpoint={}&prompt=x&max_tokens=100000&temperature=0", urlenc(&ck)))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        // Plugins and usage render for the tenant.
        let r = browse(app, Method::GET, "/console/usage", Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(html(&r).contains("training runs"));
        let r = browse(app, Method::GET, "/console/plugins", Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::OK);

        // The operator view is for operator keys only.
        let r = browse(app, Method::GET, "/console/operator", Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let root = sign_in(app, "tml-root").await;
        let r = browse(app, Method::GET, "/console/operator", Some(&root), None).await;
        assert_eq!(r.status, StatusCode::OK);
        let ops = html(&r);
        assert!(ops.contains("<th scope=\"row\">alice</th>") && ops.contains("Batch composition"), "{ops}");
        // Residency figures (#15): alice's run is in memory, within the budget.
        let resident: usize = ops
            .split("<th scope=\"row\">resident adapters</th><td>")
            .nth(1)
            .and_then(|t| t.split('<').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no resident-adapters row: {ops}"));
        assert!(resident >= 1, "{ops}");
        assert!(ops.contains("cold load p99") && !ops.contains("id=\"no-residency\""));
        // The refused forms above are among the recent failed requests.
        assert!(
            ops.contains("<td>POST &#x2f;console&#x2f;*</td><td>403</td>"),
            "{ops}"
        );

        // Deleting through the console deletes the checkpoint.
        let r = browse(app, Method::POST, &format!("{ck_base}/delete"), Some(&alice), Some(&format!("csrf={token}"))).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let cks = get(app, &format!("/api/v1/training_runs/{run}/checkpoints"), "tml-alice").await.ok();
        assert_eq!(cks["checkpoints"].as_array().unwrap().len(), 0);

        // Signing out forgets the sign-in.
        let r = browse(app, Method::POST, "/console/sign-out", Some(&alice), Some(&format!("csrf={token}"))).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert!(r.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
        let r = browse(app, Method::GET, "/console", Some(&alice), None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
    });
}

/// `s` as the templates write it in HTML (minijinja escapes `/` too).
fn escaped(s: &str) -> String {
    s.replace('&', "&amp;").replace('/', "&#x2f;")
}

fn urlenc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_run_page_streams_its_new_points_live() {
    let data = temp_dir("live");
    let keys = keys_file(&data);
    let s = server(&data, |c| c.keys_file = Some(keys.clone()));
    let app = s.app.clone();
    s.rt.block_on(async move {
        let run = new_run(&app, "tml-alice", json!({})).await;
        let alice = sign_in(&app, "tml-alice").await;
        let req = Request::builder()
            .uri(format!("/console/runs/{run}/events"))
            .header("cookie", format!("loraplex_console={alice}"))
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut body = resp.into_body();
        let (a2, r2) = (app.clone(), run.clone());
        let trained = tokio::spawn(async move { train_step(&a2, "tml-alice", &r2, 1, 0.01).await });
        let mut seen = String::new();
        // A guard against a hang, not a timing assertion.
        tokio::time::timeout(std::time::Duration::from_secs(300), async {
            while !(seen.contains("\"kind\":\"optim_step\"")) {
                let frame = body
                    .frame()
                    .await
                    .expect("the stream stays open")
                    .expect("a frame");
                if let Ok(d) = frame.into_data() {
                    seen.push_str(&String::from_utf8_lossy(&d));
                }
            }
        })
        .await
        .expect("points arrive");
        let loss = trained.await.unwrap();
        let fb_line = seen
            .lines()
            .find(|l| l.contains("forward_backward"))
            .expect("the forward_backward point");
        let v: Value = serde_json::from_str(fb_line.trim_start_matches("data:").trim()).unwrap();
        assert_eq!(v["metrics"]["loss:sum"].as_f64(), Some(loss));
        assert_eq!(v["step"], 0);
    });
}

#[test]
fn behind_https_the_sign_in_cookie_is_secure() {
    let data = temp_dir("secure");
    let keys = keys_file(&data);
    let s = server(&data, |c| {
        c.keys_file = Some(keys.clone());
        c.public_url = Some("https://loraplex.example".into());
    });
    s.rt.block_on(async {
        let r = browse(
            &s.app,
            Method::POST,
            "/console/sign-in",
            None,
            Some("key=tml-alice"),
        )
        .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let cookie = r.headers["set-cookie"].to_str().unwrap();
        assert!(
            cookie.contains("; Secure") && cookie.contains("HttpOnly"),
            "{cookie}"
        );
    });
}
