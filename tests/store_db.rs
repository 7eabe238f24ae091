//! The metadata database and the SQLite future store: what is written survives closing and
//! reopening; a tenant never sees another's rows; futures left unfinished by a stopped
//! server fail on reopen with a server-category message; every kind of job output comes
//! back from the database as it went in; fetched results expire; and the engine runs on it.

mod common;

use candle_core::DType;
use common::*;
use loraplex::config::EngineConfig;
use loraplex::error::Category;
use loraplex::jobs::future::Progress;
use loraplex::jobs::*;
use loraplex::lora::optim::{AdamParams, StepReport};
use loraplex::lora::{LoraConfig, Target};
use loraplex::sample::prompt::{AltTokens, CellLayout, Csr, TargetLogprobs};
use loraplex::sample::StopReason;
use loraplex::store::checkpoint::CheckpointKind;
use loraplex::store::db::*;
use loraplex::store::{FutureStoreConfig, SqliteFutureStore, StoreError};
use loraplex::train::loss::BuiltinLoss;
use loraplex::train::{Datum, WorkResult};
use loraplex::util::SplitMix64;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 8,
        alpha: 16.0,
        seed: 3,
        targets: vec![Target::Q, Target::V],
        train_unembed: false,
    }
}

#[tokio::test]
async fn everything_written_is_there_after_close_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("meta/loraplex.db");
    let t = TenantId::from("tenant-a");
    let model = ModelRecord {
        id: AdapterId::from("model-1"),
        tenant: t.clone(),
        session: Some(ClientSessionId("session-1".into())),
        base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        lora_config: lora(),
        step: 0,
        newest_checkpoint: None,
        deleted: false,
        created: at(1_000),
        user_metadata: Some(UserMetadata(
            [("renderer_name".to_string(), "llama3".to_string())].into(),
        )),
        loaded: true,
        last_request: None,
    };
    let ckpt = CheckpointRecord {
        path: "tinker://model-1/weights/step-3".into(),
        model: model.id.clone(),
        tenant: t.clone(),
        kind: CheckpointKind::Training,
        dir: PathBuf::from("/ckpt/tenant-a/model-1/weights/step-3"),
        size_bytes: 12345,
        step: 3,
        created: at(4_000),
        expires: Some(at(90_000)),
        public: false,
        user_metadata: None,
    };
    let sampling = SamplingSessionRecord {
        id: SessionId::from("sampler-1"),
        tenant: t.clone(),
        model: Some(model.id.clone()),
        base_model: model.base_model.clone(),
        checkpoint_path: Some(ckpt.path.clone()),
        created: at(5_000),
    };
    let plugin = PluginRecord {
        tenant: t.clone(),
        content_hash: "ab".repeat(32),
        kind: "loss".into(),
        created: at(6_000),
    };
    let session = SessionRecord {
        id: ClientSessionId("session-1".into()),
        tenant: t.clone(),
        created: at(500),
        last_heartbeat: at(500),
        user_metadata: None,
        display_name: Some("nightly".into()),
        ended: None,
    };
    {
        let db = Db::open(&path).await.unwrap();
        db.insert_tenant(&TenantRecord {
            id: t.clone(),
            name: "Ada".into(),
            created: at(100),
        })
        .await
        .unwrap();
        db.insert_session(&session).await.unwrap();
        db.heartbeat_session(&t, &session.id, at(2_500))
            .await
            .unwrap();
        db.insert_model(&model).await.unwrap();
        db.update_model_progress(&t, &model.id, 3, Some(&ckpt.path))
            .await
            .unwrap();
        db.insert_checkpoint(&ckpt).await.unwrap();
        db.insert_sampling_session(&sampling).await.unwrap();
        assert!(db.insert_plugin(&plugin).await.unwrap());
        assert!(
            !db.insert_plugin(&plugin).await.unwrap(),
            "same bytes twice"
        );
        let dup = db.insert_model(&model).await;
        assert!(
            matches!(dup, Err(StoreError::AlreadyExists { .. })),
            "{dup:?}"
        );
        db.close().await;
    }
    let db = Db::open(&path).await.unwrap();
    assert_eq!(db.get_tenant(&t).await.unwrap().name, "Ada");
    let s = db.get_session(&t, &session.id).await.unwrap();
    assert_eq!(s.last_heartbeat, at(2_500));
    let m = db.get_model(&t, &model.id).await.unwrap();
    assert_eq!(m.step, 3);
    assert_eq!(m.newest_checkpoint.as_deref(), Some(ckpt.path.as_str()));
    assert_eq!(m.lora_config, lora());
    assert_eq!(m.session, model.session);
    assert_eq!(m.user_metadata, model.user_metadata);
    assert!(m.loaded);
    assert_eq!(db.get_checkpoint(&t, &ckpt.path).await.unwrap(), ckpt);
    assert_eq!(
        db.list_checkpoints(&t, Some(&model.id)).await.unwrap(),
        vec![ckpt.clone()]
    );
    assert_eq!(db.expired_checkpoints(at(89_999)).await.unwrap().len(), 0);
    assert_eq!(
        db.expired_checkpoints(at(90_000)).await.unwrap(),
        vec![ckpt.clone()]
    );
    assert_eq!(
        db.get_sampling_session(&t, &sampling.id).await.unwrap(),
        sampling
    );
    assert_eq!(db.list_plugins(&t).await.unwrap(), vec![plugin.clone()]);
    assert_eq!(db.list_tenants().await.unwrap().len(), 1);
    assert_eq!(db.list_sessions(&t).await.unwrap(), vec![s.clone()]);
    assert_eq!(
        db.list_sampling_sessions(&t).await.unwrap(),
        vec![sampling.clone()]
    );
    db.set_checkpoint_expiry(&t, &ckpt.path, None)
        .await
        .unwrap();
    assert!(db
        .expired_checkpoints(at(10_000_000_000_000))
        .await
        .unwrap()
        .is_empty());
    db.set_checkpoint_expiry(&t, &ckpt.path, ckpt.expires)
        .await
        .unwrap();

    // Another tenant sees none of it.
    let eve = TenantId::from("tenant-eve");
    assert!(matches!(
        db.get_model(&eve, &model.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(db.get_checkpoint(&eve, &ckpt.path).await.is_err());
    assert!(db.get_sampling_session(&eve, &sampling.id).await.is_err());
    assert!(db.get_session(&eve, &session.id).await.is_err());
    assert!(db.list_models(&eve, true).await.unwrap().is_empty());
    assert!(db.mark_model_deleted(&eve, &model.id).await.is_err());
    let e: loraplex::Error = db
        .get_plugin(&eve, &plugin.content_hash)
        .await
        .unwrap_err()
        .into();
    assert!(matches!(e, loraplex::Error::NotFound { .. }));

    // Deletion.
    db.mark_model_deleted(&t, &model.id).await.unwrap();
    assert!(db.list_models(&t, false).await.unwrap().is_empty());
    assert_eq!(db.list_models(&t, true).await.unwrap().len(), 1);
    assert_eq!(db.delete_checkpoint(&t, &ckpt.path).await.unwrap(), ckpt);
    assert!(db.list_checkpoints(&t, None).await.unwrap().is_empty());
    db.delete_sampling_session(&t, &sampling.id).await.unwrap();
    db.close().await;
}

#[tokio::test]
async fn runs_and_sessions_stay_listed_after_they_end() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("loraplex.db");
    let t = TenantId::from("tenant-a");
    let meta = |k: &str, v: &str| Some(UserMetadata([(k.to_string(), v.to_string())].into()));
    let db = Db::open(&path).await.unwrap();
    for i in 0..3u64 {
        db.insert_session(&SessionRecord {
            id: ClientSessionId(format!("session-{i}")),
            tenant: t.clone(),
            created: at(100 * (i + 1)),
            last_heartbeat: at(100 * (i + 1)),
            user_metadata: meta("i", &i.to_string()),
            display_name: None,
            ended: None,
        })
        .await
        .unwrap();
        db.insert_model(&ModelRecord {
            id: AdapterId(format!("session-{i}:train:0")),
            tenant: t.clone(),
            session: Some(ClientSessionId(format!("session-{i}"))),
            base_model: "base".into(),
            lora_config: lora(),
            step: 0,
            newest_checkpoint: None,
            deleted: false,
            created: at(100 * (i + 1) + 1),
            user_metadata: meta("renderer_name", "role_colon"),
            loaded: true,
            last_request: None,
        })
        .await
        .unwrap();
    }
    // Session 0 ends and its run is unloaded at step 5: both stay listed.
    let s0 = ClientSessionId("session-0".into());
    db.end_session(&t, &s0, at(5_000)).await.unwrap();
    db.mark_model_unloaded(&t, &AdapterId::from("session-0:train:0"), 5, at(4_000))
        .await
        .unwrap();
    db.close().await;

    let db = Db::open(&path).await.unwrap();
    let open: Vec<String> = db
        .list_sessions(&t)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id.0)
        .collect();
    assert_eq!(
        open,
        ["session-1", "session-2"],
        "an ended session is not reopened"
    );
    let (page, total) = db.list_sessions_page(&t, 2, 1).await.unwrap();
    assert_eq!(total, 3);
    let ids: Vec<&str> = page.iter().map(|s| s.id.0.as_str()).collect();
    assert_eq!(
        ids,
        ["session-1", "session-0"],
        "newest first, from the offset"
    );
    assert_eq!(page[1].ended, Some(at(5_000)));
    assert_eq!(page[1].user_metadata, meta("i", "0"));

    let (runs, total) = db.list_models_page(&t, 10, 0).await.unwrap();
    assert_eq!(total, 3);
    assert_eq!(runs[2].id.0, "session-0:train:0");
    assert!(!runs[2].loaded && runs[0].loaded);
    assert_eq!((runs[2].step, runs[2].last_request), (5, Some(at(4_000))));
    assert_eq!(runs[2].user_metadata, meta("renderer_name", "role_colon"));
    let of_s0 = db.list_session_models(&t, &s0).await.unwrap();
    assert_eq!(of_s0.len(), 1);
    // A deleted run leaves every listing.
    db.mark_model_deleted(&t, &AdapterId::from("session-1:train:0"))
        .await
        .unwrap();
    assert_eq!(db.list_models_page(&t, 10, 0).await.unwrap().1, 2);
    let eve = TenantId::from("tenant-eve");
    assert_eq!(db.list_models_page(&eve, 10, 0).await.unwrap().1, 0);
    assert_eq!(db.list_sessions_page(&eve, 10, 0).await.unwrap().1, 0);
    assert!(db
        .mark_model_unloaded(&eve, &AdapterId::from("session-2:train:0"), 1, at(1))
        .await
        .is_err());

    // Checkpoints: the external kind, publishing, user_metadata.
    let ckpt = CheckpointRecord {
        path: "tinker://session-2:train:0/external_weights/final".into(),
        model: AdapterId::from("session-2:train:0"),
        tenant: t.clone(),
        kind: CheckpointKind::External,
        dir: PathBuf::from("/x"),
        size_bytes: 10,
        step: 0,
        created: at(9_000),
        expires: None,
        public: false,
        user_metadata: meta("note", "x"),
    };
    db.insert_checkpoint(&ckpt).await.unwrap();
    db.set_checkpoint_public(&t, &ckpt.path, true)
        .await
        .unwrap();
    assert!(db
        .set_checkpoint_public(&eve, &ckpt.path, false)
        .await
        .is_err());
    let back = db.get_checkpoint(&t, &ckpt.path).await.unwrap();
    assert_eq!(
        back,
        CheckpointRecord {
            public: true,
            ..ckpt
        }
    );
    db.close().await;
}

