//! One tenant's traffic in the load benchmark: the Tinker protocol as the official SDK
//! speaks it (session, create_model, forward_backward in protobuf, optim_step, sampler
//! weights, sampling sessions, asample, retrieve_future long-polls, heartbeats, unload),
//! a few cheap REST reads, and a share of bad requests of every kind in turn. Every loop
//! is bounded by the run's deadlines; a 429 is retried after its Retry-After, as the SDK
//! does. What happened goes into the shared [`Stats`].

use super::client::{Conn, Request, Response};
use super::stats::{Class, Refusal, Stats};
use crate::api::proto::{self, chunk, tensor};
use crate::util::SplitMix64;
use parking_lot::Mutex;
use prost::Message;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every kind of bad request, in the order tenants cycle through them.
pub const BAD_KINDS: &[&str] = &[
    "missing-key",
    "unknown-route",
    "malformed-json",
    "mistyped-json",
    "malformed-protobuf",
    "unknown-model",
    "foreign-model",
    "foreign-session",
    "foreign-future",
    "foreign-sampler",
    "unknown-future",
    "negative-seq-id",
    "bad-checkpoint-path",
    "oversized-body",
    "huge-sample",
    "overflowing-max-tokens",
    "out-of-vocab",
    "mismatched-shape",
    "overflowing-shape",
    "huge-sparse",
];

/// Kinds that need the tenant's own live training model (they take a `seq_id` in it).
const NEEDS_MODEL: &[&str] = &[
    "out-of-vocab",
    "mismatched-shape",
    "overflowing-shape",
    "huge-sparse",
];

/// Kinds that need the tenant's own sampling session.
const NEEDS_SAMPLER: &[&str] = &["huge-sample", "overflowing-max-tokens"];

/// A token id far outside SmolLM2's (and any served model's) vocabulary.
const OUT_OF_VOCAB: i32 = 50_000_000;
/// Sessions heartbeat this often (the SDK: every 10 s).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Most 429s one request retries before it counts as failed.
const MAX_429_RETRIES: u32 = 120;

/// What a tenant's traffic looks like.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub model_name: String,
    pub bad_share: f64,
    pub bad_kinds: Vec<&'static str>,
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub steps_per_model: usize,
    pub sample_tokens: usize,
    pub rank: usize,
    pub vocab: u32,
    /// The server's body limit (an oversized body is one byte over it).
    pub max_body_bytes: usize,
    pub seed: u64,
}

/// Ids a tenant made, for other tenants' "foreign id" requests.
#[derive(Default, Clone)]
pub struct Known {
    pub session: Option<String>,
    pub model: Option<String>,
    pub future: Option<String>,
    pub sampler: Option<String>,
}

/// What all tenants share.
pub struct Ctx {
    pub addr: SocketAddr,
    pub traffic: Traffic,
    /// No new operation starts after this.
    pub deadline: Instant,
    /// Operations still unfinished at this point count as failed.
    pub hard_deadline: Instant,
    pub stats: Mutex<Stats>,
    pub known: Vec<Mutex<Known>>,
}

/// How a future ended.
enum Outcome {
    Done(Response),
    Failed { category: String, message: String },
    Error(String),
}

struct Tenant {
    ctx: Arc<Ctx>,
    index: usize,
    key: String,
    conn: Conn,
    rng: SplitMix64,
    /// Round-robin position in each group of bad kinds: any time, with a model, with a
    /// sampler.
    next_bad: [usize; 3],
    /// HTTP exchanges sent: good, bad.
    sent: [u64; 2],
    session: String,
    last_heartbeat: Instant,
    model_seq: u64,
    sampler_seq: u64,
    sample_seq: u64,
    /// The live training model and its next `seq_id`.
    model: Option<String>,
    seq: u64,
    sampler: Option<String>,
}

/// Run one tenant until the deadline.
pub async fn run_tenant(ctx: Arc<Ctx>, index: usize) {
    let conn = Conn::new(ctx.addr, Duration::from_secs(90));
    let mut t = Tenant {
        key: format!("tml-load-{index}"),
        conn,
        rng: SplitMix64::new(ctx.traffic.seed ^ (index as u64).wrapping_mul(0x9E37_79B9)),
        next_bad: [index * 5; 3],
        sent: [0; 2],
        session: String::new(),
        last_heartbeat: Instant::now(),
        model_seq: 0,
        sampler_seq: 0,
        sample_seq: 0,
        model: None,
        seq: 0,
        sampler: None,
        index,
        ctx,
    };
    t.run().await;
}

