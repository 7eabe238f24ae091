//! `loraplex bench load`: the load and soak benchmark. It owns a real `loraplex serve`
//! child process on loopback (a free port, a temporary data directory), many tenants'
//! mixed Tinker traffic against it for a bounded time ([`traffic`]), the server's RSS
//! sampled every second, and the printed tables and verdict ([`stats`]): every good
//! request succeeds, no answer is a 5xx, every bad request is refused.
//!
//! It never talks to anything but the child it started, and every loop is bounded: the
//! run by `--seconds`, unfinished work by `--drain-seconds`, the start by
//! `--ready-seconds`, the child's shutdown by [`STOP_WAIT`].

mod client;
pub mod stats;
pub mod traffic;

use crate::config::{ModelArgs, ServeConfig};
use client::{Conn, Request};
use stats::{Rss, Stats};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use traffic::{Ctx, Known, Traffic, BAD_KINDS};

/// How long the child gets to exit after SIGTERM before it is killed.
pub const STOP_WAIT: Duration = Duration::from_secs(30);
/// Token ids are drawn below this: inside every Llama-family vocabulary.
const TOKEN_RANGE: u32 = 32_000;
/// Largest body limit the oversized-body kind exceeds (it sends limit + 1 bytes).
const MAX_OVERSIZED: usize = 256 << 20;
/// Lines of the server's log printed when something failed.
const LOG_TAIL: usize = 30;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tenants, each with its own API key and connection.
    #[arg(long, default_value_t = 64)]
    pub tenants: usize,
    /// How long new work is started (s).
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
    /// After that, how long unfinished work may take before it counts as failed (s).
    #[arg(long, default_value_t = 90)]
    pub drain_seconds: u64,
    /// How long the server may take to load the model (s).
    #[arg(long, default_value_t = 180)]
    pub ready_seconds: u64,
    /// Share of operations replaced by a bad request.
    #[arg(long, default_value_t = 0.1)]
    pub bad_share: f64,
    /// Kinds of bad request, sent in turn: `all`, `none`, or a list of kinds.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub bad_kinds: Vec<String>,
    /// Tokens per forward_backward datum: uniform in min..=max.
    #[arg(long, default_value_t = 16)]
    pub min_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// forward_backward + optim_step pairs per training model before it is sampled and
    /// unloaded (or deleted) and the next is created.
    #[arg(long, default_value_t = 3)]
    pub steps_per_model: usize,
    /// Tokens each asample generates.
    #[arg(long, default_value_t = 8)]
    pub sample_tokens: usize,
    /// LoRA rank of the training models.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the server's data directory and log (otherwise removed after a passing run).
    #[arg(long)]
    pub keep_data: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid --{field}: {message}")]
    Args {
        field: &'static str,
        message: String,
    },
    #[error("cannot start the server {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the server did not become ready: {reason}\n{log}")]
    NotReady { reason: String, log: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("server settings: {0}")]
    Settings(#[from] clap::Error),
}

/// What a run measured, its printed tables, and what failed.
pub struct LoadReport {
    pub text: String,
    pub stats: Stats,
    pub rss: Rss,
    pub failures: Vec<String>,
    pub kinds: Vec<&'static str>,
}

impl LoadReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn check(ok: bool, field: &'static str, message: &str) -> Result<(), LoadError> {
    if ok {
        Ok(())
    } else {
        Err(LoadError::Args {
            field,
            message: message.to_owned(),
        })
    }
}

