//! Training runs outlive their sessions, through the official `tinker` SDK and its `tinker`
//! CLI, unchanged, against a real `loraplex serve`:
//! - tests/sdk/runs_cli.py trains a run with `user_metadata`, ends its session and finds the
//!   run, its checkpoints and metadata still described and loadable (the cookbook's
//!   `get_renderer_name_from_checkpoint` included), publishes to and copies for a second
//!   tenant, and downloads external weights through signed links; then the server is
//!   killed (SIGKILL) and restarted, and the same checks pass again;
//! - the CLI's `run list/info`, `checkpoint list/info/publish/unpublish/download/set-ttl/
//!   delete` and `model list` run against the restarted server, and their output is
//!   checked; the downloaded adapter must be the stored checkpoint's weights under PEFT's
//!   names.
//!
//! The Python (and its `tinker` script) come from `LORAPLEX_SDK_PYTHON`, else the virtualenv
//! `scripts/setup-sdk.sh` makes; missing, the test fails and says so. `LORAPLEX_COOKBOOK_SRC`
//! (tinker-cookbook's `src/`) goes on PYTHONPATH when set.

mod common;

use common::server::{sdk_python, start_server_with, Server};
use loraplex::store::peft::peft_tensor_name;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ALICE: &str = "tml-runs-alice";
const BOB: &str = "tml-runs-bob";
const SERVER_ENV: &[(&str, &str)] = &[("LORAPLEX_EXPIRY_SWEEP_MS", "300")];

fn python_phase(python: &Path, port: u16, state: &Path, phase: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/runs_cli.py");
    let mut cmd = Command::new(python);
    cmd.arg("-W")
        .arg("ignore")
        .arg(&script)
        .arg(phase)
        .env("LORAPLEX_URL", format!("http://127.0.0.1:{port}"))
        .env("LORAPLEX_STATE", state)
        .env("TINKER_TELEMETRY", "0");
    if let Some(cb) = std::env::var_os("LORAPLEX_COOKBOOK_SRC") {
        cmd.env("PYTHONPATH", cb);
    }
    let t = Instant::now();
    let status = cmd.status().expect("run the SDK script");
    eprintln!("{phase}: {:.1} s", t.elapsed().as_secs_f64());
    assert!(status.success(), "the SDK script's {phase} phase failed");
}

