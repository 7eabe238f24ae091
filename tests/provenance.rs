//! `stable_reinforce` and `gspo` over the Tinker protocol, as the cookbook drives them, on
//! the shipped SmolLM2: sample with `record_stability_info`, build datums whose provenance
//! spans name the sampled sequences, train. Also what must be refused (an unknown, foreign
//! or evicted sequence id, a datum whose tokens are not the recorded ones, an advantage on
//! a prompt token, a client sending the server's `recorded:` inputs) and the store's bounds
//! (records go with their session; a session keeps at most its cap, least recently used
//! first).

mod common;

use axum::Router;
use common::http::*;
use loraplex::api::proto::{self, provenance_span, ProvenanceSpan, SpanRun};
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;

/// A sampled sequence as the SDK sees it.
struct Sampled {
    id: String,
    tokens: Vec<i32>,
    logprobs: Vec<f32>,
}

/// An ephemeral sampler of `model` (save_weights_and_get_sampling_client).
async fn sampler(app: &Router, model: &str, seq: i64, sampler_seq: i64) -> String {
    let r = post(
        app,
        "/api/v1/save_weights_for_sampler",
        A,
        json!({"model_id": model, "seq_id": seq, "sampling_session_seq_id": sampler_seq, "kind": "snapshot"}),
    )
    .await;
    let id = r.json()["request_id"].as_str().unwrap().to_owned();
    retrieve(app, A, &id).await.json()["sampling_session_id"]
        .as_str()
        .expect("sampling session")
        .to_owned()
}

async fn sample(
    app: &Router,
    sid: &str,
    seq: u64,
    prompt: &[i32],
    n: usize,
    record: bool,
) -> Vec<Sampled> {
    let a = post(
        app,
        "/api/v1/asample",
        A,
        json!({"sampling_session_id": sid, "seq_id": seq, "num_samples": n,
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
               "sampling_params": {"max_tokens": 6, "temperature": 1.0, "seed": 11, "stop": []},
               "record_stability_info": record, "type": "sample"}),
    )
    .await
    .ok();
    let ids: Vec<String> = a["sample_sequence_ids"]
        .as_array()
        .expect("sample_sequence_ids")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), n, "one sequence id per sample");
    let out = retrieve(app, A, a["request_id"].as_str().unwrap()).await;
    let sr = proto::SampleResponse::decode(out.body).expect("SampleResponse");
    sr.sequences
        .iter()
        .zip(ids)
        .map(|(s, id)| Sampled {
            id,
            tokens: proto::read_i32("t", &s.tokens).unwrap(),
            logprobs: proto::read_f32("l", s.logprobs.as_deref().unwrap_or_default()).unwrap(),
        })
        .collect()
}

fn span(prompt: bool, id: &str, offset: i64, length: i64) -> ProvenanceSpan {
    let run = SpanRun {
        sequence_id: id.into(),
        offset,
        length,
    };
    ProvenanceSpan {
        span: Some(if prompt {
            provenance_span::Span::PromptTokens(run)
        } else {
            provenance_span::Span::SampledTokens(run)
        }),
    }
}

/// The cookbook's datum (recipes/rl_loop.py): input = prompt + sampled[:-1], targets
/// shifted by one, advantage 0 on prompt targets, with its provenance spans
/// (`with_sampled_provenance`) and, for gspo, a `sequence_ratio_mask` over the sampled
/// targets.
fn rl_datum(prompt: &[i32], s: &Sampled, adv: f32, spans: bool, gspo: bool) -> proto::Datum {
    let (p, n) = (prompt.len(), s.tokens.len());
    let full: Vec<i32> = prompt.iter().chain(&s.tokens).copied().collect();
    let len = full.len() - 1;
    let ob = p - 1;
    let mut lp = vec![0f32; ob];
    lp.extend(&s.logprobs);
    let mut a = vec![0f32; ob];
    a.extend(vec![adv; n]);
    let targets: Vec<i64> = full[1..].iter().map(|&t| t as i64).collect();
    let mut inputs = vec![
        ("target_tokens", i64_tensor(&targets)),
        ("logprobs", f32_tensor(&lp)),
        ("advantages", f32_tensor(&a)),
    ];
    if gspo {
        let mut m = vec![0f32; ob];
        m.extend(vec![1.0; n]);
        inputs.push(("sequence_ratio_mask", f32_tensor(&m)));
    }
    let mut d = text_datum(&full[..len], &inputs);
    if spans {
        d.model_input_spans = vec![
            span(true, &s.id, 0, p as i64),
            span(false, &s.id, 0, n as i64 - 1),
        ];
        d.loss_fn_input_spans = vec![
            span(true, &s.id, 1, p as i64 - 1),
            span(false, &s.id, 0, n as i64),
        ];
    }
    d
}

