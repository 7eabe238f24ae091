//! Checkpoint files: a saved adapter loads back bit for bit (weights, AdamW moments, step);
//! training resumed from a checkpoint follows exactly the path of training never
//! interrupted; a checkpoint killed mid-write (a real child process, SIGKILL) is never seen
//! half-written, and its leftovers are swept when the store opens.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::jobs::{AdapterId, TenantId};
use loraplex::lora::optim::{AdamParams, AdamState, Moments};
use loraplex::lora::{LoraConfig, LoraWeights, Target};
use loraplex::model::{BaseModel, LlamaConfig};
use loraplex::store::checkpoint::{self, CheckpointKind, CheckpointStore};
use loraplex::store::StoreError;
use loraplex::train::loss::{BuiltinLoss, LossConfig};
use loraplex::train::{check_data, forward_backward, Datum, TrainableAdapter, Work};
use loraplex::util::SplitMix64;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn bits(t: &Tensor) -> Vec<u32> {
    flat(t).iter().map(|x| x.to_bits()).collect()
}

fn adam() -> AdamParams {
    AdamParams {
        learning_rate: 0.05,
        weight_decay: 0.01,
        ..Default::default()
    }
}

/// One forward_backward + optim_step on `a` with batch `step` of a fixed data stream.
fn train_step(model: &BaseModel, a: &mut TrainableAdapter, step: u64) {
    let mut rng = SplitMix64::new(1000 + step);
    let v = model.config.vocab_size;
    let data: Vec<Datum> = (0..2)
        .map(|_| Datum::next_token(&tokens(&mut rng, 9, v), 3))
        .collect();
    let data = check_data(model, data).unwrap();
    let lc = LossConfig::new();
    let (r, g) = forward_backward(
        model,
        &[&a.weights],
        &[Work {
            adapter: Some(0),
            data: &data,
            loss: &BuiltinLoss::CrossEntropy,
            config: &lc,
        }],
        false,
    )
    .unwrap();
    r.into_iter().next().unwrap().unwrap();
    a.accumulate(g.into_iter().next().unwrap()).unwrap();
    a.optim_step(&adam()).unwrap();
}

fn assert_same_adapter(a: &TrainableAdapter, b: &TrainableAdapter) {
    assert_eq!(a.weights.config, b.weights.config);
    assert_eq!(a.weights.scale, b.weights.scale);
    assert_eq!(
        a.weights.pairs.keys().collect::<Vec<_>>(),
        b.weights.pairs.keys().collect::<Vec<_>>()
    );
    for (site, p) in &a.weights.pairs {
        let q = &b.weights.pairs[site];
        assert_eq!(bits(&p.a), bits(&q.a), "{site:?} A differs");
        assert_eq!(bits(&p.b), bits(&q.b), "{site:?} B differs");
    }
    assert_eq!(a.optim.step, b.optim.step);
    assert_eq!(
        a.optim.moments.keys().collect::<Vec<_>>(),
        b.optim.moments.keys().collect::<Vec<_>>()
    );
    for (k, m) in &a.optim.moments {
        let n = &b.optim.moments[k];
        assert_eq!(bits(&m.m), bits(&n.m), "{k:?} first moment differs");
        assert_eq!(bits(&m.v), bits(&n.v), "{k:?} second moment differs");
    }
}