fn work_result() -> WorkResult {
    let mut metrics = BTreeMap::new();
    metrics.insert("loss:sum".to_string(), 12.5);
    metrics.insert("tokens".to_string(), 7.0);
    WorkResult {
        loss: 12.5,
        metrics,
        logprobs: vec![vec![-0.25, -1.5e-7, -30.125], vec![-2.0]],
        k: vec![1, 1],
        elementwise: Some(vec![vec![0.5, 0.25, 1.0 / 3.0], vec![f32::MIN_POSITIVE]]),
        weight_sum: 3.0,
    }
}

fn every_output() -> Vec<JobOutput> {
    vec![
        JobOutput::ForwardBackward(work_result()),
        JobOutput::ForwardBackward(WorkResult {
            elementwise: None,
            ..work_result()
        }),
        JobOutput::OptimStep(StepReport {
            step: 42,
            grad_norm: 0.1 + 0.2,
            clipped: true,
        }),
        JobOutput::Saved {
            name: "step-42".into(),
        },
        JobOutput::Loaded {
            name: "tinker://model-1/weights/step-42".into(),
            model: AdapterId::from("s:train:1"),
        },
        JobOutput::ModelCreated(AdapterId::from("s:train:2")),
        JobOutput::ModelUnloaded(AdapterId::from("s:train:2")),
        JobOutput::SamplingSession(SessionId::from("sampler-9")),
        JobOutput::Sample(SampleOutput {
            sequences: vec![
                SampledSeq {
                    tokens: vec![1, 2, 49151],
                    logprobs: vec![-0.1, -2.5, -7.75],
                    top_logprobs: vec![vec![(1, -0.1), (5, -3.0)], vec![], vec![(9, -0.5)]],
                    stop_reason: StopReason::Stop,
                },
                SampledSeq {
                    tokens: vec![],
                    logprobs: vec![],
                    top_logprobs: vec![],
                    stop_reason: StopReason::Length,
                },
            ],
            prompt_logprobs: Some(vec![-1.0, -0.5]),
            prompt_top_logprobs: Some(vec![vec![(3, -0.2)], vec![(4, -0.3), (8, -1.3)]]),
            prompt_logprobs_last_n: Some(1),
            target_prompt_logprobs: Some(TargetLogprobs {
                layout: CellLayout {
                    rows: 2,
                    cols: 3,
                    sparse: Some(Csr {
                        crow: vec![0, 1, 1],
                        col: vec![2],
                    }),
                },
                logprobs: vec![-0.75],
            }),
            prompt_alt_tokens: Some(AltTokens {
                k: 1,
                tokens: vec![7, 9],
                logprobs: vec![-1.5, -0.25],
            }),
            prompt_cache_hit_tokens: 1,
            base_model: Some("tiny-a".into()),
        }),
        JobOutput::Sample(SampleOutput {
            sequences: vec![],
            prompt_logprobs: None,
            prompt_top_logprobs: None,
            prompt_logprobs_last_n: None,
            target_prompt_logprobs: None,
            prompt_alt_tokens: None,
            prompt_cache_hit_tokens: 0,
            base_model: None,
        }),
    ]
}

