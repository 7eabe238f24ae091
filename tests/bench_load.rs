//! `loraplex bench load`, short: 8 tenants for 20 s of mixed good and bad traffic against
//! a real `loraplex serve`. Every good request succeeds, no answer is a 5xx, every bad
//! request is refused (a 4xx, or a training request's future failed as the user's
//! error), and the server's RSS was sampled throughout.

mod common;

use clap::Parser;
use loraplex::bench::load::stats::Class;
use loraplex::bench::load::{run, LoadBenchArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    load: LoadBenchArgs,
}

#[test]
fn short_load_run_has_no_failures() {
    let model = common::model_path();
    let cli = Cli::parse_from([
        "load",
        "--model-path",
        model.to_str().expect("utf-8 model path"),
        "--tenants",
        "8",
        "--seconds",
        "20",
        "--drain-seconds",
        "60",
        "--steps-per-model",
        "2",
        "--bad-share",
        "0.3",
    ]);
    let report = run(&cli.load, env!("CARGO_BIN_EXE_loraplex").as_ref()).expect("bench load");
    println!("{}", report.text);
    let s = &report.stats;
    assert!(report.passed(), "{:?}\n{}", report.failures, report.text);
    assert_eq!(s.server_errors, 0);
    assert_eq!(s.good_failed, 0);
    assert_eq!(s.bad_accepted, 0);
    // The run did real work of every sort.
    assert!(
        s.trained_tokens > 0 && s.sampled_tokens > 0,
        "{}",
        report.text
    );
    for op in ["create_model", "forward_backward", "optim_step", "asample"] {
        assert!(
            s.result_latency.get(op).is_some_and(|v| !v.is_empty()),
            "no {op} finished:\n{}",
            report.text
        );
    }
    // Named sampler checkpoints were made, given a TTL and deleted on a durable server.
    for op in [
        "create_sampling_session",
        "set_checkpoint_ttl",
        "delete_checkpoint",
    ] {
        let answers = s.answers.get(&(op, Class::Good));
        assert!(
            answers.is_some_and(|m| m.get("200").is_some_and(|&n| n > 0)),
            "no {op} answered 200:\n{}",
            report.text
        );
    }
    // Bad requests were sent, every one refused, of many kinds.
    let bad: u64 = s.bad_outcomes.values().flat_map(|m| m.values()).sum();
    assert!(bad >= 20, "only {bad} bad requests:\n{}", report.text);
    assert_eq!(bad, s.bad_refused);
    for (kind, outcomes) in &s.bad_outcomes {
        for answer in outcomes.keys() {
            let refused = answer == "future:user"
                || answer.parse::<u16>().is_ok_and(|c| (400..500).contains(&c));
            assert!(refused, "{kind} answered {answer}");
        }
    }
    assert!(
        s.bad_outcomes.len() >= report.kinds.len() / 2,
        "only {} of {} kinds sent:\n{}",
        s.bad_outcomes.len(),
        report.kinds.len(),
        report.text
    );
    // RSS sampled about every second.
    assert!(
        report.rss.samples.len() >= 15,
        "{} RSS samples",
        report.rss.samples.len()
    );
    assert!(report.rss.samples.iter().all(|&(_, mb)| mb > 10.0));
}