struct Cli {
    exe: PathBuf,
    port: u16,
    cwd: PathBuf,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        assert!(self.ok, "CLI failed: {}\n{}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Cli {
    fn run(&self, key: &str, args: &[&str]) -> Out {
        let out = Command::new(&self.exe)
            .args(args)
            .current_dir(&self.cwd)
            .env("TINKER_BASE_URL", format!("http://127.0.0.1:{}", self.port))
            .env("TINKER_API_KEY", key)
            .env("TINKER_TELEMETRY", "0")
            .env("COLUMNS", "250")
            .output()
            .expect("run the tinker CLI");
        let o = Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!("$ tinker {}\n{}{}", args.join(" "), o.stdout, o.stderr);
        o
    }

    fn json(&self, key: &str, args: &[&str]) -> Value {
        let mut a = vec!["-f", "json"];
        a.extend_from_slice(args);
        self.run(key, &a).json()
    }
}

fn paths(list: &Value, field: &str) -> Vec<String> {
    list[field]
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| c["tinker_path"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Where the server keeps `tinker://{run}/{seg}/{name}` of `key`'s tenant.
fn checkpoint_dir(data: &Path, key: &str, path: &str) -> PathBuf {
    let tenant = loraplex::auth::Auth::Development.tenant(key).unwrap();
    let rest = path.strip_prefix("tinker://").unwrap();
    let parts: Vec<&str> = rest.split('/').collect();
    data.join("checkpoints")
        .join(tenant.as_str())
        .join(parts[0].replace(':', "."))
        .join(parts[1])
        .join(parts[2])
}

/// The downloaded directory is a PEFT adapter holding exactly the stored checkpoint's
/// weights (read back independently from the server's checkpoint files).
fn assert_peft_matches(downloaded: &Path, stored: &Path) {
    let cfg: Value = serde_json::from_slice(
        &std::fs::read(downloaded.join("adapter_config.json")).expect("adapter_config.json"),
    )
    .expect("adapter_config.json is JSON");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 2);
    assert_eq!(
        cfg["base_model_name_or_path"],
        loraplex::config::DEFAULT_MODEL_NAME
    );
    let targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        targets.contains(&"q_proj") && targets.contains(&"down_proj"),
        "{targets:?}"
    );
    let bytes = std::fs::read(downloaded.join("adapter_model.safetensors")).expect("adapter_model");
    let cpu = candle_core::Device::Cpu;
    let got = candle_core::safetensors::load_buffer(&bytes, &cpu).expect("safetensors");
    let want = loraplex::store::checkpoint::read_checkpoint(stored, &cpu).expect("checkpoint");
    assert_eq!(got.len(), want.weights.pairs.len() * 2);
    let mut moved = 0;
    for (site, p) in &want.weights.pairs {
        for (is_b, w) in [(false, &p.a), (true, &p.b)] {
            let g = &got[&peft_tensor_name(*site, is_b)];
            assert_eq!(g.dims(), w.dims(), "{site:?}");
            let a: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{site:?} B={is_b}");
            if is_b && b.iter().any(|x| *x != 0.0) {
                moved += 1;
            }
        }
    }
    assert!(moved > 0, "the trained B matrices are not zero");
}

#[test]
fn runs_outlive_sessions_and_restarts_through_the_sdk_and_the_cli() {
    let python = sdk_python();
    assert!(
        python.exists(),
        "no Python with the tinker SDK at {}: run ./scripts/setup-sdk.sh or set LORAPLEX_SDK_PYTHON",
        python.display()
    );
    let exe = python.with_file_name("tinker");
    assert!(exe.exists(), "no tinker CLI at {}", exe.display());
    let dir = std::env::temp_dir().join(format!("loraplex-runs-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let state = dir.join("state.json");
    std::fs::create_dir_all(&data).unwrap();

    let (server, port) = start_server_with(&data, SERVER_ENV);
    python_phase(&python, port, &state, "train");
    // SIGKILL, then a restart on the same data directory.
    drop::<Server>(server);
    let (_server, port) = start_server_with(&data, SERVER_ENV);
    python_phase(&python, port, &state, "after_restart");

    let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let s = |k: &str| st[k].as_str().unwrap().to_owned();
    let (run, weights, sampler, copy) = (s("run"), s("weights"), s("sampler"), s("copy"));
    let cli = Cli {
        exe,
        port,
        cwd: dir.clone(),
    };

    // run list / info.
    let table = cli.run(ALICE, &["run", "list"]);
    assert!(
        table.ok && table.stdout.contains("training runs"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains(&run) && table.stdout.contains("Rank 2"));
    let runs = cli.json(ALICE, &["run", "list", "--limit", "0"]);
    let ours: Vec<&Value> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["training_run_id"] == run.as_str())
        .collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0]["user_metadata"]["renderer_name"], "role_colon");
    let info = cli.json(ALICE, &["run", "info", &run]);
    assert_eq!(info["user_metadata"]["renderer_name"], "role_colon");
    assert_eq!(info["last_checkpoint"]["tinker_path"], weights.as_str());
    let table = cli.run(ALICE, &["run", "info", &run]);
    assert!(table.stdout.contains("renderer_name") && table.stdout.contains("role_colon"));
    let foreign = cli.run(BOB, &["run", "info", &run]);
    assert!(!foreign.ok && foreign.stderr.contains("Resource not found"));

    // checkpoint list / info, newest first.
    let listed = cli.json(ALICE, &["checkpoint", "list", "--run-id", &run]);
    assert_eq!(
        paths(&listed, "checkpoints"),
        [sampler.as_str(), weights.as_str()]
    );
    let all = cli.json(ALICE, &["checkpoint", "list", "--limit", "0"]);
    let all = paths(&all, "checkpoints");
    assert!(all.contains(&weights) && all.contains(&sampler), "{all:?}");
    let info = cli.json(ALICE, &["checkpoint", "info", &weights]);
    assert_eq!(
        (info["lora_rank"].as_u64(), info["public"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(info["checkpoint_type"], "training");

    // publish / unpublish.
    assert!(cli.run(ALICE, &["checkpoint", "publish", &weights]).ok);
    assert_eq!(
        cli.json(ALICE, &["checkpoint", "info", &weights])["public"],
        true
    );
    assert!(cli.json(BOB, &["run", "list"])["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["training_run_id"] != run.as_str()));
    assert!(cli.run(ALICE, &["checkpoint", "unpublish", &weights]).ok);
    assert_eq!(
        cli.json(ALICE, &["checkpoint", "info", &weights])["public"],
        false
    );

    // download: a training checkpoint, through a temporary external export.
    let out = cli.json(ALICE, &["checkpoint", "download", &weights, "-o", "dl"]);
    let dest = dir.join(out["destination"].as_str().unwrap());
    assert!(out["file_size_bytes"].as_u64().unwrap() > 1000, "{out}");
    assert_peft_matches(&dest, &checkpoint_dir(&data, ALICE, &weights));
    let again = cli.run(ALICE, &["checkpoint", "download", &weights, "-o", "dl"]);
    assert!(!again.ok && again.stderr.contains("already exists"));
    // The export's run is listed (as the CLI made it) and its temporary export is gone.
    let runs = cli.json(ALICE, &["run", "list", "--limit", "0"]);
    let export_run = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user_metadata"]["created_by"] == "tinker checkpoint download")
        .expect("the download's run")["training_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let left = cli.json(ALICE, &["checkpoint", "list", "--run-id", &export_run]);
    assert_eq!(paths(&left, "checkpoints"), Vec::<String>::new());
    // An external-weights checkpoint downloads directly.
    let external = s("external");
    let out = cli.json(ALICE, &["checkpoint", "download", &external, "-o", "dl"]);
    let ext_dest = dir.join(out["destination"].as_str().unwrap());
    assert_peft_matches(&ext_dest, &checkpoint_dir(&data, ALICE, &external));

    // set-ttl: set, clear, then expire: gone from the listings and from the disk.
    assert!(
        cli.run(ALICE, &["checkpoint", "set-ttl", &sampler, "--ttl", "3600"])
            .ok
    );
    let exp = cli.json(ALICE, &["checkpoint", "info", &sampler])["expires_at"].clone();
    assert!(exp.is_string(), "{exp}");
    assert!(
        cli.run(ALICE, &["checkpoint", "set-ttl", &sampler, "--remove"])
            .ok
    );
    assert_eq!(
        cli.json(ALICE, &["checkpoint", "info", &sampler])["expires_at"],
        Value::Null
    );
    let files = checkpoint_dir(&data, ALICE, &sampler);
    assert!(files.is_dir());
    assert!(
        cli.run(ALICE, &["checkpoint", "set-ttl", &sampler, "--ttl", "1"])
            .ok
    );
    let t = Instant::now();
    while files.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "expired files stay");
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = cli.json(ALICE, &["checkpoint", "list", "--run-id", &run]);
    assert_eq!(paths(&listed, "checkpoints"), [weights.as_str()]);
    let gone = cli.run(ALICE, &["checkpoint", "info", &sampler]);
    assert!(
        !gone.ok && gone.stderr.contains("not found"),
        "{}",
        gone.stderr
    );

    // delete: another tenant cannot, the owner can.
    let refused = cli.run(ALICE, &["checkpoint", "delete", &copy, "-y"]);
    assert!(
        refused.stdout.contains("Failed to delete 1"),
        "{}",
        refused.stdout
    );
    let deleted = cli.json(BOB, &["checkpoint", "delete", &copy, "-y"]);
    assert_eq!(deleted["deleted_count"], 1, "{deleted}");
    assert_eq!(
        paths(&cli.json(BOB, &["checkpoint", "list"]), "checkpoints"),
        Vec::<String>::new()
    );
    assert_eq!(
        paths(
            &cli.json(ALICE, &["checkpoint", "list", "--run-id", &run]),
            "checkpoints"
        ),
        [weights.as_str()]
    );

    // model list.
    let models = cli.json(ALICE, &["model", "list"]);
    assert_eq!(
        models["models"][0]["model_name"],
        loraplex::config::DEFAULT_MODEL_NAME
    );
    assert_eq!(models["models"][0]["trainable"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