/// Structural equality through the Debug form (JobOutput has no PartialEq); float formatting
/// in Debug is exact (shortest round-trip).
fn same(a: &JobOutput, b: &JobOutput) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn store(path: &std::path::Path) -> SqliteFutureStore {
    SqliteFutureStore::open(path, FutureStoreConfig::default()).unwrap()
}

#[test]
fn every_job_output_round_trips_through_the_database() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let t = TenantId::from("tenant-a");
    let outputs = every_output();
    let mut ids = Vec::new();
    {
        let s = store(&path);
        for o in &outputs {
            let id = FutureId::generate();
            s.insert(FutureRecord::new(
                id.clone(),
                t.clone(),
                JobKind::Forward,
                9,
            ))
            .unwrap();
            s.set_running(&id).unwrap();
            s.add_progress(&id, 4).unwrap();
            s.add_progress(&id, 5).unwrap();
            s.finish(&id, Ok(o.clone())).unwrap();
            ids.push(id);
        }
        let failed = FutureId::generate();
        s.insert(FutureRecord::new(
            failed.clone(),
            t.clone(),
            JobKind::OptimStep,
            0,
        ))
        .unwrap();
        s.finish(
            &failed,
            Err(JobFailure {
                message: "invalid adam_params.beta1: out of range".into(),
                category: Category::User,
            }),
        )
        .unwrap();
        // A second outcome is ignored, in memory and on disk.
        s.finish(&failed, Ok(outputs[2].clone())).unwrap();
        ids.push(failed);
    }
    // A new process: everything comes from the database.
    let s = store(&path);
    assert_eq!(s.recovered(), 0, "nothing was left unfinished");
    for (id, o) in ids.iter().zip(&outputs) {
        let r = s.get(&t, id).unwrap();
        assert_eq!(r.state, JobState::Done);
        assert_eq!(
            r.progress,
            Progress {
                tokens_done: 9,
                tokens_total: 9
            }
        );
        let back = r.output.expect("an output");
        assert!(same(o, &back), "\n{o:?}\n!=\n{back:?}");
    }
    let f = s.get(&t, &ids[outputs.len()]).unwrap();
    assert_eq!(f.state, JobState::Failed);
    assert_eq!(f.kind, JobKind::OptimStep);
    let failure = f.failure.unwrap();
    assert_eq!(failure.category, Category::User);
    assert_eq!(failure.message, "invalid adam_params.beta1: out of range");
    assert!(f.output.is_none());
    // Tenants stay apart after a restart too.
    assert!(s.get(&TenantId::from("tenant-b"), &ids[0]).is_err());
}

