//! The `loraplex` command: benchmarks and small tools around the library.

use clap::{Parser, Subcommand};
use loraplex::config::ModelArgs;

#[derive(Parser)]
#[command(
    name = "loraplex",
    version,
    about = "Multi-tenant LoRA training on one base model"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the HTTP API (Tinker SDK protocol and REST routes) on one base model, or on
    /// several (`--model NAME=PATH`, repeated).
    Serve {
        #[command(flatten)]
        serve: loraplex::config::ServeConfig,
        #[command(flatten)]
        model: loraplex::config::ServedModels,
        #[command(flatten)]
        engine: loraplex::config::EngineConfig,
    },
    /// Write the base model as a Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template), or all but the
    /// weights: for clients that tokenize locally without the Hub (tinker-cookbook).
    ExportHf {
        #[command(flatten)]
        model: ModelArgs,
        /// The directory to write (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Everything but model.safetensors.
        #[arg(long)]
        tokenizer_only: bool,
    },
    /// Benchmarks that print tables.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Greedy or sampled generation from a prompt (text rendered with the chat template).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Text that ends the generation at the token that completes it (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training steps on the base model: tokens/s and peak RSS per case.
    Train(loraplex::bench::TrainBenchArgs),
    /// wasm loss and sampler plugins against native code and against the model work.
    Plugins(loraplex::config::ModelArgs),
    /// N tenants training and sampling at once through the job engine, against the same
    /// work run tenant after tenant; batched against single-sequence decoding.
    Tenants(loraplex::bench::TenantsBenchArgs),
    /// The host inference kernels against candle's GEMM, and decode steps by batch size.
    Kernels(loraplex::config::ModelArgs),
    /// Base weights as stored (GGUF blocks) against bf16 and f32, and against llama.cpp on
    /// the same file: decode speed, a training step, the model's memory.
    Quant(loraplex::bench::QuantBenchArgs),
    /// A group of samples of one long prompt: every sequence prefilling it, one prefill
    /// forked, the prompt in the prefix cache; as one request and as many at once.
    Sampling(loraplex::bench::SamplingBenchArgs),
    /// Many tenants' mixed traffic, good and bad, against a real `loraplex serve` on
    /// loopback for a bounded time: throughput, latency, answers, RSS; fails on any
    /// failed good request, 5xx or accepted bad request.
    Load(loraplex::bench::load::LoadBenchArgs),
    /// Thousands of adapters in bounded memory: N adapters trained one step each by
    /// concurrent clients within `--adapter-memory`, then sampled; peak RSS against base +
    /// budget, throughput against all-resident adapters, cold-load p50/p99, restart time.
    Adapters(loraplex::bench::AdaptersBenchArgs),
}

fn main() -> anyhow::Result<()> {
    loraplex::config::init_allocator();
    loraplex::config::init_compute_threads();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,loraplex=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve {
            serve,
            model,
            engine,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(loraplex::api::serve(serve, model, engine))?;
        }
        Cmd::Bench {
            which: BenchCmd::Train(args),
        } => {
            print!("{}", loraplex::bench::train(&args)?);
        }
        Cmd::Bench {
            which: BenchCmd::Plugins(model),
        } => {
            print!("{}", loraplex::bench::plugins(&model)?);
        }
        Cmd::Bench {
            which: BenchCmd::Tenants(args),
        } => {
            print!("{}", loraplex::bench::tenants(&args)?);
        }
        Cmd::Bench {
            which: BenchCmd::Kernels(model),
        } => {
            print!("{}", loraplex::bench::kernels(&model)?);
        }
        Cmd::Bench {
            which: BenchCmd::Quant(args),
        } => {
            println!("{}", loraplex::bench::quant(&args)?);
        }
        Cmd::Bench {
            which: BenchCmd::Sampling(args),
        } => {
            print!("{}", loraplex::bench::sampling(&args)?);
        }
        Cmd::Bench {
            which: BenchCmd::Adapters(args),
        } => {
            print!("{}", loraplex::bench::adapters(&args)?);
        }
        Cmd::Bench {
            which: BenchCmd::Load(args),
        } => {
            let exe = std::env::current_exe()?;
            let report = loraplex::bench::load::run(&args, &exe)?;
            print!("{}", report.text);
            if !report.passed() {
                anyhow::bail!("load benchmark failed: {}", report.failures.join("; "));
            }
        }
        Cmd::ExportHf {
            model,
            out,
            tokenizer_only,
        } => {
            let m = loraplex::model::BaseModel::open(&model)?;
            if tokenizer_only {
                m.save_tokenizer_files(&out)?;
            } else {
                m.save_hf_dir(&out)?;
            }
            println!("wrote {}", out.display());
        }
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            stop,
        } => {
            let m = loraplex::model::BaseModel::open(&model)?;
            let tok = m.tokenizer()?;
            let msgs = [loraplex::model::Message {
                role: "user".into(),
                content: prompt,
            }];
            let text = match &m.chat_template {
                Some(t) => t.render(&msgs, true)?,
                None => msgs[0].content.clone(),
            };
            let ids = tok.encode(&text)?;
            let params = loraplex::sample::SamplingParams {
                max_tokens,
                temperature,
                stop_tokens: tok.eos_token_id.into_iter().collect(),
                ..Default::default()
            };
            let out = loraplex::sample::generate(
                &m,
                &[],
                &[loraplex::sample::GenerateRequest {
                    prompt: &ids,
                    adapter: None,
                    params,
                    stop_strings: stop,
                }],
            )?;
            println!("{}", tok.decode(&out[0].tokens, true)?);
        }
    }
    Ok(())
}