fn ids() -> (TenantId, AdapterId) {
    (TenantId::from("tenant-a"), AdapterId::from("model-1"))
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn training_checkpoint_round_trips_bit_for_bit() {
    let model = tiny(DType::F32);
    let mut a = TrainableAdapter::new(random_adapter(&model, 3, 4, true));
    for s in 0..2 {
        train_step(&model, &mut a, s);
    }
    assert_eq!(a.optim.step, 2);
    assert!(!a.optim.moments.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let (store, swept) = CheckpointStore::open(tmp.path()).unwrap();
    assert_eq!(swept, 0);
    let (t, m) = ids();
    let (dir, meta) = store
        .save(&t, &m, CheckpointKind::Training, "step-2", &a)
        .unwrap();
    assert_eq!(meta.step, 2);
    assert_eq!(meta.kind, CheckpointKind::Training);
    assert_eq!(meta.num_params, a.weights.num_params());
    assert_eq!(
        meta.size_bytes,
        dir_size(&dir),
        "recorded size is the size on disk"
    );

    let back = store
        .load(&t, &m, CheckpointKind::Training, "step-2", &Device::Cpu)
        .unwrap();
    back.check_model(&model.config).unwrap();
    assert_eq!(back.meta, meta);
    assert_same_adapter(&a, &back.into_trainable());

    // Another model's shape is refused.
    let mut other = LlamaConfig::tiny();
    other.num_layers = 3;
    let back = checkpoint::read_checkpoint(&dir, &Device::Cpu).unwrap();
    assert!(back.check_model(&other).is_err());
    // A name is saved once.
    let again = store.save(&t, &m, CheckpointKind::Training, "step-2", &a);
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "{again:?}"
    );
}

#[test]
fn training_resumed_from_a_checkpoint_matches_training_never_stopped() {
    let model = tiny(DType::F32);
    let start = TrainableAdapter::new(random_adapter(&model, 5, 3, true));
    let mut straight = start.clone();
    for s in 0..5 {
        train_step(&model, &mut straight, s);
    }

    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = CheckpointStore::open(tmp.path()).unwrap();
    let (t, m) = ids();
    let mut first = start.clone();
    for s in 0..2 {
        train_step(&model, &mut first, s);
    }
    store
        .save(&t, &m, CheckpointKind::Training, "mid", &first)
        .unwrap();
    drop(first);
    let mut resumed = store
        .load(&t, &m, CheckpointKind::Training, "mid", &Device::Cpu)
        .unwrap()
        .into_trainable();
    for s in 2..5 {
        train_step(&model, &mut resumed, s);
    }
    assert_same_adapter(&straight, &resumed);
    // And training did move the weights.
    let moved = straight
        .weights
        .pairs
        .values()
        .zip(start.weights.pairs.values())
        .map(|(p, q)| max_abs_diff(&flat(&p.b), &flat(&q.b)))
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "training moved B by {moved}");
}

#[test]
fn sampler_checkpoint_holds_weights_only() {
    let model = tiny(DType::F32);
    let mut a = TrainableAdapter::new(random_adapter(&model, 9, 2, false));
    train_step(&model, &mut a, 0);
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = CheckpointStore::open(tmp.path()).unwrap();
    let (t, m) = ids();
    let (dir, meta) = store
        .save(&t, &m, CheckpointKind::Sampler, "s1", &a)
        .unwrap();
    assert_eq!(meta.step, 1);
    assert!(!dir.join(checkpoint::OPTIM_FILE).exists());
    let back = store
        .load(&t, &m, CheckpointKind::Sampler, "s1", &Device::Cpu)
        .unwrap();
    assert!(back.optim.is_none());
    for (site, p) in &a.weights.pairs {
        assert_eq!(bits(&p.b), bits(&back.weights.pairs[site].b));
    }
    // Kinds live apart; list and delete.
    assert!(matches!(
        store.load(&t, &m, CheckpointKind::Training, "s1", &Device::Cpu),
        Err(StoreError::NotFound { .. })
    ));
    let names: Vec<String> = store
        .list(&t, &m, CheckpointKind::Sampler)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["s1"]);
    store.delete(&t, &m, CheckpointKind::Sampler, "s1").unwrap();
    assert!(store
        .list(&t, &m, CheckpointKind::Sampler)
        .unwrap()
        .is_empty());
    assert!(!dir.exists());
}