fn encode_datum(tokens: &[i32], inputs: Vec<(&str, proto::Tensor)>) -> proto::Datum {
    proto::Datum {
        model_input: vec![proto::Chunk {
            chunk: Some(chunk::Chunk::EncodedText(proto::EncodedTextChunk {
                tokens: proto::write_i32(tokens.iter().copied()),
            })),
        }],
        loss_fn_inputs: inputs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..Default::default()
    }
}

fn dense_i64(v: &[i64]) -> proto::Tensor {
    proto::Tensor {
        encoding: Some(tensor::Encoding::Dense(proto::write_i64(v.iter().copied()))),
        dtype: proto::DType::Int64 as i32,
        shape: vec![v.len() as i64],
    }
}

fn dense_f32(v: &[f32]) -> proto::Tensor {
    proto::Tensor {
        encoding: Some(tensor::Encoding::Dense(proto::write_f32(v.iter().copied()))),
        dtype: proto::DType::Float32 as i32,
        shape: vec![v.len() as i64],
    }
}

fn fb_body(model: &str, seq: u64, data: Vec<proto::Datum>) -> Vec<u8> {
    proto::ForwardBackwardRequest {
        model_id: model.to_owned(),
        seq_id: i32::try_from(seq).unwrap_or(i32::MAX),
        data,
        loss_fn: "cross_entropy".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn is_2xx(s: u16) -> bool {
    (200..300).contains(&s)
}

impl Tenant {
    fn open(&self) -> bool {
        Instant::now() < self.ctx.deadline
    }

    fn in_time(&self) -> bool {
        Instant::now() < self.ctx.hard_deadline
    }

    fn known(&self) -> parking_lot::MutexGuard<'_, Known> {
        self.ctx.known[self.index].lock()
    }

    /// Another tenant's ids, if any tenant made some yet.
    fn foreign(&mut self) -> Known {
        let n = self.ctx.known.len();
        if n < 2 {
            return Known::default();
        }
        let other = (self.index + 1 + (self.rng.next_u64() as usize) % (n - 1)) % n;
        self.ctx.known[other].lock().clone()
    }

    /// One request, with 429s retried after their Retry-After; every exchange counted.
    /// `None`: no answer (the failure is recorded by the caller's class).
    async fn send(
        &mut self,
        op: &'static str,
        class: Class,
        req: &Request<'_>,
    ) -> Option<Response> {
        let mut retries = 0;
        loop {
            let t = Instant::now();
            let r = self.conn.send(req).await;
            let took = t.elapsed();
            self.sent[class as usize] += 1;
            match r {
                Ok(resp) => {
                    self.ctx
                        .stats
                        .lock()
                        .exchange(op, class, resp.status.to_string(), took);
                    if resp.status == 429 && retries < MAX_429_RETRIES && self.in_time() {
                        retries += 1;
                        self.ctx.stats.lock().retries_429 += 1;
                        let wait = resp
                            .retry_after()
                            .unwrap_or(Duration::from_secs(1))
                            .clamp(Duration::from_millis(50), Duration::from_secs(30));
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Some(resp);
                }
                Err(e) => {
                    let mut s = self.ctx.stats.lock();
                    s.exchange(op, class, "transport".into(), took);
                    s.message(format!("{op} ({:?}) got no answer: {e}", class));
                    return None;
                }
            }
        }
    }

    /// A good request that must answer 2xx.
    async fn good(&mut self, op: &'static str, req: &Request<'_>) -> Option<Response> {
        let resp = self.send(op, Class::Good, req).await;
        match resp {
            Some(r) if is_2xx(r.status) => Some(r),
            Some(r) => {
                let m = format!("{op}: {} {}", r.status, r.snippet(300));
                self.ctx.stats.lock().good_failure(m);
                None
            }
            None => {
                self.ctx
                    .stats
                    .lock()
                    .good_failure(format!("{op}: no answer"));
                None
            }
        }
    }

    /// A good operation answered at once.
    async fn good_direct(&mut self, op: &'static str, req: &Request<'_>) -> Option<Response> {
        let r = self.good(op, req).await?;
        self.ctx.stats.lock().good_ok += 1;
        Some(r)
    }

    /// Submit a good future operation: its request id and when it was submitted.
    async fn submit(&mut self, op: &'static str, req: &Request<'_>) -> Option<(String, Instant)> {
        let t = Instant::now();
        let r = self.good(op, req).await?;
        match r
            .json()
            .and_then(|v| v["request_id"].as_str().map(str::to_owned))
        {
            Some(id) => {
                self.known().future = Some(id.clone());
                Some((id, t))
            }
            None => {
                let m = format!("{op}: no request_id in {}", r.snippet(300));
                self.ctx.stats.lock().good_failure(m);
                None
            }
        }
    }

    /// Long-poll a future until it ends or the hard deadline passes.
    async fn wait(&mut self, class: Class, id: &str) -> Outcome {
        let body = json!({"request_id": id, "allow_metadata_only": false}).to_string();
        let key = self.key.clone();
        loop {
            let req = Request {
                accept: "application/x-protobuf",
                ..Request::json("/api/v1/retrieve_future", &key, body.as_bytes())
            };
            let op = match class {
                Class::Good => "retrieve_future",
                Class::Bad => "retrieve_future (of a refused job)",
            };
            let Some(r) = self.send(op, class, &req).await else {
                return Outcome::Error("retrieve_future: no answer".into());
            };
            if r.status != 200 {
                return Outcome::Error(format!("retrieve_future: {} {}", r.status, r.snippet(300)));
            }
            if r.is_protobuf() {
                return Outcome::Done(r);
            }
            let Some(v) = r.json() else {
                return Outcome::Error(format!("retrieve_future: not JSON: {}", r.snippet(300)));
            };
            if v["type"] == "try_again" {
                if !self.in_time() {
                    return Outcome::Error(format!("future {id} unfinished at the hard deadline"));
                }
                continue;
            }
            if let Some(e) = v.get("error") {
                return Outcome::Failed {
                    category: v["category"].as_str().unwrap_or("?").to_owned(),
                    message: e.to_string(),
                };
            }
            return Outcome::Done(r);
        }
    }

    /// The result of a good future operation.
    async fn result(&mut self, op: &'static str, id: &str, submitted: Instant) -> Option<Response> {
        match self.wait(Class::Good, id).await {
            Outcome::Done(r) => {
                let mut s = self.ctx.stats.lock();
                s.good_ok += 1;
                s.result_latency
                    .entry(op)
                    .or_default()
                    .push(submitted.elapsed().as_secs_f64());
                Some(r)
            }
            Outcome::Failed { category, message } => {
                let mut s = self.ctx.stats.lock();
                s.future_failed(op, Class::Good, &category);
                s.good_failure(format!("{op}: future failed ({category}): {message}"));
                None
            }
            Outcome::Error(e) => {
                self.ctx.stats.lock().good_failure(format!("{op}: {e}"));
                None
            }
        }
    }

    async fn good_future(&mut self, op: &'static str, req: &Request<'_>) -> Option<Response> {
        let (id, t) = self.submit(op, req).await?;
        self.result(op, &id, t).await
    }

    async fn post_json(&mut self, op: &'static str, path: &str, v: Value) -> Option<Response> {
        let body = v.to_string();
        let key = self.key.clone();
        self.good_direct(op, &Request::json(path, &key, body.as_bytes()))
            .await
    }

    async fn post_future(&mut self, op: &'static str, path: &str, v: Value) -> Option<Response> {
        let body = v.to_string();
        let key = self.key.clone();
        self.good_future(op, &Request::json(path, &key, body.as_bytes()))
            .await
    }

    async fn get(&mut self, op: &'static str, path: &str) -> Option<Response> {
        let key = self.key.clone();
        self.good_direct(op, &Request::get(path, &key)).await
    }

    async fn run(&mut self) {
        self.post_json(
            "client_config",
            "/api/v1/client/config",
            json!({"sdk_version": "0.38.0"}),
        )
        .await;
        let Some(r) = self
            .post_json(
                "create_session",
                "/api/v1/create_session",
                json!({"tags": ["load"], "user_metadata": {"tenant": self.index}, "sdk_version": "0.38.0", "type": "create_session"}),
            )
            .await
        else {
            return;
        };
        let Some(session) = r
            .json()
            .and_then(|v| v["session_id"].as_str().map(str::to_owned))
        else {
            self.ctx
                .stats
                .lock()
                .good_failure("create_session: no session_id".into());
            return;
        };
        self.session = session.clone();
        self.known().session = Some(session.clone());
        self.last_heartbeat = Instant::now();
        let mut cycle = 0u64;
        while self.open() {
            self.cycle(cycle).await;
            cycle += 1;
        }
        if self.in_time() {
            let path = format!("/api/v1/sessions/{session}/finish");
            self.post_json(
                "finish_session",
                &path,
                json!({"reason": {"type": "success"}, "detail": null}),
            )
            .await;
        }
    }

    async fn heartbeat(&mut self) {
        if self.last_heartbeat.elapsed() < HEARTBEAT {
            return;
        }
        self.last_heartbeat = Instant::now();
        let s = self.session.clone();
        self.post_json(
            "session_heartbeat",
            "/api/v1/session_heartbeat",
            json!({"session_id": s, "type": "session_heartbeat"}),
        )
        .await;
    }

    /// Between good operations: bad requests until they are `bad_share` of this tenant's
    /// HTTP requests (at most 8 in a row).
    async fn maybe_bad(&mut self) {
        let share = self.ctx.traffic.bad_share;
        for _ in 0..8 {
            let [good, bad] = self.sent;
            if !self.open() || bad as f64 >= share * (good + bad + 1) as f64 {
                return;
            }
            self.bad().await;
        }
    }

    /// One model's life: create, train, sample, read, unload or delete.
    async fn cycle(&mut self, cycle: u64) {
        self.maybe_bad().await;
        let n = self.model_seq;
        self.model_seq += 1;
        let created = self
            .post_future(
                "create_model",
                "/api/v1/create_model",
                json!({"session_id": self.session, "model_seq_id": n, "base_model": self.ctx.traffic.model_name,
                       "lora_config": {"rank": self.ctx.traffic.rank, "train_mlp": true, "train_attn": true, "train_unembed": false},
                       "type": "create_model"}),
            )
            .await;
        let Some(model) = created.and_then(|r| r.json()?["model_id"].as_str().map(str::to_owned))
        else {
            return;
        };
        self.model = Some(model.clone());
        self.seq = 1;
        self.known().model = Some(model.clone());
        self.post_json(
            "get_info",
            "/api/v1/get_info",
            json!({"model_id": model, "type": "get_info"}),
        )
        .await;
        let trained = self.train(&model).await;
        if trained && self.open() {
            self.sample(&model, cycle).await;
        }
        if self.open() {
            self.get("training_run", &format!("/api/v1/training_runs/{model}"))
                .await;
            let reads = [
                "/list_loss_functions",
                "/api/v1/training_runs",
                "/api/v1/get_server_capabilities",
                "/healthz",
            ];
            let path = reads[(cycle as usize + self.index) % reads.len()];
            self.get("rest_read", path).await;
        }
        self.maybe_bad().await;
        self.sampler = None;
        self.model = None;
        if self.in_time() {
            if cycle.is_multiple_of(2) {
                self.post_future(
                    "unload_model",
                    "/api/v1/unload_model",
                    json!({"model_id": model, "type": "unload_model"}),
                )
                .await;
            } else {
                self.post_json("remove_lora", "/remove_lora", json!({"model_id": model}))
                    .await;
            }
        }
    }

    /// forward_backward + optim_step, `steps_per_model` times. False when one failed.
    async fn train(&mut self, model: &str) -> bool {
        let tr = self.ctx.traffic.clone();
        for _ in 0..tr.steps_per_model {
            if !self.open() {
                return true;
            }
            self.maybe_bad().await;
            let span = tr.max_tokens.saturating_sub(tr.min_tokens) as u64 + 1;
            let n = tr.min_tokens + (self.rng.next_u64() % span) as usize;
            let toks: Vec<i32> = (0..=n)
                .map(|_| 100 + (self.rng.next_u64() % u64::from(tr.vocab - 200)) as i32)
                .collect();
            let targets: Vec<i64> = toks[1..].iter().map(|&t| i64::from(t)).collect();
            let datum = encode_datum(
                &toks[..n],
                vec![
                    ("target_tokens", dense_i64(&targets)),
                    ("weights", dense_f32(&vec![1.0; n])),
                ],
            );
            let body = fb_body(model, self.seq, vec![datum]);
            let key = self.key.clone();
            let Some(fb) = self
                .submit(
                    "forward_backward",
                    &Request::protobuf("/api/v1/forward_backward", &key, &body),
                )
                .await
            else {
                return false;
            };
            self.seq += 1;
            let opt = json!({"model_id": model, "seq_id": self.seq, "adam_params": {"learning_rate": 1e-3}, "type": "optim_step"})
                .to_string();
            let Some(os) = self
                .submit(
                    "optim_step",
                    &Request::json("/api/v1/optim_step", &key, opt.as_bytes()),
                )
                .await
            else {
                return false;
            };
            self.seq += 1;
            let Some(out) = self.result("forward_backward", &fb.0, fb.1).await else {
                return false;
            };
            match proto::ForwardBackwardOutput::decode(&*out.body) {
                Ok(o) if o.metrics.contains_key("loss:sum") => {
                    self.ctx.stats.lock().trained_tokens += n as u64;
                }
                _ => {
                    let m = format!("forward_backward: result is not a ForwardBackwardOutput with loss:sum ({} bytes)", out.body.len());
                    self.ctx.stats.lock().good_failure(m);
                    return false;
                }
            }
            if self.result("optim_step", &os.0, os.1).await.is_none() {
                return false;
            }
            self.heartbeat().await;
        }
        true
    }

    /// Weights for a sampler (an ephemeral sampling session, or a named sampler
    /// checkpoint and a sampling session on it), then asample.
    async fn sample(&mut self, model: &str, cycle: u64) {
        let ss = self.sampler_seq;
        self.sampler_seq += 1;
        let seq = self.seq;
        self.seq += 1;
        let mut checkpoint = None;
        let sampler = if cycle % 2 == 1 {
            let r = self
                .post_future(
                    "save_weights_for_sampler",
                    "/api/v1/save_weights_for_sampler",
                    json!({"model_id": model, "seq_id": seq, "sampling_session_seq_id": ss, "type": "save_weights_for_sampler"}),
                )
                .await;
            r.and_then(|r| r.json()?["sampling_session_id"].as_str().map(str::to_owned))
        } else {
            let name = format!("c{cycle}");
            let r = self
                .post_future(
                    "save_weights_for_sampler",
                    "/api/v1/save_weights_for_sampler",
                    json!({"model_id": model, "path": name, "seq_id": seq, "type": "save_weights_for_sampler"}),
                )
                .await;
            let Some(path) = r.and_then(|r| r.json()?["path"].as_str().map(str::to_owned)) else {
                return;
            };
            checkpoint = Some(name);
            let r = self
                .post_json(
                    "create_sampling_session",
                    "/api/v1/create_sampling_session",
                    json!({"session_id": self.session, "sampling_session_seq_id": ss, "model_path": path, "type": "create_sampling_session"}),
                )
                .await;
            let id = r.and_then(|r| r.json()?["sampling_session_id"].as_str().map(str::to_owned));
            if let Some(id) = &id {
                self.get("get_sampler", &format!("/api/v1/samplers/{id}"))
                    .await;
            }
            id
        };
        let Some(sampler) = sampler else {
            return;
        };
        self.sampler = Some(sampler.clone());
        self.known().sampler = Some(sampler.clone());
        self.maybe_bad().await;
        let vocab = u64::from(self.ctx.traffic.vocab - 200);
        let prompt: Vec<u64> = (0..8).map(|_| 100 + self.rng.next_u64() % vocab).collect();
        let k = self.sample_seq;
        self.sample_seq += 1;
        let r = self
            .post_future(
                "asample",
                "/api/v1/asample",
                json!({"sampling_session_id": sampler, "seq_id": k, "num_samples": 1,
                       "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
                       "sampling_params": {"max_tokens": self.ctx.traffic.sample_tokens, "temperature": 1.0, "seed": k, "stop": []},
                       "type": "sample"}),
            )
            .await;
        if let Some(r) = r {
            match proto::SampleResponse::decode(&*r.body) {
                Ok(o) if !o.sequences.is_empty() => {
                    let toks: usize = o.sequences.iter().map(|q| q.tokens.len() / 4).sum();
                    self.ctx.stats.lock().sampled_tokens += toks as u64;
                }
                _ => {
                    let m = format!(
                        "asample: result is not a SampleResponse ({} bytes)",
                        r.body.len()
                    );
                    self.ctx.stats.lock().good_failure(m);
                }
            }
        }
        if let Some(name) = checkpoint {
            let key = self.key.clone();
            let path = format!("/api/v1/training_runs/{model}/checkpoints/sampler_weights/{name}");
            let ttl = format!("{path}/ttl");
            let body = json!({"ttl_seconds": 3600}).to_string();
            let req = Request {
                method: "PUT",
                ..Request::json(&ttl, &key, body.as_bytes())
            };
            self.good_direct("set_checkpoint_ttl", &req).await;
            let req = Request {
                method: "DELETE",
                ..Request::get(&path, &key)
            };
            self.good_direct("delete_checkpoint", &req).await;
        }
    }

    /// The next enabled bad kind that applies now: with a live model (or sampler), half
    /// the time one of the kinds that need it, so those are not drowned by the rest;
    /// round robin within each group.
    fn next_kind(&mut self) -> Option<&'static str> {
        let enabled = &self.ctx.traffic.bad_kinds;
        let group = |g: usize| -> Vec<&'static str> {
            enabled
                .iter()
                .copied()
                .filter(|k| match g {
                    1 => NEEDS_MODEL.contains(k),
                    2 => NEEDS_SAMPLER.contains(k),
                    _ => !NEEDS_MODEL.contains(k) && !NEEDS_SAMPLER.contains(k),
                })
                .collect()
        };
        let mut groups = vec![0];
        if self.sampler.is_some() {
            groups.push(2);
        } else if self.model.is_some() {
            groups.push(1);
        }
        groups.retain(|&g| !group(g).is_empty());
        let g = match groups.as_slice() {
            [] => return None,
            [only] => *only,
            [general, special, ..] => {
                if self.rng.next_u64().is_multiple_of(2) {
                    *special
                } else {
                    *general
                }
            }
        };
        let kinds = group(g);
        let k = kinds[self.next_bad[g] % kinds.len()];
        self.next_bad[g] += 1;
        Some(k)
    }

    /// One bad request, and whether it was refused.
    async fn bad(&mut self) {
        let Some(kind) = self.next_kind() else {
            return;
        };
        let key = self.key.clone();
        let foreign = self.foreign();
        let own_model = self
            .model
            .clone()
            .unwrap_or_else(|| format!("{}:train:999999", self.session));
        let unknown_model = format!("{}:train:999999", self.session);
        let ok_datum = || {
            encode_datum(
                &[504, 2365, 314, 260],
                vec![
                    ("target_tokens", dense_i64(&[2365, 314, 260, 1345])),
                    ("weights", dense_f32(&[1.0; 4])),
                ],
            )
        };
        // (op, path, content type, body); `model_seq`: takes a seq_id in the own model.
        let mut model_seq = false;
        let (op, path, ct, body): (&'static str, String, &'static str, Vec<u8>) = match kind {
            "missing-key" => ("create_session", "/api/v1/create_session".into(), "application/json", b"{}".to_vec()),
            "unknown-route" => ("unknown_route", "/api/v1/no_such_route".into(), "application/json", b"{}".to_vec()),
            "malformed-json" => (
                "optim_step",
                "/api/v1/optim_step".into(),
                "application/json",
                format!("{{\"model_id\": \"{own_model}\", \"seq_id\": ").into_bytes(),
            ),
            "mistyped-json" => (
                "create_model",
                "/api/v1/create_model".into(),
                "application/json",
                json!({"session_id": self.session, "model_seq_id": "zero", "base_model": self.ctx.traffic.model_name}).to_string().into_bytes(),
            ),
            "malformed-protobuf" => (
                "forward_backward",
                "/api/v1/forward_backward".into(),
                "application/x-protobuf",
                // Field 1 (model_id) claiming 2^35 bytes that never come.
                vec![0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, b'x'],
            ),
            "unknown-model" => (
                "optim_step",
                "/api/v1/optim_step".into(),
                "application/json",
                json!({"model_id": unknown_model, "seq_id": 1, "adam_params": {}}).to_string().into_bytes(),
            ),
            "foreign-model" => {
                let m = foreign.model.unwrap_or_else(|| "session-x:train:0".into());
                ("forward_backward", "/api/v1/forward_backward".into(), "application/x-protobuf", fb_body(&m, 1_000_000, vec![ok_datum()]))
            }
            "foreign-session" => {
                let s = foreign.session.unwrap_or_else(|| "session-x".into());
                (
                    "create_model",
                    "/api/v1/create_model".into(),
                    "application/json",
                    json!({"session_id": s, "model_seq_id": 1_000_000, "base_model": self.ctx.traffic.model_name, "lora_config": {"rank": 1}}).to_string().into_bytes(),
                )
            }
            "foreign-future" => {
                let f = foreign.future.unwrap_or_else(|| "future-x".into());
                ("retrieve_future", "/api/v1/retrieve_future".into(), "application/json", json!({"request_id": f}).to_string().into_bytes())
            }
            "foreign-sampler" => {
                let s = foreign.sampler.unwrap_or_else(|| "sampler-x".into());
                (
                    "asample",
                    "/api/v1/asample".into(),
                    "application/json",
                    json!({"sampling_session_id": s, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}, "sampling_params": {"max_tokens": 2}}).to_string().into_bytes(),
                )
            }
            "unknown-future" => ("retrieve_future", "/api/v1/retrieve_future".into(), "application/json", json!({"request_id": "future-00000000000000000000"}).to_string().into_bytes()),
            "negative-seq-id" => (
                "optim_step",
                "/api/v1/optim_step".into(),
                "application/json",
                json!({"model_id": own_model, "seq_id": -1, "adam_params": {}}).to_string().into_bytes(),
            ),
            "bad-checkpoint-path" => {
                let path = if self.rng.next_u64().is_multiple_of(2) {
                    format!("tinker://{own_model}/weights/../../../etc/passwd")
                } else {
                    let m = foreign.model.unwrap_or_else(|| "session-x:train:0".into());
                    format!("tinker://{m}/sampler_weights/c1")
                };
                (
                    "create_sampling_session",
                    "/api/v1/create_sampling_session".into(),
                    "application/json",
                    json!({"session_id": self.session, "sampling_session_seq_id": 1_000_000 + self.sampler_seq, "model_path": path}).to_string().into_bytes(),
                )
            }
            "oversized-body" => ("forward_backward", "/api/v1/forward_backward".into(), "application/x-protobuf", Vec::new()),
            "huge-sample" => {
                let s = self.sampler.clone().unwrap_or_default();
                // Too many samples, or too many tokens.
                let (n, m) = if self.rng.next_u64().is_multiple_of(2) {
                    (1_000_000_000u64, 4u64)
                } else {
                    (1, 1u64 << 40)
                };
                (
                    "asample",
                    "/api/v1/asample".into(),
                    "application/json",
                    json!({"sampling_session_id": s, "num_samples": n, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}, "sampling_params": {"max_tokens": m}}).to_string().into_bytes(),
                )
            }
            "overflowing-max-tokens" => {
                let s = self.sampler.clone().unwrap_or_default();
                (
                    "asample",
                    "/api/v1/asample".into(),
                    "application/json",
                    json!({"sampling_session_id": s, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}, "sampling_params": {"max_tokens": u64::MAX}}).to_string().into_bytes(),
                )
            }
            "out-of-vocab" => {
                model_seq = true;
                let d = encode_datum(
                    &[504, OUT_OF_VOCAB, 314, 260],
                    vec![("target_tokens", dense_i64(&[2365, 314, 260, i64::from(OUT_OF_VOCAB)])), ("weights", dense_f32(&[1.0; 4]))],
                );
                ("forward_backward", "/api/v1/forward_backward".into(), "application/x-protobuf", fb_body(&own_model, self.seq, vec![d]))
            }
            "mismatched-shape" => {
                model_seq = true;
                let d = encode_datum(
                    &[504, 2365, 314, 260],
                    vec![("target_tokens", dense_i64(&[2365, 314])), ("weights", dense_f32(&[1.0; 7]))],
                );
                ("forward_backward", "/api/v1/forward_backward".into(), "application/x-protobuf", fb_body(&own_model, self.seq, vec![d]))
            }
            "overflowing-shape" => {
                model_seq = true;
                // 2^32 · 2^32 wraps to 0 in unchecked arithmetic: as many values as sent.
                let t = proto::Tensor {
                    encoding: Some(tensor::Encoding::Dense(Vec::new())),
                    dtype: proto::DType::Float32 as i32,
                    shape: vec![1 << 32, 1 << 32],
                };
                let d = encode_datum(
                    &[504, 2365, 314, 260],
                    vec![("target_tokens", dense_i64(&[2365, 314, 260, 1345])), ("weights", t)],
                );
                ("forward_backward", "/api/v1/forward_backward".into(), "application/x-protobuf", fb_body(&own_model, self.seq, vec![d]))
            }
            "huge-sparse" => {
                model_seq = true;
                // The 100-byte request: a CSR tensor of shape [1, 2^40], no entries.
                let t = proto::Tensor {
                    encoding: Some(tensor::Encoding::SparseCsr(proto::SparseCsr {
                        values: Vec::new(),
                        crow_indices: proto::write_i64([0, 0]),
                        col_indices: Vec::new(),
                    })),
                    dtype: proto::DType::Float32 as i32,
                    shape: vec![1, 1 << 40],
                };
                let d = encode_datum(
                    &[504, 2365, 314, 260],
                    vec![("target_tokens", dense_i64(&[2365, 314, 260, 1345])), ("weights", t)],
                );
                ("forward_backward", "/api/v1/forward_backward".into(), "application/x-protobuf", fb_body(&own_model, self.seq, vec![d]))
            }
            _ => return,
        };
        let resp = if kind == "oversized-body" {
            self.sent[Class::Bad as usize] += 1;
            // One byte over the limit, on a connection of its own (the server may close it).
            let big = vec![0u8; self.ctx.traffic.max_body_bytes + 1];
            let mut c = Conn::new(self.ctx.addr, Duration::from_secs(90));
            let req = Request::protobuf(&path, &key, &big);
            let t = Instant::now();
            let r = c.send(&req).await;
            let mut s = self.ctx.stats.lock();
            let answer = r
                .as_ref()
                .map_or("transport".to_owned(), |r| r.status.to_string());
            s.exchange(op, Class::Bad, answer, t.elapsed());
            r.ok()
        } else {
            let req = Request {
                key: (kind != "missing-key").then_some(key.as_str()),
                content_type: ct,
                ..Request::json(&path, &key, &body)
            };
            self.send(op, Class::Bad, &req).await
        };
        let outcome = match resp {
            None => Err("no answer".to_owned()),
            Some(r) if (400..500).contains(&r.status) => Ok(Refusal::Status(r.status)),
            Some(r) if r.status >= 500 => Err(format!("{} {}", r.status, r.snippet(200))),
            Some(r) => {
                // Accepted as a job: it must fail through its future as the user's error.
                let id = r
                    .json()
                    .and_then(|v| v["request_id"].as_str().map(str::to_owned));
                match id {
                    Some(id) if model_seq => {
                        self.seq += 1;
                        match self.wait(Class::Bad, &id).await {
                            Outcome::Failed { category, .. } if category == "user" => {
                                self.ctx.stats.lock().future_failed(op, Class::Bad, "user");
                                Ok(Refusal::FutureUser)
                            }
                            Outcome::Failed { category, message } => {
                                self.ctx
                                    .stats
                                    .lock()
                                    .future_failed(op, Class::Bad, &category);
                                Err(format!("future failed with category {category}: {message}"))
                            }
                            Outcome::Done(r) => {
                                Err(format!("future succeeded: {}", r.snippet(200)))
                            }
                            Outcome::Error(e) => Err(e),
                        }
                    }
                    _ => Err(format!("accepted: {} {}", r.status, r.snippet(200))),
                }
            }
        };
        self.ctx.stats.lock().bad_outcome(kind, outcome);
    }
}
