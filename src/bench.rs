//! Benchmarks that print tables (`loraplex bench ...`). Timings are medians over several
//! steps after a warm-up; peak RSS is reset per case where the OS allows.

use crate::error::Result;
use crate::lora::optim::AdamParams;
use crate::lora::{LoraConfig, LoraWeights, Target};
use crate::model::BaseModel;
use crate::train::loss::{BuiltinLoss, LossConfig};
use crate::train::{forward_backward, Datum, TrainableAdapter, Work};
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
    let (dev, dt) = crate::model::default_device();
    let t0 = Instant::now();
    let model = BaseModel::load(&args.model.model_path, &args.model.model_name, &dev, dt)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cases = [
        Case {
            name: "fwd 1x128 (all)",
            targets: ALL,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: true,
        },
        Case {
            name: "train 1x128 q,v",
            targets: QV,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: false,
        },
        Case {
            name: "train 4x128 q,v",
            targets: QV,
            rows: 4,
            adapters: 1,
            sequential: false,
            forward_only: false,
        },
        Case {
            name: "train 1x128 all",
            targets: ALL,
            rows: 1,
            adapters: 1,
            sequential: false,
            forward_only: false,
        },
        Case {
            name: "train 4x128 all",
            targets: ALL,
            rows: 4,
            adapters: 1,
            sequential: false,
            forward_only: false,
        },
        Case {
            name: "4 adapters x 1x128 all, one batch",
            targets: ALL,
            rows: 1,
            adapters: 4,
            sequential: false,
            forward_only: false,
        },
        Case {
            name: "4 adapters x 1x128 all, one after another",
            targets: ALL,
            rows: 1,
            adapters: 4,
            sequential: true,
            forward_only: false,
        },
    ];
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
        let data: Vec<Vec<Datum>> = (0..case.adapters)
            .map(|_| {
                (0..case.rows)
                    .map(|_| {
                        let toks: Vec<u32> = (0..=args.seq_len)
                            .map(|_| (rng.next_u64() % vocab) as u32)
                            .collect();
                        Datum::next_token(&toks, 0)
                    })
                    .collect()
            })
            .collect();
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
                let (res, grads) = forward_backward(&model, &weights, &work, case.forward_only)?;
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
    let (dev, dt) = crate::model::default_device();
    let m = BaseModel::load(&model.model_path, &model.model_name, &dev, dt)?;
    let mut rng = SplitMix64::new(7);
    let vocab = m.config.vocab_size as u64;
    let data: Vec<Datum> = (0..4)
        .map(|_| {
            let toks: Vec<u32> = (0..=128).map(|_| (rng.next_u64() % vocab) as u32).collect();
            Datum::next_token(&toks, 0)
        })
        .collect();
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
