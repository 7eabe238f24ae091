//! Benchmarks that print tables (`loraplex bench ...`). Timings are medians over several
//! steps after a warm-up; peak RSS is reset per case where the OS allows. The load and
//! soak benchmark against a real server lives in [`load`]; prompt sharing and the prefix
//! cache in [`sampling`]; many adapters in bounded memory in [`adapters`]; base weights as
//! stored against expanded, and against llama.cpp, in [`quant`].

pub mod adapters;
pub mod load;
pub mod quant;
pub mod sampling;

pub use adapters::{adapters, AdaptersBenchArgs};
pub use quant::{quant, QuantBenchArgs};
pub use sampling::{sampling, SamplingBenchArgs};

use crate::error::Result;
use crate::lora::optim::AdamParams;
use crate::lora::{LoraConfig, LoraWeights, Target};
use crate::model::BaseModel;
use crate::train::loss::{BuiltinLoss, LossConfig};
use crate::train::{check_data, forward_backward, CheckedDatum, Datum, TrainableAdapter, Work};
use crate::util::{peak_rss_bytes, reset_peak_rss, SplitMix64};
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    pub model: crate::config::ModelArgs,
    /// Timed steps per case (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Run only cases whose name contains this.
    #[arg(long)]
    pub case: Option<String>,
}

struct Case {
    name: &'static str,
    targets: &'static [Target],
    rows: usize,
    adapters: usize,
    /// Run each adapter's step one after another instead of in one batch.
    sequential: bool,
    forward_only: bool,
    /// On candle's general ops instead of the host training pass (the reference).
    candle: bool,
}

