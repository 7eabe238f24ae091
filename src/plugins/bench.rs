//! The plugin benchmark: what a wasm loss costs against the same loss in
//! native Rust on a 4x128 batch, and what a wasm sampler costs per decoding
//! step at a 49,152-token vocabulary, each measured the way the host really
//! runs it (a fresh store and instance per loss call; one per sequence for a
//! sampler). It prints a table; it asserts nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    ConfigValue, LossDatum, NamedTensor, PluginError, PluginHost, PluginLimits, SamplerChoice,
    TensorData,
};

const VOCAB: usize = 49_152;

/// Runs the benchmark with the components in `plugins/dist` (or
/// `$LORAPLEX_PLUGIN_DIST`; build them with `plugins/build.sh`) and returns
/// the table, or a line saying why it could not run.
pub fn run() -> String {
    let dir = std::env::var_os("LORAPLEX_PLUGIN_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist"));
    match run_in(&dir) {
        Ok(table) => table,
        Err(e) => format!("plugin benchmark failed: {e}\n"),
    }
}

/// Runs the benchmark with the components in `dist`.
pub fn run_in(dist: &Path) -> Result<String, PluginError> {
    Ok(table(&measure(dist)?))
}

/// One benchmark row: case, native median, wasm median.
pub type Row = (String, Duration, Duration);

/// The measurements behind [`run_in`]'s table.
pub fn measure(dist: &Path) -> Result<Vec<Row>, PluginError> {
    let read = |name: &str| {
        let path = dist.join(format!("{name}.wasm"));
        std::fs::read(&path).map_err(|e| PluginError::Host(format!("{}: {e}", path.display())))
    };
    let host = PluginHost::new(PluginLimits::default(), None)?;
    let (ppo, _) = host.load(&read("ppo-clip")?)?;
    let (dro, _) = host.load(&read("dro")?)?;
    let (min_p, _) = host.load(&read("min-p")?)?;

    let mut rows = Vec::new();
    let no_config = BTreeMap::new();
    for (n, len) in [(4, 128), (1, 1)] {
        let data = batch(n, len);
        let native = median(300, || {
            std::hint::black_box(native_ppo(&data, 0.8, 1.2));
        });
        let wasm = median_result(300, || host.compute_loss(&ppo, &data, &no_config).map(drop))?;
        rows.push((format!("ppo loss, {n}x{len} batch"), native, wasm));
        let native = median(300, || {
            std::hint::black_box(native_dro(&data, 0.05));
        });
        let wasm = median_result(300, || host.compute_loss(&dro, &data, &no_config).map(drop))?;
        rows.push((format!("dro loss, {n}x{len} batch"), native, wasm));
    }

    let logits = synthetic_logits(VOCAB);
    let config = BTreeMap::from([("min_p".to_string(), ConfigValue::Number(0.1))]);
    let mut bits = 0x2545f4914f6cdd1du64;
    let mut next = move || {
        bits ^= bits << 13;
        bits ^= bits >> 7;
        bits ^= bits << 17;
        bits
    };
    let native = median(200, || {
        std::hint::black_box(native_min_p(&logits, 0.1, 1.0, next()));
    });
    // Temperature 0 makes min-p an argmax: what is left is the host's cost
    // (copying the logits in, arming the deadline, the call itself).
    let greedy = BTreeMap::from([("temperature".to_string(), ConfigValue::Number(0.0))]);
    let native_argmax = median(200, || {
        std::hint::black_box(native_argmax(std::hint::black_box(&logits)));
    });
    let mut session = host.new_sampler(&min_p, &[1, 2, 3], &greedy, VOCAB)?;
    let step = median_result(200, || session.step(&logits, &[], next()).map(drop))?;
    rows.push((
        format!("greedy step (min-p, temperature 0), vocab {VOCAB}, live session"),
        native_argmax,
        step,
    ));

    let mut session = host.new_sampler(&min_p, &[1, 2, 3], &config, VOCAB)?;
    let mut generated = Vec::new();
    let step = median_result(200, || {
        match session.step(&logits, &generated, next())? {
            SamplerChoice::Token(t) => generated.push(t),
            SamplerChoice::Stop => {}
        }
        Ok(())
    })?;
    rows.push((
        format!("min-p step (min_p 0.1, temperature 1), vocab {VOCAB}, live session"),
        native,
        step,
    ));
    let fresh = median_result(200, || {
        let mut s = host.new_sampler(&min_p, &[1, 2, 3], &config, VOCAB)?;
        s.step(&logits, &[], next()).map(drop)
    })?;
    rows.push((
        format!("min-p new session + 1 step, vocab {VOCAB}"),
        native,
        fresh,
    ));

    Ok(rows)
}