#[test]
fn bad_names_and_corrupt_files_are_refused() {
    let model = tiny(DType::F32);
    let a = TrainableAdapter::new(random_adapter(&model, 1, 2, false));
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = CheckpointStore::open(tmp.path()).unwrap();
    let (t, m) = ids();
    for bad in ["", "../x", ".hidden", "a/b", "ok?"] {
        let r = store.save(&t, &m, CheckpointKind::Sampler, bad, &a);
        assert!(
            matches!(r, Err(StoreError::Invalid { .. })),
            "{bad:?}: {r:?}"
        );
    }
    let (dir, _) = store
        .save(&t, &m, CheckpointKind::Sampler, "c", &a)
        .unwrap();
    let f = dir.join(checkpoint::WEIGHTS_FILE);
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    let r = store.load(&t, &m, CheckpointKind::Sampler, "c", &Device::Cpu);
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
}

#[test]
fn leftover_temporaries_are_never_checkpoints_and_are_swept_at_open() {
    let model = tiny(DType::F32);
    let a = TrainableAdapter::new(random_adapter(&model, 1, 2, false));
    let tmp = tempfile::tempdir().unwrap();
    let (t, m) = ids();
    let kind_dir;
    {
        let (store, _) = CheckpointStore::open(tmp.path()).unwrap();
        let (dir, _) = store
            .save(&t, &m, CheckpointKind::Sampler, "done", &a)
            .unwrap();
        kind_dir = dir.parent().unwrap().to_owned();
        // What a crash leaves: a complete-looking temporary and a half-deleted one.
        let fake = kind_dir.join(".tmp-half-1-2");
        std::fs::create_dir(&fake).unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), fake.join(f.file_name())).unwrap();
        }
        std::fs::create_dir(kind_dir.join(".del-old-3")).unwrap();
        let names: Vec<String> = store
            .list(&t, &m, CheckpointKind::Sampler)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["done"], "temporaries are not listed");
        assert!(!checkpoint::is_checkpoint_dir(&fake));
    }
    let (store, swept) = CheckpointStore::open(tmp.path()).unwrap();
    assert_eq!(swept, 2);
    let left: Vec<String> = std::fs::read_dir(&kind_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["done"]);
    store
        .load(&t, &m, CheckpointKind::Sampler, "done", &Device::Cpu)
        .unwrap();
}

// ---- SIGKILL during saves ----

const CHILD_ROOT: &str = "LORAPLEX_TEST_CKPT_CHILD_ROOT";
const CHILD_START: &str = "LORAPLEX_TEST_CKPT_CHILD_START";

/// A model shape big enough that one save takes a few milliseconds.
fn kill_model() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 1024,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        ..LlamaConfig::tiny()
    }
}

/// Checkpoint number `i`: everything in it derives from `i`, so a reader can check it.
fn numbered_adapter(i: u64) -> TrainableAdapter {
    let cfg = LoraConfig {
        rank: 16,
        alpha: 32.0,
        seed: i,
        targets: Target::ALL.to_vec(),
        train_unembed: true,
    };
    let mut w = LoraWeights::init(&cfg, &kill_model(), &Device::Cpu).unwrap();
    let mut rng = SplitMix64::new(i ^ 0xABCD);
    let mut rand = |t: &Tensor| {
        let dims = t.dims().to_vec();
        let v: Vec<f32> = (0..t.elem_count()).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    };
    let mut optim = AdamState {
        step: i,
        ..Default::default()
    };
    for (site, p) in w.pairs.iter_mut() {
        p.b = rand(&p.b);
        for (which, t) in [(0u8, &p.a), (1u8, &p.b)] {
            let m = rand(t);
            let v = rand(t).abs().unwrap();
            optim.moments.insert((*site, which), Moments { m, v });
        }
    }
    let mut a = TrainableAdapter::new(w);
    a.optim = optim;
    a
}