const QV: &[Target] = &[Target::Q, Target::V];
const ALL: &[Target] = &Target::ALL;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn train(args: &TrainBenchArgs) -> Result<String> {
    let (dev, _) = crate::model::default_device();
    let t0 = Instant::now();
    let model = BaseModel::open(&args.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cases = [
        Case {
            name: "fwd 1x128 (all)",
            targets: ALL,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: true,
            candle: false,
        },
        Case {
            name: "train 1x128 q,v",
            targets: QV,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: false,
            candle: false,
        },
        Case {
            name: "train 4x128 q,v",
            targets: QV,
            rows: 4,
            adapters: 1,
            sequential: false,
            forward_only: false,
            candle: false,
        },
        Case {
            name: "train 1x128 all",
            targets: ALL,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: false,
            candle: false,
        },
        Case {
            name: "train 4x128 all",
            targets: ALL,
            rows: 4,
            adapters: 1,
            sequential: false,
            forward_only: false,
            candle: false,
        },
        Case {
            name: "4 adapters x 1x128 all, one batch",
            targets: ALL,
            rows: 1,
            adapters: 4,
            sequential: false,
            forward_only: false,
            candle: false,
        },
        Case {
            name: "4 adapters x 1x128 all, one after another",
            targets: ALL,
            rows: 1,
            adapters: 4,
            sequential: true,
            forward_only: false,
            candle: false,
        },
        Case {
            name: "train 1x128 all, candle ops (reference)",
            targets: ALL,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: false,
            candle: true,
        },
        Case {
            name: "4 adapters x 1x128 all, one batch, candle ops (reference)",
            targets: ALL,
            rows: 1,
            adapters: 4,
            sequential: false,
            forward_only: false,
            candle: true,
        },
    ];
    let reference = model.with_candle_backend();
    let mut out = format!(
        "model {} ({} layers, hidden {}), loaded in {:.2} s; rank {}, {} tokens/row, {} timed steps after 1 warm-up, {:?}\n\n",
        model.name, model.config.num_layers, model.config.hidden_size, load_s, args.rank, args.seq_len, args.steps, dev
    );
    out.push_str("| case | median s/step | tokens/s | peak RSS MB |\n|---|---|---|---|\n");
    let mut rng = SplitMix64::new(1234);
    let vocab = model.config.vocab_size as u64;
    let loss_cfg = LossConfig::new();
    for case in cases.iter().filter(|c| {
        args.case
            .as_ref()
            .is_none_or(|s| c.name.contains(s.as_str()))
    }) {
        reset_peak_rss();
        let mut adapters: Vec<TrainableAdapter> = (0..case.adapters)
            .map(|i| {
                let cfg = LoraConfig {
                    rank: args.rank,
                    alpha: 32.0,
                    seed: i as u64,
                    targets: case.targets.to_vec(),
                    train_unembed: false,
                };
                LoraWeights::init(&cfg, &model.config, &dev).map(TrainableAdapter::new)
            })
            .collect::<Result<_>>()?;
        let data: Vec<Vec<CheckedDatum>> = (0..case.adapters)
            .map(|_| {
                let data = (0..case.rows)
                    .map(|_| {
                        let toks: Vec<u32> = (0..=args.seq_len)
                            .map(|_| (rng.next_u64() % vocab) as u32)
                            .collect();
                        Datum::next_token(&toks, 0)
                    })
                    .collect();
                check_data(&model, data)
            })
            .collect::<Result<_>>()?;
        let tokens = case.adapters * case.rows * args.seq_len;
        let mut times = Vec::new();
        for step in 0..=args.steps {
            let t = Instant::now();
            let groups: Vec<Vec<usize>> = if case.sequential {
                (0..case.adapters).map(|a| vec![a]).collect()
            } else {
                vec![(0..case.adapters).collect()]
            };
            for g in groups {
                let weights: Vec<&LoraWeights> = adapters.iter().map(|a| &a.weights).collect();
                let work: Vec<Work> = g
                    .iter()
                    .map(|&a| Work {
                        adapter: Some(a),
                        data: &data[a],
                        loss: &BuiltinLoss::CrossEntropy,
                        config: &loss_cfg,
                    })
                    .collect();
                let m = if case.candle { &reference } else { &model };
                let (res, grads) = forward_backward(m, &weights, &work, case.forward_only)?;
                for r in res {
                    r?;
                }
                if !case.forward_only {
                    for (a, gr) in adapters.iter_mut().zip(grads) {
                        if !gr.is_empty() {
                            a.accumulate(gr)?;
                            a.optim_step(&AdamParams::default())?;
                        }
                    }
                }
            }
            if step > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let med = median(&mut times);
        let rss = peak_rss_bytes().map_or("?".to_string(), |b| format!("{:.0}", b as f64 / 1e6));
        out.push_str(&format!(
            "| {} | {:.3} | {:.1} | {} |\n",
            case.name,
            med,
            tokens as f64 / med,
            rss
        ));
    }
    if args
        .case
        .as_ref()
        .is_none_or(|s| "candle".contains(s.as_str()))
    {
        out.push_str(&candle_attention_table(&model, args, &mut rng)?);
    }
    Ok(out)
}

/// The candle backend's attention one row at a time (a scores budget of 0: one row per
/// group, as the per-row pass ran it) against all rows in padded groups, on a training
/// step of 4 adapters with rows of mixed lengths. Forward and backward, no optimizer step.
fn candle_attention_table(
    model: &BaseModel,
    args: &TrainBenchArgs,
    rng: &mut SplitMix64,
) -> Result<String> {
    let vocab = model.config.vocab_size as u64;
    let loss_cfg = LossConfig::new();
    let lens = [
        args.seq_len,
        args.seq_len / 2,
        args.seq_len * 3 / 4,
        args.seq_len / 4,
    ];
    let adapters: Vec<LoraWeights> = (0..4)
        .map(|i| {
            let cfg = LoraConfig {
                rank: args.rank * (1 + i % 2),
                alpha: 32.0,
                seed: i as u64,
                targets: ALL.to_vec(),
                train_unembed: false,
            };
            LoraWeights::init(&cfg, &model.config, &model.device)
        })
        .collect::<Result<_>>()?;
    let weights: Vec<&LoraWeights> = adapters.iter().collect();
    let data: Vec<Vec<CheckedDatum>> = lens
        .iter()
        .map(|&n| {
            let data = (0..2)
                .map(|r| {
                    let toks: Vec<u32> = (0..=n.max(2) - r)
                        .map(|_| (rng.next_u64() % vocab) as u32)
                        .collect();
                    Datum::next_token(&toks, 0)
                })
                .collect();
            check_data(model, data)
        })
        .collect::<Result<_>>()?;
    // Rows of n and n − 1 input tokens per adapter.
    let tokens: usize = lens.iter().map(|&n| 2 * n.max(2) - 1).sum();
    let mut out = format!(
        "\ncandle backend, 4 adapters (ranks {} and {}) x 2 rows of {:?} tokens, one batch, forward + backward\n\n| attention | median s/step | tokens/s |\n|---|---|---|\n",
        args.rank,
        2 * args.rank,
        lens
    );
    for (name, m) in [
        ("one row at a time", model.with_candle_scores_budget(0)),
        ("all rows, padded groups", model.with_candle_backend()),
    ] {
        let work: Vec<Work> = data
            .iter()
            .enumerate()
            .map(|(a, d)| Work {
                adapter: Some(a),
                data: d,
                loss: &BuiltinLoss::CrossEntropy,
                config: &loss_cfg,
            })
            .collect();
        let mut times = Vec::new();
        for step in 0..=args.steps {
            let t = Instant::now();
            let (res, _grads) = forward_backward(&m, &weights, &work, false)?;
            for r in res {
                r?;
            }
            if step > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let med = median(&mut times);
        out.push_str(&format!(
            "| {name} | {med:.3} | {:.1} |\n",
            tokens as f64 / med
        ));
    }
    Ok(out)
}

/// `loraplex bench plugins`: the plugin table, then the same plugins' cost as a share of
/// the model work they ride on, measured in the same process: a wasm loss against a 4x128
/// SmolLM2 forward_backward, a wasm sampler step against one decode step.
pub fn plugins(model: &crate::config::ModelArgs) -> Result<String> {
    let dist = std::env::var_os("LORAPLEX_PLUGIN_DIST")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist")
        });
    let rows = crate::plugins::bench::measure(&dist).map_err(crate::Error::Plugin)?;
    let mut out = crate::plugins::bench::table(&rows);
    let (dev, _) = crate::model::default_device();
    let m = BaseModel::open(&model)?;
    let mut rng = SplitMix64::new(7);
    let vocab = m.config.vocab_size as u64;
    let data: Vec<Datum> = (0..4)
        .map(|_| {
            let toks: Vec<u32> = (0..=128).map(|_| (rng.next_u64() % vocab) as u32).collect();
            Datum::next_token(&toks, 0)
        })
        .collect();
    let data = check_data(&m, data)?;
    let cfg = LoraConfig {
        rank: 8,
        alpha: 32.0,
        seed: 0,
        targets: ALL.to_vec(),
        train_unembed: false,
    };
    let w = LoraWeights::init(&cfg, &m.config, &dev)?;
    let lc = LossConfig::new();
    let mut fb = Vec::new();
    for i in 0..4 {
        let t = Instant::now();
        let work = [Work {
            adapter: Some(0),
            data: &data,
            loss: &BuiltinLoss::CrossEntropy,
            config: &lc,
        }];
        forward_backward(&m, &[&w], &work, false)?;
        if i > 0 {
            fb.push(t.elapsed().as_secs_f64());
        }
    }
    let fb = median(&mut fb);
    let mut cache = crate::model::KvCache::default();
    let prompt: Vec<u32> = (0..16).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let mut last = *prompt.last().unwrap_or(&0);
    m.forward_infer(
        &[crate::model::InferRow {
            tokens: &prompt,
            adapter: None,
        }],
        &mut [&mut cache],
        &[],
        false,
    )?;
    let mut steps = Vec::new();
    for _ in 0..32 {
        let t = Instant::now();
        let row = [crate::model::InferRow {
            tokens: std::slice::from_ref(&last),
            adapter: None,
        }];
        let (logits, _) = m.forward_infer(&row, &mut [&mut cache], &[], false)?;
        let v = logits.to_vec2::<f32>()?;
        last = crate::sample::choose(
            &v[0],
            &crate::sample::SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            &[],
            &mut rng,
        )
        .0;
        steps.push(t.elapsed().as_secs_f64());
    }
    let step = median(&mut steps);
    out.push_str(&format!(
        "\nSmolLM2 in the same run: forward_backward 4x128 (all layers, rank 8) {:.3} s; decode step (1 sequence, KV cache) {:.1} ms\n\n| plugin cost | share of the model work |\n|---|---|\n",
        fb,
        step * 1e3
    ));
    for (case, _, wasm) in &rows {
        let share = if case.starts_with("ppo loss, 4x128") || case.starts_with("dro loss, 4x128") {
            wasm.as_secs_f64() / fb
        } else if case.contains("step") {
            wasm.as_secs_f64() / step
        } else {
            continue;
        };
        out.push_str(&format!("| {case} | {:.4}% |\n", share * 100.0));
    }
    Ok(out)
}

#[derive(Debug, Clone, clap::Args)]
pub struct TenantsBenchArgs {
    #[command(flatten)]
    pub model: crate::config::ModelArgs,
    #[command(flatten)]
    pub engine: crate::config::EngineConfig,
    /// Tenant counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub tenants: Vec<usize>,
    /// forward_backward + optim_step steps per tenant.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Tokens each tenant samples after training.
    #[arg(long, default_value_t = 32)]
    pub sample_tokens: usize,
    /// Runs of each mode per tenant count, alternating which goes first; walls are the
    /// medians and the speed-up their ratio (this machine drifts ±10% between runs).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
}

/// Rounds of the decode comparison (medians reported).
const DECODE_REPEATS: usize = 3;

/// What one tenant's run measured.
struct TenantRun {
    /// Per step: submit of forward_backward to the end of its optim_step.
    steps: Vec<f64>,
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let k = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[k - 1]
}

async fn tenant_run(
    engine: crate::jobs::Engine,
    tenant: crate::jobs::TenantId,
    model: crate::jobs::AdapterId,
    data: Vec<Datum>,
    steps: usize,
    sample_tokens: usize,
) -> Result<TenantRun> {
    use crate::jobs::{FbRequest, Op, SampleRequest};
    use std::sync::Arc;
    let wait = std::time::Duration::from_secs(3600);
    let mut lat = Vec::new();
    let mut seq = 0u64;
    for _ in 0..steps {
        let t = Instant::now();
        let op = Op::ForwardBackward(FbRequest {
            data: data.clone(),
            loss: Arc::new(BuiltinLoss::CrossEntropy),
            loss_config: LossConfig::new(),
        });
        let f1 = engine.submit(&tenant, &model, Some(seq), op).await?;
        let f2 = engine
            .submit(
                &tenant,
                &model,
                Some(seq + 1),
                Op::OptimStep(AdamParams::default()),
            )
            .await?;
        seq += 2;
        engine.result(&tenant, &f1, wait).await?;
        engine.result(&tenant, &f2, wait).await?;
        lat.push(t.elapsed().as_secs_f64());
    }
    let session = engine
        .sampling_session(&tenant, &model, Some(seq), wait)
        .await?;
    let prompt: Vec<u32> = data[0].model_input[..8.min(data[0].model_input.len())].to_vec();
    let req = SampleRequest::new(
        prompt,
        crate::sample::SamplingParams {
            max_tokens: sample_tokens,
            temperature: 0.0,
            ..Default::default()
        },
    );
    let f = engine.sample(&tenant, &session, req).await?;
    engine.result(&tenant, &f, wait).await?;
    Ok(TenantRun { steps: lat })
}

/// `loraplex bench tenants`: N tenants train and sample at once, against the same work run
/// tenant after tenant on the same engine; and batched against single-sequence decoding.
pub fn tenants(args: &TenantsBenchArgs) -> Result<String> {
    use crate::jobs::{Engine, SampleRequest, TenantId};
    use std::sync::Arc;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (dev, _) = crate::model::default_device();
    let t0 = Instant::now();
    let model = Arc::new(BaseModel::open(&args.model)?);
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u64;
    let mut out = format!(
        "model {} loaded in {:.2} s; per tenant: {} x (forward_backward 1x{} + optim_step), then a {}-token sample; rank {}; MAX_WORKERS {}, batch budget {} tokens; {:?}\n\n",
        model.name, load_s, args.steps, args.seq_len, args.sample_tokens, args.rank,
        args.engine.max_workers, args.engine.max_batch_tokens, dev
    );
    out.push_str("| tenants | together wall s | one after another wall s | speed-up | together tokens/s | one after another tokens/s | step p50 s (median tenant) | step p95 s (worst tenant) | worst p95 / mean |\n|---|---|---|---|---|---|---|---|---|\n");
    let lora = |seed: u64| LoraConfig {
        rank: args.rank,
        alpha: 32.0,
        seed,
        targets: Target::ALL.to_vec(),
        train_unembed: false,
    };
    let mut rng = SplitMix64::new(99);
    for &n in &args.tenants {
        let data: Vec<Vec<Datum>> = (0..n)
            .map(|_| {
                let toks: Vec<u32> = (0..=args.seq_len)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect();
                vec![Datum::next_token(&toks, 0)]
            })
            .collect();
        let tokens = (n * (args.steps * args.seq_len + args.sample_tokens)) as f64;
        let mut wall_runs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut runs_together = Vec::new();
        let repeats = args.repeats.max(1);
        // Together first in even repeats, one after another first in odd ones.
        for mode in (0..repeats).flat_map(|r| [r % 2, 1 - r % 2]) {
            let together = mode == 0;
            let r: Result<Vec<TenantRun>> = rt.block_on(async {
                let engine = Engine::with_model(args.engine.clone(), model.clone())?;
                let mut ids = Vec::new();
                for i in 0..n {
                    let t = TenantId(format!("tenant-{i}"));
                    let id = engine.create_model(&t, lora(i as u64)).await?;
                    ids.push((t, id));
                }
                let t = Instant::now();
                let mut runs = Vec::new();
                if together {
                    let tasks: Vec<_> = ids
                        .into_iter()
                        .zip(&data)
                        .map(|((t, id), d)| {
                            tokio::spawn(tenant_run(
                                engine.clone(),
                                t,
                                id,
                                d.clone(),
                                args.steps,
                                args.sample_tokens,
                            ))
                        })
                        .collect();
                    for task in tasks {
                        runs.push(task.await.map_err(|e| {
                            crate::Error::Unavailable(format!("bench task: {e}"))
                        })??);
                    }
                } else {
                    for ((t, id), d) in ids.into_iter().zip(&data) {
                        runs.push(
                            tenant_run(
                                engine.clone(),
                                t,
                                id,
                                d.clone(),
                                args.steps,
                                args.sample_tokens,
                            )
                            .await?,
                        );
                    }
                }
                wall_runs[mode].push(t.elapsed().as_secs_f64());
                Ok(runs)
            });
            let r = r?;
            if together {
                runs_together.extend(r);
            }
        }
        let walls = wall_runs.map(|mut w| median(&mut w));
        let all: Vec<f64> = runs_together.iter().flat_map(|r| r.steps.clone()).collect();
        let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
        let mut p50s: Vec<f64> = runs_together
            .iter()
            .map(|r| percentile(&r.steps, 0.5))
            .collect();
        let p95s: Vec<f64> = runs_together
            .iter()
            .map(|r| percentile(&r.steps, 0.95))
            .collect();
        let worst = p95s.iter().copied().fold(0.0, f64::max);
        out.push_str(&format!(
            "| {n} | {:.2} | {:.2} | {:.2}x | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
            walls[0],
            walls[1],
            walls[1] / walls[0],
            tokens / walls[0],
            tokens / walls[1],
            median(&mut p50s),
            worst,
            worst / mean
        ));
    }
    // Decoding: 8 adapters' sequences batched against one sequence alone.
    let decode: Result<(f64, f64)> = rt.block_on(async {
        let engine = Engine::with_model(args.engine.clone(), model.clone())?;
        let t = TenantId("decode".into());
        let mut sessions = Vec::new();
        for i in 0..8u64 {
            let id = engine.create_model(&t, lora(100 + i)).await?;
            let wait = std::time::Duration::from_secs(3600);
            sessions.push(engine.sampling_session(&t, &id, None, wait).await?);
        }
        let req = || {
            SampleRequest::new(
                vec![1, 2, 3, 4, 5, 6, 7, 8],
                crate::sample::SamplingParams {
                    max_tokens: args.sample_tokens,
                    temperature: 0.0,
                    ..Default::default()
                },
            )
        };
        let wait = std::time::Duration::from_secs(3600);
        // Alternate the two cases and take medians: the machine's load drifts.
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..DECODE_REPEATS {
            for (k, count) in [1usize, 8].into_iter().enumerate() {
                let start = Instant::now();
                let mut futs = Vec::new();
                for s in &sessions[..count] {
                    futs.push(engine.sample(&t, s, req()).await?);
                }
                for f in futs {
                    engine.result(&t, &f, wait).await?;
                }
                rates[k].push((count * args.sample_tokens) as f64 / start.elapsed().as_secs_f64());
            }
        }
        let [mut one, mut eight] = rates;
        Ok((median(&mut one), median(&mut eight)))
    });
    let (one, eight) = decode?;
    out.push_str(&format!(
        "\n| decoding ({} tokens, 8-token prompt, greedy; median of 3) | tokens/s |\n|---|---|\n| 1 sequence | {:.1} |\n| 8 adapters batched | {:.1} ({:.2}x) |\n",
        args.sample_tokens, one, eight, eight / one
    ));
    Ok(out)
}

/// The model's own quantized blocks read in place against f32 copies of the same weights:
/// `x · Wᵀ` by rows of `x`, and `dy · W` (the backward pass's input gradient).
fn quantized_products(model_args: &crate::config::ModelArgs) -> Result<String> {
    use crate::model::backend::cpu::kernels::matmul_nt;
    use crate::model::backend::cpu::quant::{qmatmul_nn_acc, qmatmul_nt};
    use crate::model::weights::GgufFile;
    if model_args
        .model_path
        .extension()
        .is_none_or(|e| e != "gguf")
    {
        return Ok(String::new());
    }
    let mut f = GgufFile::open(&model_args.model_path)?;
    let mut qs = Vec::new();
    for l in 0.. {
        let name = format!("blk.{l}.ffn_gate.weight");
        if !f.has(&name) {
            break;
        }
        qs.extend(f.quantized(&name)?);
    }
    let Some(first) = qs.first() else {
        return Ok(
            "The model's ffn_gate weights are not block-quantized: no quantized table.\n\n".into(),
        );
    };
    let (n, k, kind) = (first.rows(), first.cols(), first.kind().name());
    let qs: Vec<_> = qs
        .into_iter()
        .filter(|q| (q.rows(), q.cols()) == (n, k))
        .collect();
    let fs: Vec<Vec<f32>> = qs.iter().map(|q| q.to_f32()).collect();
    let (qmb, fmb) = (
        qs.iter().map(|q| q.bytes()).sum::<usize>() as f64 / 1e6,
        (fs.len() * n * k * 4) as f64 / 1e6,
    );
    let mut out = format!(
        "Quantized weights read in place: x[m, {k}] · Wᵀ over the model's {} ffn_gate weights ({} [{n}, {k}], {qmb:.0} MB as stored, {fmb:.0} MB in f32); median of 5, µs per matmul\n\n| m | f32 host kernel µs | {} in place µs | f32 / quantized |\n|---|---|---|---|\n",
        qs.len(),
        kind,
        kind,
    );
    let mut rng = SplitMix64::new(9);
    let mut rand = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    for m in [1usize, 2, 4, 8, 16, 64, 128] {
        let x = rand(m * k);
        let (mut f32s, mut quant) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            for w in &fs {
                std::hint::black_box(matmul_nt(&x, m, k, w, n));
            }
            f32s.push(t.elapsed().as_secs_f64() * 1e6 / fs.len() as f64);
            let t = Instant::now();
            for q in &qs {
                std::hint::black_box(qmatmul_nt(&x, m, q));
            }
            quant.push(t.elapsed().as_secs_f64() * 1e6 / qs.len() as f64);
        }
        let (a, b) = (median(&mut f32s), median(&mut quant));
        out.push_str(&format!("| {m} | {a:.0} | {b:.0} | {:.2}x |\n", a / b));
    }
    // dy · W at a training batch's row count, against the f32 GEMM on the same weights.
    let m = 128;
    let dy = rand(m * n);
    let (mut f32s, mut quant) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        for w in &fs {
            let a = candle_core::Tensor::from_slice(&dy, (m, n), &candle_core::Device::Cpu)?;
            let b = candle_core::Tensor::from_slice(w, (n, k), &candle_core::Device::Cpu)?;
            std::hint::black_box(a.matmul(&b)?);
        }
        f32s.push(t.elapsed().as_secs_f64() * 1e6 / fs.len() as f64);
        let t = Instant::now();
        for q in &qs {
            let mut o = vec![0f32; m * k];
            qmatmul_nn_acc(&dy, m, q, &mut o);
            std::hint::black_box(o);
        }
        quant.push(t.elapsed().as_secs_f64() * 1e6 / qs.len() as f64);
    }
    let (a, b) = (median(&mut f32s), median(&mut quant));
    out.push_str(&format!(
        "\ndy[{m}, {n}] · W (backward input gradient): f32 GEMM {a:.0} µs, {} in place {b:.0} µs ({:.2}x)\n\n",
        kind,
        a / b
    ));
    Ok(out)
}

