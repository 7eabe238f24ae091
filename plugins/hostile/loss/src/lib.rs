//! A deliberately misbehaving loss plugin for the host's containment tests.
//! Config `mode` (text) picks the misbehaviour; `ok` (the default) is a
//! well-behaved loss −Σ lp, to show the same component still works after one
//! of its calls failed.

wit_bindgen::generate!({ world: "loss-plugin", path: "../../../wit" });

use std::hint::black_box;
use std::io::Write;

use exports::loraplex::plugin::loss::{Datum, Guest, LossOutput};
use loraplex::plugin::types::ConfigValue;

struct Hostile;

#[inline(never)]
fn dive(n: u64, x: f64) -> f64 {
    if n == 0 {
        return x;
    }
    let y = dive(n - 1, x * 1.000001);
    y + 1.0 / (n as f64)
}

fn ok(data: &[Datum]) -> LossOutput {
    let loss: f64 = data
        .iter()
        .flat_map(|d| d.logprobs.iter())
        .map(|&lp| -(lp as f64))
        .sum();
    LossOutput {
        loss,
        grads: data.iter().map(|d| vec![-1.0; d.logprobs.len()]).collect(),
        metrics: vec![("loss:sum".into(), loss)],
    }
}

impl Guest for Hostile {
    fn compute(data: Vec<Datum>, config: Vec<(String, ConfigValue)>) -> Result<LossOutput, String> {
        let mode = config
            .iter()
            .find_map(|(k, v)| match v {
                ConfigValue::Text(s) if k == "mode" => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "ok".into());
        let mut out = ok(&data);
        match mode.as_str() {
            "ok" => {}
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = x.wrapping_add(black_box(1));
                    black_box(x);
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![black_box(1u8); 1 << 20]);
                    black_box(&hoard);
                }
            }
            "recursion" => {
                out.loss = dive(black_box(u64::MAX >> 1), 1.0);
            }
            "panic" => panic!("hostile loss panicked on purpose"),
            "user-error" => return Err("advantages are missing, on purpose".into()),
            "grad-len" => {
                if let Some(g) = out.grads.first_mut() {
                    g.pop();
                }
            }
            "missing-grads" => {
                out.grads.pop();
            }
            "nan-grad" => {
                if let Some(x) = out.grads.first_mut().and_then(|g| g.first_mut()) {
                    *x = f32::NAN;
                }
            }
            "inf-loss" => out.loss = f64::INFINITY,
            "huge-metrics" => {
                out.metrics
                    .extend((0..100_000).map(|i| (format!("m{i}:sum"), i as f64)));
            }
            "bad-metric-name" => out.metrics.push(("accuracy".into(), 1.0)),
            "stderr-spam" => {
                let line = [b'x'; 1023];
                for _ in 0..1024 {
                    let _ = std::io::stderr().write_all(&line);
                    let _ = std::io::stderr().write_all(b"\n");
                }
            }
            "sleep" => {
                // Blocking in the host is out of the epoch deadline's reach.
                std::thread::sleep(std::time::Duration::from_secs(30));
            }
            "probe-sandbox" => {
                // What the sandbox lets through: all must come back empty.
                let env = std::env::vars().count() + std::env::args().count();
                let file = std::fs::read("/etc/passwd").is_ok() || std::fs::read_dir("/").is_ok();
                let net = std::net::TcpStream::connect("127.0.0.1:80").is_ok();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(-1.0);
                let t0 = std::time::Instant::now();
                black_box(dive(black_box(1000), 1.0));
                let elapsed = t0.elapsed().as_secs_f64();
                out.metrics.push(("env_and_args:sum".into(), env as f64));
                out.metrics
                    .push(("file_opened:sum".into(), file as u8 as f64));
                out.metrics
                    .push(("net_connected:sum".into(), net as u8 as f64));
                out.metrics.push(("wall_clock_secs:max".into(), now));
                out.metrics
                    .push(("monotonic_elapsed_secs:max".into(), elapsed));
            }
            other => return Err(format!("unknown mode `{other}`")),
        }
        Ok(out)
    }
}

export!(Hostile);