/// Not a test on its own: the child process of
/// `sigkill_during_saves_never_leaves_a_half_checkpoint`, which runs this test binary with
/// the env vars set. Without them it returns at once.
#[test]
fn child_saves_checkpoints_until_killed() {
    let Some(root) = std::env::var_os(CHILD_ROOT) else {
        return;
    };
    let start: u64 = std::env::var(CHILD_START).unwrap().parse().unwrap();
    let (store, _) = CheckpointStore::open(root).unwrap();
    let (t, m) = ids();
    for i in start.. {
        let a = numbered_adapter(i);
        store
            .save(&t, &m, CheckpointKind::Training, &format!("c{i:06}"), &a)
            .unwrap();
        println!("saved {i}");
    }
}

#[test]
fn sigkill_during_saves_never_leaves_a_half_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let (t, m) = ids();
    let mut rng = SplitMix64::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut next = 0u64;
    let mut rounds_with_temporaries = 0;
    let mut verified = 0;
    for round in 0..12 {
        let mut child = Command::new(&exe)
            .args([
                "child_saves_checkpoints_until_killed",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ROOT, tmp.path())
            .env(CHILD_START, next.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this child has saved once (so every round makes progress however
        // slow the machine), then kill it at a random moment of its save loop.
        let kind_dir = tmp.path().join("tenant-a/model-1/weights");
        let first = kind_dir.join(format!("c{next:06}"));
        let t0 = std::time::Instant::now();
        while !first.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the child never saved"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let ms = rng.next_u64() % 250;
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().unwrap(); // SIGKILL on Unix
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: the child was killed");

        // Before any cleanup: every entry under its real name is a complete checkpoint.
        let mut temporaries = 0;
        {
            for e in std::fs::read_dir(&kind_dir).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    temporaries += 1;
                    assert!(!checkpoint::is_checkpoint_dir(&e.path()));
                    continue;
                }
                let i: u64 = name.trim_start_matches('c').parse().unwrap();
                let c = checkpoint::read_checkpoint(&e.path(), &Device::Cpu)
                    .unwrap_or_else(|e| panic!("round {round}: {name} does not load: {e}"));
                assert_same_adapter(&numbered_adapter(i), &c.into_trainable());
                verified += 1;
                next = next.max(i + 1);
            }
        }
        if temporaries > 0 {
            rounds_with_temporaries += 1;
        }
        let (store, swept) = CheckpointStore::open(tmp.path()).unwrap();
        assert_eq!(
            swept, temporaries,
            "round {round}: every temporary is swept"
        );
        let listed = store.list(&t, &m, CheckpointKind::Training).unwrap();
        assert_eq!(
            listed.len() as u64,
            next,
            "round {round}: checkpoints 0..{next}"
        );
        println!(
            "round {round}: killed {ms} ms after its first save, {next} checkpoints, \
             {temporaries} temporaries swept"
        );
    }
    println!(
        "{verified} checkpoint loads verified; {rounds_with_temporaries}/12 kills landed mid-write"
    );
    assert!(next >= 12, "every round saved at least once");
}

#[test]
fn tinker_paths_name_a_model_kind_and_checkpoint() {
    let m = AdapterId::from("model-00ab");
    for kind in [CheckpointKind::Training, CheckpointKind::Sampler] {
        let p = checkpoint::tinker_path(&m, kind, "step-7");
        assert_eq!(
            checkpoint::parse_tinker_path(&p).unwrap(),
            (m.clone(), kind, "step-7".to_string())
        );
    }
    assert_eq!(
        checkpoint::tinker_path(&m, CheckpointKind::Sampler, "s"),
        "tinker://model-00ab/sampler_weights/s"
    );
    for bad in [
        "model-1/weights/x",
        "tinker://model-1/other/x",
        "tinker://model-1/weights/../x",
        "tinker://model-1/weights",
        "tinker://../weights/x",
    ] {
        assert!(checkpoint::parse_tinker_path(bad).is_err(), "{bad}");
    }
}
