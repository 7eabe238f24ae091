//! Hostile plugins fail only their own call, with an error that says what
//! happened; the host lives on, and a well-behaved call running at the same
//! time on another thread returns its correct result.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use loraplex::plugins::{
    ConfigValue, LossDatum, LossOutput, NamedTensor, PluginError, PluginHost, PluginId, PluginKind,
    PluginLimits, SamplerChoice,
};

const LOSS_DEADLINE: Duration = Duration::from_millis(400);
const MEMORY: usize = 16 << 20;

fn host() -> &'static PluginHost {
    static HOST: OnceLock<PluginHost> = OnceLock::new();
    HOST.get_or_init(|| {
        let limits = PluginLimits {
            loss_deadline: LOSS_DEADLINE,
            memory_bytes: MEMORY,
            ..PluginLimits::default()
        };
        PluginHost::new(limits, None).expect("plugin host")
    })
}

fn load(name: &str) -> PluginId {
    host().load(&common::component(name)).expect("load").0
}

/// Loads (and, the first time, builds) what the timed tests use.
fn preload() {
    for name in ["dro", "min-p", "hostile-loss", "hostile-sampler"] {
        load(name);
    }
}

fn mode(m: &str) -> BTreeMap<String, ConfigValue> {
    BTreeMap::from([("mode".to_string(), ConfigValue::Text(m.to_string()))])
}

fn batch() -> Vec<LossDatum> {
    (0..3)
        .map(|i| {
            let n = 4 + i;
            LossDatum {
                logprobs: (0..n).map(|t| -0.1 * (t + 1) as f32).collect(),
                inputs: vec![
                    NamedTensor::f32("logprobs", vec![-0.2; n]),
                    NamedTensor::f32("advantages", vec![1.0; n]),
                ],
            }
        })
        .collect()
}