/// `loraplex bench kernels`: the host matmul against candle's GEMM on weights too big for
/// the caches (as in a decode step), and whole decode steps of B sequences of B adapters.
pub fn kernels(model_args: &crate::config::ModelArgs) -> Result<String> {
    use crate::model::backend::cpu::kernels::{matmul_nt, SMALL_M};
    use crate::model::{InferRow, KvCache};
    use candle_core::{Device, Tensor};
    const REPS: usize = 5;
    let dev = Device::Cpu;
    let mut out = String::from(
        "Matmul x[m, 576] · W[3072, 576]ᵀ over 30 distinct weights (212 MB, colder than any cache); median of 5, µs per matmul\n\n| m | candle GEMM µs | host kernel µs | GEMM / host |\n|---|---|---|---|\n",
    );
    let (n, k) = (3072usize, 576usize);
    let mut rng = SplitMix64::new(7);
    let mut rand = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let wv: Vec<Vec<f32>> = (0..30).map(|_| rand(n * k)).collect();
    let ws: Vec<Tensor> = wv
        .iter()
        .map(|w| Tensor::from_slice(w, (n, k), &dev))
        .collect::<candle_core::Result<_>>()?;
    for m in [1usize, 2, 4, 8, 16, 32, 64, 128] {
        let xv = rand(m * k);
        let x = Tensor::from_slice(&xv, (m, k), &dev)?;
        let (mut gemm, mut host) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            let t = Instant::now();
            for w in &ws {
                x.matmul(&w.t()?)?;
            }
            gemm.push(t.elapsed().as_secs_f64() * 1e6 / ws.len() as f64);
            let t = Instant::now();
            for w in &wv {
                std::hint::black_box(matmul_nt(&xv, m, k, w, n));
            }
            host.push(t.elapsed().as_secs_f64() * 1e6 / wv.len() as f64);
        }
        let (g, h) = (median(&mut gemm), median(&mut host));
        out.push_str(&format!("| {m} | {g:.0} | {h:.0} | {:.2}x |\n", g / h));
    }
    out.push_str(&format!(
        "\nInference uses the host kernel up to m = {SMALL_M} rows.\n\n"
    ));
    out.push_str(&quantized_products(model_args)?);
    // Decode steps of B sequences, each with its own rank-8 adapter on all 7 targets.
    let (dev, _) = crate::model::default_device();
    let model = BaseModel::open(&model_args)?;
    let adapters: Vec<LoraWeights> = (0..8)
        .map(|i| {
            let c = LoraConfig {
                rank: 8,
                alpha: 32.0,
                seed: i,
                targets: Target::ALL.to_vec(),
                train_unembed: false,
            };
            LoraWeights::init(&c, &model.config, &dev)
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&LoraWeights> = adapters.iter().collect();
    out.push_str("Decode steps (8-token prompts, then 16 one-token steps each; median of 3 rounds, alternating)\n\n| sequences (one adapter each) | ms per step | tokens/s | vs 1 sequence |\n|---|---|---|---|\n");
    let sizes = [1usize, 2, 4, 8];
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let prompt: Vec<u32> = (1..=8).collect();
    for _ in 0..3 {
        for (si, &b) in sizes.iter().enumerate() {
            let mut caches: Vec<KvCache> = (0..b).map(|_| KvCache::default()).collect();
            let rows: Vec<InferRow> = (0..b)
                .map(|i| InferRow {
                    tokens: &prompt,
                    adapter: Some(i),
                })
                .collect();
            let mut cs: Vec<&mut KvCache> = caches.iter_mut().collect();
            model.forward_infer(&rows, &mut cs, &refs, false)?;
            let tok = [42u32];
            let t = Instant::now();
            for _ in 0..16 {
                let rows: Vec<InferRow> = (0..b)
                    .map(|i| InferRow {
                        tokens: &tok,
                        adapter: Some(i),
                    })
                    .collect();
                let mut cs: Vec<&mut KvCache> = caches.iter_mut().collect();
                model.forward_infer(&rows, &mut cs, &refs, false)?;
            }
            ms[si].push(t.elapsed().as_secs_f64() * 1e3 / 16.0);
        }
    }
    let one = median(&mut ms[0].clone());
    for (&b, v) in sizes.iter().zip(ms.iter_mut()) {
        let m = median(v);
        out.push_str(&format!(
            "| {b} | {m:.1} | {:.1} | {:.2}x |\n",
            b as f64 * 1e3 / m,
            b as f64 * one / m
        ));
    }
    Ok(out)
}