#[test]
fn unfinished_futures_fail_when_the_server_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let t = TenantId::from("tenant-a");
    let (pending, running, done) = (
        FutureId::generate(),
        FutureId::generate(),
        FutureId::generate(),
    );
    {
        let s = store(&path);
        for id in [&pending, &running, &done] {
            s.insert(FutureRecord::new(
                id.clone(),
                t.clone(),
                JobKind::ForwardBackward,
                10,
            ))
            .unwrap();
        }
        s.set_running(&running).unwrap();
        s.add_progress(&running, 3).unwrap();
        s.finish(&done, Ok(JobOutput::Saved { name: "x".into() }))
            .unwrap();
        // The process "dies": nothing finishes the other two.
    }
    let s = store(&path);
    assert_eq!(s.recovered(), 2);
    for id in [&pending, &running] {
        let r = s.get(&t, id).unwrap();
        assert_eq!(r.state, JobState::Failed, "{id}");
        let f = r.failure.unwrap();
        assert_eq!(f.category, Category::Server);
        assert_eq!(f.message, RESTARTED_MESSAGE);
        assert!(f.message.contains("restarted"));
    }
    assert_eq!(s.get(&t, &running).unwrap().progress.tokens_done, 3);
    assert_eq!(s.get(&t, &done).unwrap().state, JobState::Done);
    drop(s);
    // Recovery is idempotent: nothing more to fail.
    assert_eq!(store(&path).recovered(), 0);
}