/// Submit a forward_backward and read its future: the protobuf output, or the failure JSON.
async fn train(
    app: &Router,
    model: &str,
    seq: i32,
    loss: &str,
    data: Vec<proto::Datum>,
) -> Result<proto::ForwardBackwardOutput, Value> {
    let r = fb(app, A, model, seq, loss, data, HashMap::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let out = retrieve(app, A, r.json()["request_id"].as_str().unwrap()).await;
    let proto = out
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-protobuf"));
    if proto {
        Ok(proto::ForwardBackwardOutput::decode(out.body).expect("ForwardBackwardOutput"))
    } else {
        Err(out.json())
    }
}

/// A failed future: category user, and the message mentions every needle.
fn refused(r: Result<proto::ForwardBackwardOutput, Value>, needles: &[&str]) {
    let v = r.err().expect("the request must fail");
    assert_eq!(v["category"], "user", "{v}");
    let msg = v["error"].as_str().unwrap_or_default();
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
}

const PROMPT: [i32; 6] = [504, 2365, 314, 260, 1345, 28];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_reinforce_and_gspo_train_on_recorded_samples() {
    let (app, state) = app();
    let (session, model) = tinker_model(&app, A).await;
    let sid = sampler(&app, &model, 1, 0).await;
    let group = sample(&app, &sid, 0, &PROMPT, 4, true).await;
    let scope = (state.auth.tenant(A).expect("tenant"), session.clone());
    assert_eq!(
        state.tinker.records.scope_len(&scope),
        4,
        "4 sequences recorded"
    );

    // stable_reinforce on the cookbook's datums: the sampler and the trainer hold the same
    // weights, so every importance ratio is 1 up to numerics, and so is the KL estimate 0.
    let advs = [1.0f32, -0.5, 0.25, 0.75];
    let data: Vec<_> = group
        .iter()
        .zip(advs)
        .map(|(s, a)| rl_datum(&PROMPT, s, a, true, false))
        .collect();
    let out = train(&app, &model, 2, "stable_reinforce", data.clone())
        .await
        .expect("stable_reinforce trains");
    let m = &out.metrics;
    eprintln!("stable_reinforce, sampler and trainer on the same weights: {m:?}");
    let sampled: usize = group.iter().map(|s| s.tokens.len()).sum();
    assert_eq!(m["sampled_tokens:sum"], sampled as f64);
    assert!(m["loss:sum"].is_finite());
    assert!(
        (m["importance_ratio:max"] - 1.0).abs() < 2e-3,
        "sampler and trainer agree: {m:?}"
    );
    assert!(m["kl_sample_train:sum"].abs() < 1e-4, "{m:?}");
    assert_eq!(m["truncated_tokens:sum"], 0.0);
    // At ratio 1 the loss is −Σ A over the sampled tokens.
    let want: f64 = group
        .iter()
        .zip(advs)
        .map(|(s, a)| -(a as f64) * s.tokens.len() as f64)
        .sum();
    assert!(
        (m["loss:sum"] - want).abs() < 1e-2,
        "{} vs {want}",
        m["loss:sum"]
    );
    // The learner's logprobs of the sampled tokens are the recorded ones.
    let rec = &out.loss_fn_outputs[0].fields["logprobs"];
    let lps = proto::read_f32("lp", &rec.data).unwrap();
    let off = proto::read_i64("off", &rec.offsets).unwrap();
    let first = &lps[..(off[1] / 4) as usize];
    let tail = &first[first.len() - group[0].tokens.len()..];
    for (a, b) in tail.iter().zip(&group[0].logprobs) {
        assert!((a - b).abs() < 2e-3, "{a} vs sampler {b}");
    }

    // gspo on the same samples, with its sequence_ratio_mask: ratio 1, loss −Σ A.
    let g: Vec<_> = group
        .iter()
        .zip(advs)
        .map(|(s, a)| rl_datum(&PROMPT, s, a, false, true))
        .collect();
    let out = train(&app, &model, 3, "gspo", g)
        .await
        .expect("gspo trains");
    assert!(
        (out.metrics["loss:sum"] - want).abs() < 1e-2,
        "{:?}",
        out.metrics
    );
    assert!((out.metrics["sequence_ratio:max"] - 1.0).abs() < 2e-3);
    assert_eq!(out.metrics["clipped_tokens:sum"], 0.0);
    // One optimizer step on it all, then stable_reinforce again: off-policy now, still
    // finite, and the ratios moved.
    let s = post(
        &app,
        "/api/v1/optim_step",
        A,
        json!({"model_id": model, "seq_id": 4, "adam_params": {"learning_rate": 0.01}}),
    )
    .await;
    retrieve(&app, A, s.json()["request_id"].as_str().unwrap())
        .await
        .ok();
    let out = train(&app, &model, 5, "stable_reinforce", data.clone())
        .await
        .expect("off-policy stable_reinforce");
    eprintln!(
        "stable_reinforce after one step (lr 0.01): {:?}",
        out.metrics
    );
    assert!(out.metrics["loss:sum"].is_finite());
    assert!(
        out.metrics["kl_sample_train:sum"] > 1e-4,
        "{:?}",
        out.metrics
    );

    // Refusals, each a user error through the future, naming the problem.
    // Without provenance.
    let bare = vec![rl_datum(&PROMPT, &group[0], 1.0, false, false)];
    refused(
        train(&app, &model, 6, "stable_reinforce", bare).await,
        &["loss_fn_input_spans", "record_stability_info"],
    );
    // A sequence this session never recorded.
    let mut ghost = rl_datum(&PROMPT, &group[0], 1.0, true, false);
    ghost.loss_fn_input_spans[1] = span(false, "future-nope-0", 0, group[0].tokens.len() as i64);
    refused(
        train(
            &app,
            &model,
            7,
            "stable_reinforce",
            vec![data[0].clone(), ghost],
        )
        .await,
        &[
            "data[1].loss_fn_input_spans[1].sequence_id",
            "future-nope-0",
        ],
    );
    // A datum whose tokens are not what was sampled.
    let mut forged = rl_datum(&PROMPT, &group[0], 1.0, true, false);
    let mut t = proto::read_i64(
        "t",
        match &forged.loss_fn_inputs["target_tokens"].encoding {
            Some(proto::tensor::Encoding::Dense(b)) => b,
            _ => unreachable!(),
        },
    )
    .unwrap();
    let last = t.len() - 1;
    t[last] = (t[last] + 1) % 49_000;
    forged
        .loss_fn_inputs
        .insert("target_tokens".into(), i64_tensor(&t));
    refused(
        train(&app, &model, 8, "stable_reinforce", vec![forged]).await,
        &["loss_fn_input_spans[1]", "is token"],
    );
    // An advantage on a prompt token.
    let mut greedy = rl_datum(&PROMPT, &group[0], 1.0, true, false);
    let mut a = vec![0.25f32];
    a.extend(vec![0.0; PROMPT.len() - 2]);
    a.extend(vec![1.0; group[0].tokens.len()]);
    greedy
        .loss_fn_inputs
        .insert("advantages".into(), f32_tensor(&a));
    refused(
        train(&app, &model, 9, "stable_reinforce", vec![greedy]).await,
        &["advantages", "prompt token"],
    );
    // The server's own inputs, sent by a client.
    let mut spoof = rl_datum(&PROMPT, &group[0], 1.0, false, false);
    let n = PROMPT.len() - 1 + group[0].tokens.len() - 1;
    spoof
        .loss_fn_inputs
        .insert("recorded:sampled".into(), f32_tensor(&vec![1.0; n]));
    refused(
        train(&app, &model, 10, "stable_reinforce", vec![spoof]).await,
        &["recorded:sampled", "filled in by the server"],
    );
    // Sequences sampled without record_stability_info still have ids, but no record.
    let plain = sample(&app, &sid, 1, &PROMPT, 1, false).await;
    assert!(plain[0].id.ends_with("-0"));
    refused(
        train(
            &app,
            &model,
            11,
            "stable_reinforce",
            vec![rl_datum(&PROMPT, &plain[0], 1.0, true, false)],
        )
        .await,
        &["names no sequence recorded in this session"],
    );
    // Another session of the same tenant cannot name this session's sequences.
    let (_, other) = tinker_model(&app, A).await;
    refused(
        train(&app, &other, 1, "stable_reinforce", data.clone()).await,
        &["names no sequence recorded in this session", &group[0].id],
    );
    // The model still trains after all those refusals.
    train(&app, &model, 12, "stable_reinforce", data)
        .await
        .expect("still trains");

    // Records go with their session.
    post(
        &app,
        &format!("/api/v1/sessions/{session}/finish"),
        A,
        json!({"reason": {"type": "success"}}),
    )
    .await
    .ok();
    assert_eq!(state.tinker.records.scope_len(&scope), 0);

    // Every place that lists losses lists the new ones.
    for route in ["/list_loss_functions", "/api/v1/get_server_capabilities"] {
        let v = get(&app, route, A).await.ok();
        let names = v["loss_functions"].to_string();
        assert!(
            names.contains("\"stable_reinforce\"") && names.contains("\"gspo\""),
            "{route}: {v}"
        );
    }
    let doc = get(&app, "/openapi.json", A).await.ok().to_string();
    assert!(doc.contains("\"stable_reinforce\"") && doc.contains("\"gspo\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_at_most_its_cap_of_records() {
    let (app, state) = app_with_cfg(|c| c.max_recorded_sequences_per_session = 3);
    let (session, model) = tinker_model(&app, A).await;
    let sid = sampler(&app, &model, 1, 0).await;
    let old = sample(&app, &sid, 0, &PROMPT, 2, true).await;
    let new = sample(&app, &sid, 1, &PROMPT, 2, true).await;
    let scope = (state.auth.tenant(A).expect("tenant"), session);
    assert_eq!(state.tinker.records.scope_len(&scope), 3);
    assert_eq!(state.tinker.records.evicted(), 1);
    // The first sequence recorded went first; the others still train.
    refused(
        train(
            &app,
            &model,
            2,
            "stable_reinforce",
            vec![rl_datum(&PROMPT, &old[0], 1.0, true, false)],
        )
        .await,
        &[&old[0].id, "LORAPLEX_MAX_RECORDED_SEQUENCES_PER_SESSION"],
    );
    let keep: Vec<_> = [&old[1], &new[0], &new[1]]
        .into_iter()
        .map(|s| rl_datum(&PROMPT, s, 1.0, true, false))
        .collect();
    let out = train(&app, &model, 3, "stable_reinforce", keep)
        .await
        .expect("the kept records train");
    assert!(out.metrics["loss:sum"].is_finite());
    // Sampling without a Tinker session cannot record.
    post(
        &app,
        "/api/v1/asample",
        A,
        json!({"base_model": loraplex::config::DEFAULT_MODEL_NAME, "num_samples": 1,
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
               "sampling_params": {"max_tokens": 2}, "record_stability_info": true}),
    )
    .await
    .assert_error(400, "record_stability_info");
}
