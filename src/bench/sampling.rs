//! `loraplex bench sampling`: what computing a prompt's KV once saves. A group of `n`
//! samples of one long prompt (RL's group sampling), through the job engine, with every
//! sequence prefilling the prompt itself (no sharing, no cache: how loraplex sampled
//! before), with one prefill forked to the `n` sequences, and with the prompt's KV already
//! in the prefix cache from an earlier request of the same sampling session; and the same
//! group sent as `n` requests of one sample at once (how tinker-cookbook's RL loop sends
//! it). Every round runs each case once, in rotating order, on a fresh random prompt;
//! medians over the rounds, so the ratios are measured in the same run.

use super::median;
use crate::config::EngineConfig;
use crate::error::Result;
use crate::jobs::{Engine, JobOutput, SampleRequest, SessionId, TenantId};
use crate::lora::{LoraConfig, Target};
use crate::model::BaseModel;
use crate::sample::SamplingParams;
use crate::util::SplitMix64;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct SamplingBenchArgs {
    #[command(flatten)]
    pub model: crate::config::ModelArgs,
    /// Samples per prompt (the group size).
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Prompt length in tokens (random ids).
    #[arg(long, default_value_t = 256)]
    pub prompt_len: usize,
    /// Tokens generated per sample.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Rounds; each runs every case once.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// One request of n samples, every sequence prefilling the prompt.
    Unshared,
    /// One request of n samples, one prefill forked n ways, nothing cached.
    Forked,
    /// The same request again on a warm prefix cache.
    Cached,
    /// n requests of one sample at once, no sharing.
    SplitUnshared,
    /// n requests of one sample at once, with the prefix cache.
    SplitCached,
}

const CASES: [Case; 5] = [
    Case::Unshared,
    Case::Forked,
    Case::Cached,
    Case::SplitUnshared,
    Case::SplitCached,
];

impl Case {
    fn name(self, n: usize) -> String {
        match self {
            Case::Unshared => format!("1 request x {n} samples, no sharing, no cache"),
            Case::Forked => format!("1 request x {n} samples, one prefill forked (cold cache)"),
            Case::Cached => format!("1 request x {n} samples, prompt in the prefix cache"),
            Case::SplitUnshared => format!("{n} requests x 1 sample at once, no cache"),
            Case::SplitCached => format!("{n} requests x 1 sample at once, prefix cache"),
        }
    }
}

/// One engine per configuration, each with its own adapter's sampling session.
struct Setup {
    engine: Engine,
    tenant: TenantId,
    session: SessionId,
}

async fn setup(model: &Arc<BaseModel>, cfg: EngineConfig) -> Result<Setup> {
    let engine = Engine::with_model(cfg, model.clone())?;
    let tenant = TenantId::from("bench");
    let lora = LoraConfig {
        rank: 8,
        alpha: 32.0,
        seed: 1,
        targets: Target::ALL.to_vec(),
        train_unembed: false,
    };
    let id = engine.create_model(&tenant, lora).await?;
    let session = engine
        .sampling_session(&tenant, &id, None, Duration::from_secs(3600))
        .await?;
    Ok(Setup {
        engine,
        tenant,
        session,
    })
}

/// Submit the requests at once; wall time until the last result, and the cache hits.
async fn run(s: &Setup, reqs: Vec<SampleRequest>) -> Result<(f64, usize)> {
    let t = Instant::now();
    let mut futures = Vec::new();
    for r in reqs {
        futures.push(s.engine.sample(&s.tenant, &s.session, r).await?);
    }
    let mut hits = 0;
    for f in futures {
        let out = s
            .engine
            .result(&s.tenant, &f, Duration::from_secs(3600))
            .await?;
        if let JobOutput::Sample(o) = &*out {
            hits += o.prompt_cache_hit_tokens;
        }
    }
    Ok((t.elapsed().as_secs_f64(), hits))
}

pub fn sampling(args: &SamplingBenchArgs) -> Result<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (dev, _) = crate::model::default_device();
    let model = Arc::new(BaseModel::open(&args.model)?);
    let n = args.samples.max(1);
    let unshared = EngineConfig {
        share_prompt_kv: false,
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    };
    let forked = EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    };
    let (a, b, c) = rt.block_on(async {
        Ok::<_, crate::Error>((
            setup(&model, unshared).await?,
            setup(&model, forked).await?,
            setup(&model, EngineConfig::default()).await?,
        ))
    })?;
    let vocab = model.config.vocab_size as u64;
    let mut rng = SplitMix64::new(42);
    let mut prompt = || -> Vec<u32> {
        (0..args.prompt_len)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect()
    };
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: 1.0,
        seed: Some(7),
        ..Default::default()
    };
    let group = |p: &[u32]| {
        let mut r = SampleRequest::new(p.to_vec(), params.clone());
        r.num_samples = n;
        vec![r]
    };
    let split = |p: &[u32]| -> Vec<SampleRequest> {
        (0..n)
            .map(|i| {
                let mut q = params.clone();
                q.seed = Some(7 + i as u64);
                SampleRequest::new(p.to_vec(), q)
            })
            .collect()
    };
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    let mut hits: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    // A warm-up round (untimed) first: the first pass of each engine pays for page faults.
    for round in 0..=args.repeats.max(1) {
        let p = prompt();
        // The cached case samples a prompt its session has seen: warm it first, untimed.
        rt.block_on(run(&c, group(&p)))?;
        let fresh = prompt();
        for k in 0..CASES.len() {
            let i = (k + round) % CASES.len();
            let (wall, hit) = rt.block_on(async {
                match CASES[i] {
                    Case::Unshared => run(&a, group(&p)).await,
                    Case::Forked => run(&b, group(&p)).await,
                    Case::Cached => run(&c, group(&p)).await,
                    Case::SplitUnshared => run(&a, split(&p)).await,
                    Case::SplitCached => run(&c, split(&fresh)).await,
                }
            })?;
            if round > 0 {
                walls[i].push(wall);
                hits[i].push(hit as f64);
            }
        }
    }
    let generated = (n * args.max_tokens) as f64;
    let base = median(&mut walls[0].clone());
    let mut out = format!(
        "model {} ({:?}); a LoRA adapter (rank 8, all layers); {n} samples of a {}-token random prompt, {} tokens each, temperature 1; median of {} rounds (cases in rotating order)\n\n| case | median wall s | generated tokens/s | speed-up vs no sharing | prompt_cache_hit_tokens (sum per group) |\n|---|---|---|---|---|\n",
        model.name, dev, args.prompt_len, args.max_tokens, args.repeats.max(1)
    );
    for (i, case) in CASES.iter().enumerate() {
        let w = median(&mut walls[i]);
        let h = median(&mut hits[i]);
        out.push_str(&format!(
            "| {} | {w:.2} | {:.1} | {:.2}x | {h:.0} |\n",
            case.name(n),
            generated / w,
            base / w
        ));
    }
    Ok(out)
}
