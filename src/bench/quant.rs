//! Base weights kept as stored against expanded ones (`loraplex bench quant`): for each
//! `--base-dtype`, in a fresh child process of its own (so that memory figures are its
//! own), the model's resident memory, greedy decoding of one sequence (without and with a
//! LoRA adapter) and of 8 sequences with 8 adapters, and a training step; then llama.cpp
//! decoding the same file on the same number of threads (`scripts/bench-llamacpp.py`, run
//! with the Python of `--llama-python`, by default the venv that `scripts/setup-llamacpp.sh`
//! makes; skipped, and said so, when there is none). Every row of the table is measured in
//! the same run, one engine after another.

use super::median;
use crate::config::{BaseDtype, ModelArgs};
use crate::error::{Error, Result};
use crate::lora::optim::AdamParams;
use crate::lora::{LoraConfig, LoraWeights, Target};
use crate::model::{BaseModel, InferRow, KvCache};
use crate::train::loss::{BuiltinLoss, LossConfig};
use crate::train::{check_data, forward_backward, Datum, TrainableAdapter, Work};
use crate::util::{peak_rss_bytes, SplitMix64};
use std::path::PathBuf;
use std::time::Instant;

/// The prompt every engine prefills before decoding (the llama.cpp script uses the same).
pub const PROMPT: &str = "Write a short story about a robot who learns to paint.";

#[derive(Debug, Clone, clap::Args)]
pub struct QuantBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Base dtypes to compare, each in its own process.
    #[arg(long, value_delimiter = ',', default_value = "as-stored,bf16,f32")]
    pub dtypes: Vec<BaseDtype>,
    /// Tokens decoded per sequence and round.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Rounds per measure and sitting (the median is taken).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Sittings: every dtype's process, then llama.cpp, this many times in turn. The table
    /// gives medians over sittings, and each ratio is the median of the ratios within a
    /// sitting (this machine's speed drifts by 20% over minutes, more than the engines
    /// differ, so only measures taken side by side compare).
    #[arg(long, default_value_t = 3)]
    pub sittings: usize,
    /// Timed training steps (1 row of 128 tokens, rank 8 on all targets), after a warm-up.
    #[arg(long, default_value_t = 5)]
    pub train_steps: usize,
    /// A Python with llama-cpp-python installed (default:
    /// ~/.cache/loraplex/venv-llama/bin/python when it exists).
    #[arg(long, env = "LORAPLEX_LLAMA_PYTHON")]
    pub llama_python: Option<PathBuf>,
    /// Measure only `--base-dtype` in this process and print one JSON line (what the
    /// parent runs in each child).
    #[arg(long, hide = true)]
    pub child: bool,
}