fn kinds(names: &[String]) -> Result<Vec<&'static str>, LoadError> {
    let mut out = Vec::new();
    for n in names {
        let n = n.trim();
        if n == "all" {
            out.extend_from_slice(BAD_KINDS);
        } else if n == "none" || n.is_empty() {
        } else if let Some(k) = BAD_KINDS.iter().find(|k| **k == n) {
            out.push(*k);
        } else {
            return Err(LoadError::Args {
                field: "bad-kinds",
                message: format!(
                    "unknown kind {n:?}; kinds: all, none, {}",
                    BAD_KINDS.join(", ")
                ),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|k| seen.insert(*k));
    Ok(out)
}

/// The server's settings as `loraplex serve` would read them from the environment.
fn serve_settings() -> Result<ServeConfig, clap::Error> {
    use clap::{Args, FromArgMatches};
    let cmd = ServeConfig::augment_args(clap::Command::new("serve"));
    ServeConfig::from_arg_matches(&cmd.try_get_matches_from(["serve"])?)
}

/// The child server; killed if still running when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL);
        lines[from..].join("\n")
    }

    /// SIGTERM (graceful shutdown), then SIGKILL after [`STOP_WAIT`]. The exit status, or
    /// why there is none.
    fn stop(&mut self) -> String {
        if let Ok(Some(s)) = self.child.try_wait() {
            return format!("had exited already: {s}");
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t = Instant::now();
        while t.elapsed() < STOP_WAIT {
            if let Ok(Some(s)) = self.child.try_wait() {
                return format!(
                    "stopped on SIGTERM in {:.1} s: {s}",
                    t.elapsed().as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("did not stop within {STOP_WAIT:?} of SIGTERM; killed")
    }
}

fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

async fn wait_ready(
    addr: std::net::SocketAddr,
    server: &mut Server,
    limit: Duration,
) -> Result<(), LoadError> {
    let t = Instant::now();
    let mut conn = Conn::new(addr, Duration::from_secs(5));
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(LoadError::NotReady {
                reason: format!("it exited: {status}"),
                log: server.log_tail(),
            });
        }
        if let Ok(r) = conn.send(&Request::get("/healthz", "tml-load-ready")).await {
            if r.json().is_some_and(|v| v["model_loaded"] == true) {
                return Ok(());
            }
        }
        if t.elapsed() > limit {
            return Err(LoadError::NotReady {
                reason: format!("no healthz with model_loaded: true within {limit:?}"),
                log: server.log_tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run the benchmark against a `loraplex serve` started from `server_exe`.
pub fn run(args: &LoadBenchArgs, server_exe: &Path) -> Result<LoadReport, LoadError> {
    check(
        (1..=4096).contains(&args.tenants),
        "tenants",
        "must be in 1..=4096",
    )?;
    check(
        (1..=7 * 86_400).contains(&args.seconds),
        "seconds",
        "must be in 1..=604800",
    )?;
    check(args.drain_seconds <= 3600, "drain-seconds", "at most 3600")?;
    check(args.ready_seconds <= 3600, "ready-seconds", "at most 3600")?;
    check(
        (0.0..=0.9).contains(&args.bad_share),
        "bad-share",
        "must be in 0..=0.9",
    )?;
    check(
        args.min_tokens >= 2 && args.min_tokens <= args.max_tokens && args.max_tokens <= 4096,
        "min-tokens",
        "need 2 <= min-tokens <= max-tokens <= 4096",
    )?;
    check(
        (1..=1000).contains(&args.steps_per_model),
        "steps-per-model",
        "must be in 1..=1000",
    )?;
    check(
        (1..=1024).contains(&args.sample_tokens),
        "sample-tokens",
        "must be in 1..=1024",
    )?;
    check((1..=256).contains(&args.rank), "rank", "must be in 1..=256")?;
    let bad_kinds = kinds(&args.bad_kinds)?;
    let settings = serve_settings()?;
    check(
        !bad_kinds.contains(&"oversized-body") || settings.max_body_bytes <= MAX_OVERSIZED,
        "bad-kinds",
        "oversized-body sends the server's body limit plus one byte: leave it out when \
         LORAPLEX_MAX_BODY_BYTES is above 256 MiB",
    )?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("loraplex-load-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("server.log");
    let child = Command::new(server_exe)
        .arg("serve")
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--model-path")
        .arg(&args.model.model_path)
        .arg("--model-name")
        .arg(&args.model.model_name)
        .arg("--max-body-bytes")
        .arg(settings.max_body_bytes.to_string())
        // Development mode: every distinct key is a tenant.
        .env_remove("LORAPLEX_KEYS_FILE")
        .env(
            "RUST_LOG",
            std::env::var("LORAPLEX_LOAD_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|source| LoadError::Spawn {
            exe: server_exe.to_owned(),
            source,
        })?;
    let pid = child.id();
    let mut server = Server { child, log };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t_start = Instant::now();
    rt.block_on(wait_ready(
        addr,
        &mut server,
        Duration::from_secs(args.ready_seconds),
    ))?;
    let ready_s = t_start.elapsed().as_secs_f64();

    // RSS every second, from the start of the load until the tenants are done.
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let hard_deadline = deadline + Duration::from_secs(args.drain_seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let limit = hard_deadline + Duration::from_secs(60);
        std::thread::spawn(move || {
            let mut rss = Rss::default();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                if let Some(mb) = rss_mb(pid) {
                    rss.samples.push((start.elapsed().as_secs_f64(), mb));
                }
                next += Duration::from_secs(1);
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            rss
        })
    };

    let ctx = Arc::new(Ctx {
        addr,
        traffic: Traffic {
            model_name: args.model.model_name.clone(),
            bad_share: args.bad_share,
            bad_kinds: bad_kinds.clone(),
            min_tokens: args.min_tokens,
            max_tokens: args.max_tokens,
            steps_per_model: args.steps_per_model,
            sample_tokens: args.sample_tokens,
            rank: args.rank,
            vocab: TOKEN_RANGE,
            max_body_bytes: settings.max_body_bytes,
            seed: args.seed,
        },
        deadline,
        hard_deadline,
        stats: parking_lot::Mutex::new(Stats::default()),
        known: (0..args.tenants)
            .map(|_| parking_lot::Mutex::new(Known::default()))
            .collect(),
    });
    let stragglers = rt.block_on(async {
        let tasks: Vec<_> = (0..args.tenants)
            .map(|i| tokio::spawn(traffic::run_tenant(ctx.clone(), i)))
            .collect();
        let mut stragglers = 0;
        let grace = hard_deadline + Duration::from_secs(60);
        for t in tasks {
            let left = grace.saturating_duration_since(Instant::now());
            let abort = t.abort_handle();
            match tokio::time::timeout(left, t).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    ctx.stats
                        .lock()
                        .message(format!("a tenant task ended abnormally: {e}"));
                    stragglers += 1;
                }
                Err(_) => {
                    abort.abort();
                    stragglers += 1;
                }
            }
        }
        stragglers
    });
    let wall = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let rss = sampler.join().unwrap_or_default();
    let crashed = match server.child.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        _ => None,
    };
    let stopped = server.stop();
    drop(rt);

    let stats = std::mem::take(&mut *ctx.stats.lock());
    let mut failures = Vec::new();
    if let Some(s) = &crashed {
        failures.push(format!("the server exited during the run: {s}"));
    }
    if stats.good_failed > 0 {
        failures.push(format!("{} good requests failed", stats.good_failed));
    }
    if stats.server_errors > 0 {
        failures.push(format!("{} answers were 5xx", stats.server_errors));
    }
    if stats.bad_accepted > 0 {
        failures.push(format!(
            "{} bad requests were not refused",
            stats.bad_accepted
        ));
    }
    if stragglers > 0 {
        failures.push(format!("{stragglers} tenants did not finish in time"));
    }
    if stats.good_ok == 0 {
        failures.push("no good operation completed".into());
    }
    let header = format!(
        "loraplex bench load: {} tenants for {} s (+ up to {} s to drain), bad share {}, forward_backward of {}..={} tokens, {} steps per model, rank {}, {}-token samples; server {} (pid {pid}, ready in {ready_s:.1} s) on {addr}, model {}",
        args.tenants,
        args.seconds,
        args.drain_seconds,
        args.bad_share,
        args.min_tokens,
        args.max_tokens,
        args.steps_per_model,
        args.rank,
        args.sample_tokens,
        server_exe.display(),
        args.model.model_path.display(),
    );
    let mut text = stats::render(&stats, &rss, wall, &header);
    let _ = writeln!(text, "server: {stopped}");
    if failures.is_empty() {
        let _ = writeln!(
            text,
            "\nPASS: every good request succeeded, no 5xx, every bad request refused"
        );
    } else {
        let _ = writeln!(text, "\nFAIL: {}", failures.join("; "));
        for m in &stats.messages {
            let _ = writeln!(text, "- {m}");
        }
        if stats.more_messages > 0 {
            let _ = writeln!(text, "- ... and {} more", stats.more_messages);
        }
        let _ = writeln!(
            text,
            "\nserver log ({}), last lines:\n{}",
            server.log.display(),
            server.log_tail()
        );
    }
    if failures.is_empty() && !args.keep_data {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        let _ = writeln!(text, "data directory kept: {}", dir.display());
    }
    Ok(LoadReport {
        text,
        stats,
        rss,
        failures,
        kinds: bad_kinds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bad_kinds_parse() {
        assert_eq!(kinds(&names(&["all", "huge-sparse"])).unwrap(), BAD_KINDS);
        assert!(kinds(&names(&["none"])).unwrap().is_empty());
        assert_eq!(
            kinds(&names(&["missing-key", " oversized-body"])).unwrap(),
            ["missing-key", "oversized-body"]
        );
        let e = kinds(&names(&["nope"])).unwrap_err().to_string();
        assert!(e.contains("--bad-kinds") && e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn serve_settings_come_from_the_serve_flags() {
        let s = serve_settings().unwrap();
        assert!(s.max_body_bytes > 0);
    }
}