/// Runs `hostile` while another thread keeps computing a good loss (dro) and
/// decoding with a good sampler, checking every result. Returns the hostile
/// call's result.
fn while_neighbours_work<T: Send>(hostile: impl FnOnce() -> T + Send) -> T {
    let dro = load("dro");
    let min_p = load("min-p");
    let data = batch();
    let want = host()
        .compute_loss(&dro, &data, &BTreeMap::new())
        .expect("baseline dro");
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let neighbour = s.spawn(|| {
            let mut calls = 0;
            let greedy = BTreeMap::from([("temperature".to_string(), ConfigValue::Number(0.0))]);
            let mut logits = vec![0.0f32; 100];
            logits[42] = 5.0;
            loop {
                let got = host()
                    .compute_loss(&dro, &data, &BTreeMap::new())
                    .expect("a neighbour's loss must succeed");
                assert_eq!(got, want);
                let mut sampler = host()
                    .new_sampler(&min_p, &[1], &greedy, 100)
                    .expect("a neighbour's sampler must start");
                assert_eq!(
                    sampler.step(&logits, &[], 9).expect("neighbour step"),
                    SamplerChoice::Token(42)
                );
                calls += 1;
                if done.load(Ordering::SeqCst) && calls >= 3 {
                    return calls;
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        let result = hostile();
        done.store(true, Ordering::SeqCst);
        let calls = neighbour.join().expect("neighbour thread");
        assert!(calls >= 3);
        result
    })
}

fn hostile_loss(m: &str) -> Result<LossOutput, PluginError> {
    let id = load("hostile-loss");
    let data = batch();
    while_neighbours_work(|| host().compute_loss(&id, &data, &mode(m)))
}

/// The hostile component itself still works after its call failed.
fn still_works() {
    let id = load("hostile-loss");
    let out = host()
        .compute_loss(&id, &batch(), &mode("ok"))
        .expect("the same plugin, well-behaved");
    let want: f64 = batch()
        .iter()
        .flat_map(|d| d.logprobs.clone())
        .map(|x| -(x as f64))
        .sum();
    assert!((out.loss - want).abs() < 1e-6);
}

#[test]
fn an_infinite_loop_hits_the_deadline() {
    preload(); // building and compiling are not part of the timing
    let t0 = Instant::now();
    let err = hostile_loss("loop").expect_err("loop");
    let took = t0.elapsed();
    assert!(
        matches!(err, PluginError::Timeout { deadline } if deadline == LOSS_DEADLINE),
        "{err}"
    );
    assert!(took >= LOSS_DEADLINE, "stopped early: {took:?}");
    assert!(took < LOSS_DEADLINE * 5, "stopped late: {took:?}");
    still_works();
}

#[test]
fn a_memory_bomb_hits_the_memory_cap() {
    let err = hostile_loss("memory").expect_err("memory bomb");
    assert!(
        matches!(err, PluginError::MemoryLimit { limit_bytes } if limit_bytes == MEMORY),
        "{err}"
    );
    still_works();
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let err = hostile_loss("recursion").expect_err("recursion");
    assert!(matches!(err, PluginError::StackOverflow), "{err}");
    still_works();
}

#[test]
fn a_panic_is_a_trap_that_carries_the_panic_message() {
    let err = hostile_loss("panic").expect_err("panic");
    match &err {
        PluginError::Trap { message } => {
            assert!(
                message.contains("hostile loss panicked on purpose"),
                "{message}"
            )
        }
        other => panic!("unexpected {other}"),
    }
    still_works();
}

fn assert_bad_output(m: &str, needle: &str) {
    let err = hostile_loss(m).expect_err(m);
    match &err {
        PluginError::BadOutput { what } => assert!(what.contains(needle), "{m}: {what}"),
        other => panic!("{m}: unexpected {other}"),
    }
}

#[test]
fn malformed_outputs_are_refused_with_what_was_wrong() {
    assert_bad_output(
        "grad-len",
        "gradient of datum 0 has 3 values, its logprobs have 4",
    );
    assert_bad_output("missing-grads", "gradients for 2 datums, the batch has 3");
    assert_bad_output("nan-grad", "is NaN");
    assert_bad_output("inf-loss", "loss is inf");
    assert_bad_output("huge-metrics", "metrics, the limit is 1024");
    assert_bad_output("bad-metric-name", "`accuracy` is not `name:reduction`");
    still_works();
}

#[test]
fn a_plugins_own_error_is_passed_on() {
    let err = hostile_loss("user-error").expect_err("user error");
    assert!(
        matches!(&err, PluginError::PluginFailed { message } if message.contains("on purpose")),
        "{err}"
    );
}

#[test]
fn stderr_floods_are_contained() {
    let out = hostile_loss("stderr-spam").expect("stderr is bounded, not fatal");
    assert!(out.loss.is_finite());
}

#[test]
fn the_sandbox_has_no_env_files_network_or_clocks() {
    let out = hostile_loss("probe-sandbox").expect("probe");
    let m = &out.metrics;
    assert_eq!(m["env_and_args:sum"], 0.0, "{m:?}");
    assert_eq!(m["file_opened:sum"], 0.0, "{m:?}");
    assert_eq!(m["net_connected:sum"], 0.0, "{m:?}");
    assert_eq!(m["wall_clock_secs:max"], 0.0, "{m:?}");
    assert_eq!(m["monotonic_elapsed_secs:max"], 0.0, "{m:?}");
}

#[test]
fn components_of_the_wrong_world_are_refused() {
    // A command component (wasi:cli/run) is not a plugin.
    let err = host()
        .load(&common::component("not-a-plugin"))
        .expect_err("not a plugin");
    match &err {
        PluginError::WrongWorld { found, .. } => assert!(found.contains("wasi:cli/run"), "{found}"),
        other => panic!("unexpected {other}"),
    }
    // A core module and garbage are not components.
    for bytes in [&b"\0asm\x01\0\0\0"[..], b"\x7fELF garbage"] {
        let err = host().load(bytes).expect_err("not a component");
        assert!(matches!(err, PluginError::InvalidComponent { .. }), "{err}");
    }
    // A sampler where a loss is expected, and the other way round.
    let sampler = load("min-p");
    let err = host()
        .compute_loss(&sampler, &batch(), &BTreeMap::new())
        .expect_err("sampler as loss");
    assert!(
        matches!(&err, PluginError::WrongWorld { expected, found }
            if expected == PluginKind::Loss.world() && found == PluginKind::Sampler.world()),
        "{err}"
    );
    let loss = load("dro");
    let err = host()
        .new_sampler(&loss, &[], &BTreeMap::new(), 10)
        .err()
        .expect("loss as sampler");
    assert!(matches!(err, PluginError::WrongWorld { .. }), "{err}");
    // An id that was never loaded.
    let err = host()
        .compute_loss(&PluginId("0".repeat(64)), &batch(), &BTreeMap::new())
        .expect_err("unknown");
    assert!(matches!(err, PluginError::UnknownPlugin(_)), "{err}");
}

fn hostile_sampler(
    config: &[(&str, ConfigValue)],
) -> Result<loraplex::plugins::SamplerSession, PluginError> {
    let id = load("hostile-sampler");
    let cfg = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    host().new_sampler(&id, &[1, 2, 3], &cfg, 50)
}

#[test]
fn a_sampler_returning_a_token_outside_the_vocabulary_is_refused() {
    let mut s = hostile_sampler(&[("mode", "out-of-vocab".into()), ("after", 1.0.into())])
        .expect("session");
    let logits = vec![0.0; 50];
    assert_eq!(
        s.step(&logits, &[], 0).expect("first step is fine"),
        SamplerChoice::Token(0)
    );
    let err = while_neighbours_work(|| s.step(&logits, &[0], 0)).expect_err("token 50");
    assert!(
        matches!(&err, PluginError::BadOutput { what } if what.contains("token id 50 is outside the vocabulary of 50")),
        "{err}"
    );
    // The session is closed; the error says why.
    let err = s.step(&logits, &[0], 0).expect_err("closed");
    assert!(matches!(err, PluginError::SessionClosed { .. }), "{err}");
}

#[test]
fn a_sampler_step_that_loops_hits_the_step_deadline() {
    let mut s =
        hostile_sampler(&[("mode", "loop".into()), ("after", 2.0.into())]).expect("session");
    let logits = vec![0.0; 50];
    assert!(s.step(&logits, &[], 0).is_ok());
    assert!(s.step(&logits, &[0], 0).is_ok());
    let t0 = Instant::now();
    let err = while_neighbours_work(|| s.step(&logits, &[0, 0], 0)).expect_err("loop");
    let took = t0.elapsed();
    assert!(
        matches!(err, PluginError::Timeout { deadline } if deadline == Duration::from_millis(50)),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn a_sampler_panic_or_memory_bomb_fails_only_its_session() {
    let logits = vec![0.0; 50];
    let mut panicking = hostile_sampler(&[("mode", "panic".into())]).expect("session");
    let mut bomb = hostile_sampler(&[("mode", "memory".into())]).expect("session");
    let mut fine = hostile_sampler(&[("mode", "ok".into())]).expect("session");
    let err = while_neighbours_work(|| panicking.step(&logits, &[], 0)).expect_err("panic");
    assert!(
        matches!(&err, PluginError::Trap { message } if message.contains("panicked on purpose")),
        "{err}"
    );
    let err = while_neighbours_work(|| bomb.step(&logits, &[], 0)).expect_err("bomb");
    assert!(matches!(err, PluginError::MemoryLimit { .. }), "{err}");
    let mut l = logits.clone();
    l[7] = 1.0;
    assert_eq!(
        fine.step(&l, &[], 0).expect("fine"),
        SamplerChoice::Token(7)
    );
    let err = hostile_sampler(&[("mode", "fail-create".into())])
        .err()
        .expect("create fails");
    assert!(matches!(err, PluginError::PluginFailed { .. }), "{err}");
}

#[test]
fn the_caller_gets_bad_input_for_wrong_logits_or_prompt() {
    let mut s = hostile_sampler(&[]).expect("session");
    let err = s.step(&[0.0; 49], &[], 0).expect_err("short logits");
    assert!(matches!(err, PluginError::BadInput { .. }), "{err}");
    // A caller mistake does not close the session.
    assert!(s.step(&[0.0; 50], &[], 0).is_ok());
    let id = load("hostile-sampler");
    let err = host()
        .new_sampler(&id, &[50], &BTreeMap::new(), 50)
        .err()
        .expect("prompt");
    assert!(matches!(err, PluginError::BadInput { .. }), "{err}");
}

#[test]
fn open_sessions_are_capped_by_the_instance_pool() {
    let limits = PluginLimits {
        max_instances: 2,
        ..PluginLimits::default()
    };
    let small = PluginHost::new(limits, None).expect("host");
    let (id, _) = small.load(&common::component("min-p")).expect("load");
    let a = small
        .new_sampler(&id, &[], &BTreeMap::new(), 10)
        .expect("first");
    let _b = small
        .new_sampler(&id, &[], &BTreeMap::new(), 10)
        .expect("second");
    let err = small
        .new_sampler(&id, &[], &BTreeMap::new(), 10)
        .err()
        .expect("third is over the pool");
    assert!(matches!(err, PluginError::Capacity { .. }), "{err}");
    drop(a);
    small
        .new_sampler(&id, &[], &BTreeMap::new(), 10)
        .expect("a slot was freed");
}

#[test]
fn a_plugin_cannot_sleep_in_the_host() {
    preload();
    let t0 = Instant::now();
    let err = hostile_loss("sleep").expect_err("sleep");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        matches!(&err, PluginError::Trap { message } if message.contains("may not wait on clocks")),
        "{err}"
    );
}