/// What one child measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Measured {
    dtype: String,
    layout: String,
    weight_mb: f64,
    /// Resident memory the loaded model added to the process.
    model_rss_mb: f64,
    load_s: f64,
    decode1_tok_s: f64,
    decode1_lora_tok_s: f64,
    decode8_tok_s: f64,
    train_step_s: f64,
    peak_rss_mb: f64,
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Run the comparison (or, with `--child`, one dtype) and return the text to print.
pub fn quant(args: &QuantBenchArgs) -> Result<String> {
    if args.child {
        let m = measure(args)?;
        return serde_json::to_string(&m).map_err(|e| Error::Unavailable(e.to_string()));
    }
    let exe = std::env::current_exe()?;
    let threads = rayon::current_num_threads();
    let file_mb = std::fs::metadata(&args.model.model_path)
        .map(|m| m.len() as f64 / 1e6)
        .unwrap_or(f64::NAN);
    // One dtype's process.
    let child = |d: &BaseDtype| -> Result<Measured> {
        let out = std::process::Command::new(&exe)
            .args(["bench", "quant", "--child", "--base-dtype", d.name()])
            .arg("--model-path")
            .arg(&args.model.model_path)
            .args(["--tokens", &args.tokens.to_string()])
            .args(["--rounds", &args.rounds.to_string()])
            .args(["--train-steps", &args.train_steps.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        let m: Measured = serde_json::from_str(line).map_err(|e| {
            Error::Unavailable(format!("the {} child printed {text:?}: {e}", d.name()))
        })?;
        Ok(m)
    };
    // Per sitting: each dtype's measures, and llama.cpp's (1 seq, 8 seqs) tok/s.
    let mut sat: Vec<(Vec<Measured>, Option<(f64, f64)>)> = Vec::new();
    let mut llama: std::result::Result<String, String> = Err("not run".into());
    for s in 0..args.sittings.max(1) {
        let rows = args.dtypes.iter().map(child).collect::<Result<Vec<_>>>()?;
        let l = if s == 0 || llama.is_ok() {
            match llama_cpp(args, threads) {
                Ok((v1, v8, version)) => {
                    llama = Ok(version);
                    Some((v1, v8))
                }
                Err(why) => {
                    llama = Err(why);
                    None
                }
            }
        } else {
            None
        };
        sat.push((rows, l));
    }
    let rows: Vec<Measured> = (0..args.dtypes.len())
        .map(|i| median_measured(sat.iter().map(|(r, _)| &r[i])))
        .collect();
    let llama_v: Vec<(f64, f64)> = sat.iter().filter_map(|(_, l)| *l).collect();
    let mut out = format!(
        "Base weights as stored vs expanded: {} ({file_mb:.1} MB file), {threads} threads, \
         greedy decoding of {} tokens after a {}-character chat prompt, median of {} rounds; \
         training step: 1 row x 128 tokens, rank 8 on all targets, median of {} steps. \
         Each dtype in its own process; {} sittings in turn, medians over them.\n\n\
         | engine | weights | weights MB | model RSS MB | decode 1 seq tok/s | 1 seq + adapter tok/s | 8 seqs, 8 adapters tok/s | train step s | peak RSS MB |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        args.model.model_path.display(),
        args.tokens,
        PROMPT.len(),
        args.rounds,
        args.train_steps,
        sat.len(),
    );
    for m in &rows {
        out.push_str(&format!(
            "| loraplex `{}` | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.0} |\n",
            m.dtype,
            m.layout,
            m.weight_mb,
            m.model_rss_mb,
            m.decode1_tok_s,
            m.decode1_lora_tok_s,
            m.decode8_tok_s,
            m.train_step_s,
            m.peak_rss_mb
        ));
    }
    match &llama {
        Ok(version) => out.push_str(&format!(
            "| llama.cpp {version} | as stored | | | {:.1} | | {:.1} | | |\n",
            median(&mut llama_v.iter().map(|l| l.0).collect::<Vec<_>>()),
            median(&mut llama_v.iter().map(|l| l.1).collect::<Vec<_>>()),
        )),
        Err(why) => out.push_str(&format!("\nllama.cpp not measured: {why}\n")),
    }
    out.push('\n');
    // A ratio within each sitting, then their median (and each sitting's, to show spread).
    let ratio = |name: &str, f: &dyn Fn(&[Measured], Option<(f64, f64)>) -> Option<f64>| {
        let mut r: Vec<f64> = sat.iter().filter_map(|(m, l)| f(m, *l)).collect();
        if r.is_empty() {
            return String::new();
        }
        let each: Vec<String> = r.iter().map(|v| format!("{v:.2}x")).collect();
        format!(
            "{name}: {:.2}x (sittings: {}).\n",
            median(&mut r),
            each.join(", ")
        )
    };
    let find = |m: &[Measured], d: &str| m.iter().find(|x| x.dtype == d).cloned();
    out.push_str(&ratio(
        "Single-sequence decode, as stored / llama.cpp",
        &|m, l| Some(find(m, "as-stored")?.decode1_tok_s / l?.0),
    ));
    out.push_str(&ratio("8 sequences, as stored / llama.cpp", &|m, l| {
        Some(find(m, "as-stored")?.decode8_tok_s / l?.1)
    }));
    out.push_str(&ratio("Model RSS as stored / file size", &|m, _| {
        Some(find(m, "as-stored")?.model_rss_mb / file_mb)
    }));
    out.push_str(&ratio("Decode, as stored / f32", &|m, _| {
        Some(find(m, "as-stored")?.decode1_tok_s / find(m, "f32")?.decode1_tok_s)
    }));
    out.push_str(&ratio("Training step time, as stored / f32", &|m, _| {
        Some(find(m, "as-stored")?.train_step_s / find(m, "f32")?.train_step_s)
    }));
    out.push_str(&ratio("Model RSS, as stored / f32", &|m, _| {
        Some(find(m, "as-stored")?.model_rss_mb / find(m, "f32")?.model_rss_mb)
    }));
    Ok(out)
}

/// Field by field, the median of several sittings' measures of one dtype.
fn median_measured<'a>(ms: impl Iterator<Item = &'a Measured> + Clone) -> Measured {
    let first = ms.clone().next().cloned();
    let med = |f: fn(&Measured) -> f64| median(&mut ms.clone().map(f).collect::<Vec<_>>());
    Measured {
        model_rss_mb: med(|m| m.model_rss_mb),
        load_s: med(|m| m.load_s),
        decode1_tok_s: med(|m| m.decode1_tok_s),
        decode1_lora_tok_s: med(|m| m.decode1_lora_tok_s),
        decode8_tok_s: med(|m| m.decode8_tok_s),
        train_step_s: med(|m| m.train_step_s),
        peak_rss_mb: med(|m| m.peak_rss_mb),
        ..first.unwrap_or_else(|| Measured {
            dtype: String::new(),
            layout: String::new(),
            weight_mb: f64::NAN,
            model_rss_mb: f64::NAN,
            load_s: f64::NAN,
            decode1_tok_s: f64::NAN,
            decode1_lora_tok_s: f64::NAN,
            decode8_tok_s: f64::NAN,
            train_step_s: f64::NAN,
            peak_rss_mb: f64::NAN,
        })
    }
}

/// llama.cpp's single- and 8-sequence decode speed on the same file, or why not.
fn llama_cpp(
    args: &QuantBenchArgs,
    threads: usize,
) -> std::result::Result<(f64, f64, String), String> {
    let python = match &args.llama_python {
        Some(p) => p.clone(),
        None => {
            let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
            PathBuf::from(home).join(".cache/loraplex/venv-llama/bin/python")
        }
    };
    if !python.exists() {
        return Err(format!(
            "no {} (scripts/setup-llamacpp.sh installs llama-cpp-python there)",
            python.display()
        ));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-llamacpp.py");
    let run = |batch: usize| -> std::result::Result<(f64, String), String> {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .arg("--model")
            .arg(&args.model.model_path)
            .args(["--threads", &threads.to_string()])
            .args(["--tokens", &args.tokens.to_string()])
            .args(["--rounds", &args.rounds.to_string()])
            .args(["--batch", &batch.to_string()])
            .output()
            .map_err(|e| format!("{}: {e}", python.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| {
                format!(
                    "bench-llamacpp.py printed no result: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let tok_s = v["decode_tok_s_median"]
            .as_f64()
            .ok_or("no decode_tok_s_median")?;
        let version = v["version"].as_str().unwrap_or("?").to_owned();
        Ok((tok_s, version))
    };
    let (v1, version) = run(1)?;
    let (v8, _) = run(8)?;
    Ok((v1, v8, version))
}

/// One dtype, in this process.
fn measure(args: &QuantBenchArgs) -> Result<Measured> {
    let before = rss_bytes().unwrap_or(0);
    let t0 = Instant::now();
    let model = BaseModel::open(&args.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let model_rss = rss_bytes().unwrap_or(0).saturating_sub(before);
    let dev = model.device.clone();
    let lora = |seed: u64| {
        LoraWeights::init(
            &LoraConfig {
                rank: 8,
                alpha: 32.0,
                seed,
                targets: Target::ALL.to_vec(),
                train_unembed: false,
            },
            &model.config,
            &dev,
        )
    };
    let adapters: Vec<LoraWeights> = (0..8).map(lora).collect::<Result<_>>()?;
    let refs: Vec<&LoraWeights> = adapters.iter().collect();
    let tok = model.tokenizer()?;
    let text = match &model.chat_template {
        Some(t) => t.render(
            &[crate::model::Message {
                role: "user".into(),
                content: PROMPT.into(),
            }],
            true,
        )?,
        None => PROMPT.to_owned(),
    };
    let prompt = tok.encode(&text)?;
    // Greedy decoding of `n` sequences, each with adapter `i` when `lora`: tokens/s.
    let decode = |n: usize, with_lora: bool| -> Result<f64> {
        let adapter = |i: usize| with_lora.then_some(i);
        let mut rates = Vec::new();
        for _ in 0..args.rounds {
            let mut caches: Vec<KvCache> = (0..n).map(|_| KvCache::default()).collect();
            let rows: Vec<InferRow> = (0..n)
                .map(|i| InferRow {
                    tokens: &prompt,
                    adapter: adapter(i),
                })
                .collect();
            let mut cs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let (mut logits, _) = model.forward_infer(&rows, &mut cs, &refs, false)?;
            let t = Instant::now();
            for _ in 0..args.tokens {
                let next: Vec<[u32; 1]> = logits
                    .to_dtype(candle_core::DType::F32)?
                    .argmax(1)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|t| [t])
                    .collect();
                let rows: Vec<InferRow> = next
                    .iter()
                    .enumerate()
                    .map(|(i, t)| InferRow {
                        tokens: t,
                        adapter: adapter(i),
                    })
                    .collect();
                let mut cs: Vec<&mut KvCache> = caches.iter_mut().collect();
                logits = model.forward_infer(&rows, &mut cs, &refs, false)?.0;
            }
            rates.push((n * args.tokens) as f64 / t.elapsed().as_secs_f64());
        }
        Ok(median(&mut rates))
    };
    let decode1_tok_s = decode(1, false)?;
    let decode1_lora_tok_s = decode(1, true)?;
    let decode8_tok_s = decode(8, true)?;
    // Training: one row of 128 next-token targets, cross-entropy, AdamW.
    let mut rng = SplitMix64::new(5);
    let vocab = model.config.vocab_size as u64;
    let toks: Vec<u32> = (0..=128).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let data = check_data(&model, vec![Datum::next_token(&toks, 0)])?;
    let mut adapter = TrainableAdapter::new(lora(99)?);
    let cfg = LossConfig::new();
    let mut times = Vec::new();
    for step in 0..=args.train_steps {
        let t = Instant::now();
        let work = [Work {
            adapter: Some(0),
            data: &data,
            loss: &BuiltinLoss::CrossEntropy,
            config: &cfg,
        }];
        let (res, grads) = forward_backward(&model, &[&adapter.weights], &work, false)?;
        for r in res {
            r?;
        }
        for g in grads {
            adapter.accumulate(g)?;
        }
        adapter.optim_step(&AdamParams::default())?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(Measured {
        dtype: args.model.base_dtype.name().to_owned(),
        layout: model.weights.layout(),
        weight_mb: model.weight_bytes() as f64 / 1e6,
        model_rss_mb: model_rss as f64 / 1e6,
        load_s,
        decode1_tok_s,
        decode1_lora_tok_s,
        decode8_tok_s,
        train_step_s: median(&mut times),
        peak_rss_mb: peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / 1e6),
    })
}