#[test]
fn an_inserted_future_is_committed_before_insert_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let t = TenantId::from("tenant-a");
    let s = store(&path);
    let id = FutureId::generate();
    s.insert(FutureRecord::new(id.clone(), t.clone(), JobKind::Sample, 0))
        .unwrap();
    // Another connection, no flush: the row is already there.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(async {
        let db = Db::open(&path).await.unwrap();
        let f = db.get_future(&t, &id).await.unwrap();
        db.close().await;
        f
    });
    assert_eq!(f.record.state, JobState::Pending);
    assert_eq!(f.record.kind, JobKind::Sample);
    // Write-behind updates land after a flush.
    s.set_running(&id).unwrap();
    s.flush().unwrap();
    let f = rt.block_on(async {
        let db = Db::open(&path).await.unwrap();
        db.get_future(&t, &id).await.unwrap()
    });
    assert_eq!(f.record.state, JobState::Running);

    // What an acknowledged insert costs (one commit with fsync, one at a time).
    let n = 100;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        s.insert(FutureRecord::new(
            FutureId::generate(),
            t.clone(),
            JobKind::Forward,
            0,
        ))
        .unwrap();
    }
    println!(
        "sequential durable insert: {:.2} ms each",
        t0.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

#[test]
fn a_result_json_cannot_hold_fails_cleanly_after_a_restart() {
    // JSON has no NaN: a non-finite metric is written as null and cannot be read back as a
    // number. The live process still serves the exact value from memory; after a restart
    // the future reads as failed (server), and other futures are unaffected.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let t = TenantId::from("tenant-a");
    let id = FutureId::generate();
    let mut r = work_result();
    r.metrics.insert("ratio".into(), f64::NAN);
    {
        let s = store(&path);
        s.insert(FutureRecord::new(
            id.clone(),
            t.clone(),
            JobKind::ForwardBackward,
            0,
        ))
        .unwrap();
        s.finish(&id, Ok(JobOutput::ForwardBackward(r))).unwrap();
        match s.get(&t, &id).unwrap().output.as_deref() {
            Some(JobOutput::ForwardBackward(w)) => assert!(w.metrics["ratio"].is_nan()),
            o => panic!("{o:?}"),
        }
    }
    let s = store(&path);
    let back = s.get(&t, &id).unwrap();
    assert_eq!(back.state, JobState::Failed);
    let f = back.failure.unwrap();
    assert_eq!(f.category, Category::Server);
    assert!(f.message.contains("cannot be read"), "{}", f.message);
}

#[test]
fn results_expire_a_while_after_they_are_first_fetched() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let t = TenantId::from("tenant-a");
    let cfg = FutureStoreConfig {
        result_ttl: Duration::from_millis(1500),
        sweep_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let s = SqliteFutureStore::open(&path, cfg).unwrap();
    let (fetched, unfetched, pending) = (
        FutureId::generate(),
        FutureId::generate(),
        FutureId::generate(),
    );
    for id in [&fetched, &unfetched, &pending] {
        s.insert(FutureRecord::new(
            id.clone(),
            t.clone(),
            JobKind::Forward,
            0,
        ))
        .unwrap();
    }
    for id in [&fetched, &unfetched] {
        s.finish(id, Ok(JobOutput::Saved { name: "n".into() }))
            .unwrap();
    }
    // Reading a finished future is its first fetch; reading an unfinished one is not.
    assert_eq!(s.get(&t, &fetched).unwrap().state, JobState::Done);
    s.mark_fetched(&t, &pending).unwrap();
    assert_eq!(s.expire().unwrap(), 0, "too early");
    std::thread::sleep(Duration::from_millis(1600));
    // Past its time: gone for callers before the sweep, and a second fetch does not
    // extend it.
    assert!(matches!(
        s.mark_fetched(&t, &fetched),
        Err(loraplex::Error::NotFound { .. })
    ));
    assert_eq!(s.expire().unwrap(), 1);
    assert!(matches!(
        s.get(&t, &fetched),
        Err(loraplex::Error::NotFound { .. })
    ));
    assert_eq!(s.get(&t, &pending).unwrap().state, JobState::Pending);
    drop(s);
    // Gone from the database as well; the unfetched one stays until read.
    let s = store(&path);
    assert!(s.get(&t, &fetched).is_err());
    assert_eq!(s.get(&t, &unfetched).unwrap().state, JobState::Done);
}

#[test]
fn unread_results_expire_and_the_in_memory_map_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let t = TenantId::from("tenant-a");
    let cfg = FutureStoreConfig {
        unread_ttl: Duration::from_secs(3),
        sweep_interval: Duration::from_secs(3600),
        max_records: 10,
        ..Default::default()
    };
    let s = SqliteFutureStore::open(&path, cfg).unwrap();
    let ids: Vec<FutureId> = (0..40).map(|_| FutureId::generate()).collect();
    for id in &ids {
        s.insert(FutureRecord::new(
            id.clone(),
            t.clone(),
            JobKind::Forward,
            0,
        ))
        .unwrap();
        s.finish(id, Ok(JobOutput::Saved { name: "n".into() }))
            .unwrap();
        assert!(s.cached_len() <= 10, "{} futures in memory", s.cached_len());
    }
    // Evicted from memory, still in the database; read, so it waits for result_ttl.
    assert_eq!(s.get(&t, &ids[0]).unwrap().state, JobState::Done);
    assert!(s.cached_len() <= 10);
    std::thread::sleep(Duration::from_millis(3_100));
    assert_eq!(s.expire().unwrap(), 39, "every future nobody read");
    assert!(matches!(
        s.get(&t, &ids[1]),
        Err(loraplex::Error::NotFound { .. })
    ));
    assert_eq!(s.get(&t, &ids[0]).unwrap().state, JobState::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_on_the_sqlite_store_and_its_results_outlive_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let model = Arc::new(tiny(DType::F32));
    let v = model.config.vocab_size;
    let store = Arc::new(store(&path));
    let m2 = model.clone();
    let engine = Engine::start_with_store(
        EngineConfig::default(),
        Arc::new(move || Ok(m2.clone())),
        store.clone(),
    )
    .unwrap();
    let t = TenantId::from("tenant-a");
    let id = engine
        .create_model(
            &t,
            LoraConfig::from_tinker(4, 1, true, true, false).unwrap(),
        )
        .await
        .unwrap();
    let mut rng = SplitMix64::new(5);
    let data: Vec<Datum> = (0..3)
        .map(|_| Datum::next_token(&tokens(&mut rng, 8, v), 2))
        .collect();
    let fb = engine
        .submit(
            &t,
            &id,
            Some(0),
            Op::ForwardBackward(FbRequest {
                data,
                loss: Arc::new(BuiltinLoss::CrossEntropy),
                loss_config: Default::default(),
            }),
        )
        .await
        .unwrap();
    let step = engine
        .submit(&t, &id, Some(1), Op::OptimStep(AdamParams::default()))
        .await
        .unwrap();
    let out = engine
        .result(&t, &fb, Duration::from_secs(60))
        .await
        .unwrap();
    engine
        .result(&t, &step, Duration::from_secs(60))
        .await
        .unwrap();
    let loss = match &*out {
        JobOutput::ForwardBackward(r) => r.loss,
        o => panic!("{o:?}"),
    };
    drop(engine);
    store.flush().unwrap();
    // What a restarted server reads back.
    let db = Db::open(&path).await.unwrap();
    let f = db.get_future(&t, &fb).await.unwrap();
    assert_eq!(f.record.state, JobState::Done);
    assert!(f.finished.is_some());
    match f.record.output.as_deref() {
        Some(JobOutput::ForwardBackward(r)) => assert_eq!(r.loss, loss),
        o => panic!("{o:?}"),
    }
    let s = db.get_future(&t, &step).await.unwrap();
    match s.record.output.as_deref() {
        Some(JobOutput::OptimStep(r)) => assert_eq!(r.step, 1),
        o => panic!("{o:?}"),
    }
}

// ---- SIGKILL after acknowledged inserts ----

const CHILD_DB: &str = "LORAPLEX_TEST_DB_CHILD_PATH";

/// Not a test on its own: the child process of
/// `acknowledged_futures_survive_sigkill_and_fail_after_restart`. Without its env var it
/// returns at once.
#[test]
fn child_inserts_futures_until_killed() {
    use std::io::Write;
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let s = store(std::path::Path::new(&path));
    let t = TenantId::from("tenant-a");
    let mut out = std::io::stdout();
    loop {
        let id = FutureId::generate();
        s.insert(FutureRecord::new(
            id.clone(),
            t.clone(),
            JobKind::Forward,
            5,
        ))
        .unwrap();
        s.set_running(&id).unwrap(); // written behind: may or may not land
                                     // Only now is the id "acknowledged to a client".
        writeln!(out, "ack {id}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn acknowledged_futures_survive_sigkill_and_fail_after_restart() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite");
    let exe = std::env::current_exe().unwrap();
    let t = TenantId::from("tenant-a");
    let mut rng = SplitMix64::new(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    for round in 0..3 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "child_inserts_futures_until_killed",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let want = 20 + (rng.next_u64() % 200) as usize;
        let mut acked = Vec::new();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        while acked.len() < want {
            let line = lines.next().expect("the child stopped early").unwrap();
            if let Some(id) = line.strip_prefix("ack ") {
                acked.push(FutureId::from(id));
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let s = store(&path);
        assert!(
            s.recovered() >= acked.len() as u64,
            "round {round}: {} recovered, {} acknowledged",
            s.recovered(),
            acked.len()
        );
        for id in &acked {
            let r = s
                .get(&t, id)
                .unwrap_or_else(|e| panic!("round {round}: {id} lost: {e}"));
            assert_eq!(r.state, JobState::Failed);
            assert_eq!(r.failure.unwrap().message, RESTARTED_MESSAGE);
        }
        println!(
            "round {round}: killed after {} acknowledged inserts; all in the database, {} \
             unfinished futures failed",
            acked.len(),
            s.recovered()
        );
    }
}