/// The rows as a Markdown table with notes.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| case | native Rust (median µs) | wasm plugin (median µs) | wasm / native |\n");
    out.push_str("|---|---:|---:|---:|\n");
    for (case, native, wasm) in rows {
        let (n, w) = (micros(*native), micros(*wasm));
        out.push_str(&format!(
            "| {case} | {n:.1} | {w:.1} | {:.1}x |\n",
            w / n.max(1e-3)
        ));
    }
    out.push_str(
        "\nwasm loss: fresh store + instantiate (pooling) + call + output checks, per call.\n\
         live session: one `step` (49,152 logits copied in, epoch deadline armed).\n\
         new session: store + instance + `create` + one step, what a sequence's first token costs.\n",
    );
    out
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(iters: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..iters / 10 {
        f();
    }
    let mut times: Vec<Duration> = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn median_result(
    iters: usize,
    mut f: impl FnMut() -> Result<(), PluginError>,
) -> Result<Duration, PluginError> {
    let mut err = None;
    let d = median(iters, || {
        if let Err(e) = f() {
            err.get_or_insert(e);
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(d),
    }
}

fn batch(n: usize, len: usize) -> Vec<LossDatum> {
    (0..n)
        .map(|i| {
            let lp: Vec<f32> = (0..len).map(|t| ((i + t) % 17) as f32 * -0.2).collect();
            let q: Vec<f32> = lp
                .iter()
                .enumerate()
                .map(|(t, &x)| x + ((t % 7) as f32 - 3.0) * 0.05)
                .collect();
            let adv: Vec<f32> = (0..len).map(|t| ((t % 5) as f32 - 2.0) * 0.5).collect();
            LossDatum {
                logprobs: lp,
                inputs: vec![
                    NamedTensor::f32("logprobs", q),
                    NamedTensor::f32("advantages", adv),
                ],
            }
        })
        .collect()
}

fn input<'a>(d: &'a LossDatum, name: &str) -> &'a [f32] {
    d.inputs
        .iter()
        .find_map(|t| match &t.data {
            TensorData::F32(v) if t.name == name => Some(v.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

/// The built-in `ppo` definition, as native code.
fn native_ppo(data: &[LossDatum], lo: f64, hi: f64) -> (f64, Vec<Vec<f32>>) {
    let mut loss = 0.0;
    let grads = data
        .iter()
        .map(|d| {
            let (q, a) = (input(d, "logprobs"), input(d, "advantages"));
            d.logprobs
                .iter()
                .zip(q.iter().zip(a))
                .map(|(&lp, (&q, &a))| {
                    let r = (lp as f64 - q as f64).exp();
                    let a = a as f64;
                    let (u, c) = (r * a, r.clamp(lo, hi) * a);
                    if u <= c {
                        loss -= u;
                        (-r * a) as f32
                    } else {
                        loss -= c;
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    (loss, grads)
}

/// The built-in `dro` definition, as native code.
fn native_dro(data: &[LossDatum], beta: f64) -> (f64, Vec<Vec<f32>>) {
    let mut loss = 0.0;
    let grads = data
        .iter()
        .map(|d| {
            let (q, a) = (input(d, "logprobs"), input(d, "advantages"));
            d.logprobs
                .iter()
                .zip(q.iter().zip(a))
                .map(|(&lp, (&q, &a))| {
                    let (lp, diff, a) = (lp as f64, lp as f64 - q as f64, a as f64);
                    loss -= lp * a - 0.5 * beta * diff * diff;
                    (-a + beta * diff) as f32
                })
                .collect()
        })
        .collect();
    (loss, grads)
}

/// Logits shaped like a language model's: a few likely tokens, a long tail.
fn synthetic_logits(vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9e3779b97f4a7c15) >> 40;
            (h % 1000) as f32 / 100.0 - 5.0
        })
        .collect()
}

fn native_argmax(logits: &[f32]) -> usize {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bx), (i, &x)| {
            if x > bx {
                (i, x)
            } else {
                (bi, bx)
            }
        })
        .0
}

/// The `min-p` plugin's algorithm (plugins/min-p with plugins/kit), as
/// native code.
fn native_min_p(logits: &[f32], min_p: f64, temperature: f64, bits: u64) -> usize {
    let best = native_argmax(logits);
    let max = logits[best];
    let threshold = max as f64 + temperature * min_p.ln();
    let scale = (1.0 / temperature) as f32;
    let mut weights: Vec<(u32, f32)> = Vec::new();
    let mut total = 0.0f64;
    for (i, &x) in logits.iter().enumerate() {
        if x >= max - 100.0 * temperature as f32 && x as f64 >= threshold {
            let w = ((x - max) * scale).exp();
            total += w as f64;
            weights.push((i as u32, w));
        }
    }
    let target = (bits >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut acc = 0.0f64;
    for &(i, w) in &weights {
        acc += w as f64;
        if acc > target {
            return i as usize;
        }
    }
    weights.last().map_or(best, |&(i, _)| i as usize)
}
