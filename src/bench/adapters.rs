//! `loraplex bench adapters`: many training runs in bounded memory. N adapters (rank 8 on
//! all seven sites) over N/10 tenants, on a store in a scratch directory; `--clients`
//! concurrent clients train each adapter one step (forward_backward + optim_step) in
//! round-robin order through the job engine with `--adapter-memory` as the budget, then
//! sample from `--sample-from` random adapters. Against: the same token count spread over
//! `--resident` adapters that all stay in memory. Then the restart: the time to open the
//! store and list all N runs again (no adapter is loaded).
//!
//! Prints peak RSS against base + budget, throughput against the all-resident case, cold
//! load p50/p99 (the residency manager's own timing: waiting for memory and write-backs
//! included), evictions and loads, and the restart time.
//!
//! Disk: each adapter's durable state (its automatic checkpoint: weights and two moments)
//! is about 30 MB on SmolLM2, so N adapters need N × 30 MB; with less free space N is
//! trimmed to what fits, and the table says so.

use super::median;
use crate::config::{parse_bytes, EngineConfig, ModelArgs};
use crate::error::{Error, Result};
use crate::jobs::registry::Persist;
use crate::jobs::residency::entry_bytes;
use crate::jobs::{
    AdapterId, Engine, FbRequest, JobOutput, MemoryFutureStore, ModelLoader, Op, SampleRequest,
    TenantId,
};
use crate::lora::optim::AdamParams;
use crate::lora::{LoraConfig, Target};
use crate::model::BaseModel;
use crate::sample::SamplingParams;
use crate::store::Durable;
use crate::train::loss::{BuiltinLoss, LossConfig};
use crate::train::Datum;
use crate::util::{peak_rss_bytes, reset_peak_rss, SplitMix64};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct AdaptersBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training runs (adapters), over adapters / 10 tenants.
    #[arg(long, default_value_t = 2000)]
    pub adapters: usize,
    /// Clients sending work at once.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// The adapter-memory budget (as `serve --adapter-memory`).
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
    pub adapter_memory: u64,
    /// Tokens of each training step's datum.
    #[arg(long, default_value_t = 32)]
    pub seq_len: usize,
    /// Adapters sampled from (8 tokens each) after training.
    #[arg(long, default_value_t = 100)]
    pub sample_from: usize,
    /// Adapters of the all-resident comparison.
    #[arg(long, default_value_t = 100)]
    pub resident: usize,
    /// Scratch directory for the stores (two subdirectories, removed afterwards).
    #[arg(long, default_value = "bench-adapters")]
    pub data_dir: PathBuf,
}

const T: Duration = Duration::from_secs(3600);
const RANK: usize = 8;

fn lora(seed: u64) -> LoraConfig {
    LoraConfig {
        rank: RANK,
        alpha: 16.0,
        seed,
        targets: Target::ALL.to_vec(),
        train_unembed: false,
    }
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Free bytes on the file system holding `dir`.
fn free_disk(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes the struct we hand it; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn engine(model: &Arc<BaseModel>, dir: &Path, budget: u64) -> Result<(Engine, Arc<Durable>)> {
    std::fs::create_dir_all(dir)?;
    // Opening blocks on the database: off the async workers.
    let durable = tokio::task::block_in_place(|| Durable::open(dir, &model.name, None))?;
    let m = model.clone();
    let loader: ModelLoader = Arc::new(move || Ok(m.clone()));
    let cfg = EngineConfig {
        adapter_memory: budget,
        max_queued_jobs: 1 << 16,
        ..EngineConfig::default()
    };
    let persist: Arc<dyn Persist> = durable.clone();
    let e = Engine::start_bases(
        cfg,
        vec![(model.name.clone(), loader)],
        Arc::new(MemoryFutureStore::default()),
        Some(persist),
    )?;
    Ok((e, durable))
}

fn tenant_of(i: usize, tenants: usize) -> TenantId {
    TenantId::from(format!("tenant{}", i % tenants.max(1)).as_str())
}

async fn create(e: &Engine, n: usize) -> Result<Vec<(TenantId, AdapterId)>> {
    let tenants = (n / 10).max(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = tenant_of(i, tenants);
        let id = e.create_model(&t, lora(1000 + i as u64)).await?;
        out.push((t, id));
    }
    Ok(out)
}

/// `steps` training steps, `clients` at a time, round-robin over `runs`; wall seconds.
async fn train(
    e: &Engine,
    runs: &Arc<Vec<(TenantId, AdapterId)>>,
    steps: usize,
    clients: usize,
    seq_len: usize,
    vocab: usize,
) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients.max(1) {
        let (e, runs, next) = (e.clone(), runs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SplitMix64::new(77 + c as u64);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= steps {
                    return Ok::<_, Error>(());
                }
                let (tenant, id) = &runs[k % runs.len()];
                let toks: Vec<u32> = (0..=seq_len)
                    .map(|_| (rng.next_u64() % vocab as u64) as u32)
                    .collect();
                let op = Op::ForwardBackward(FbRequest {
                    data: vec![Datum::next_token(&toks, 0)],
                    loss: Arc::new(BuiltinLoss::CrossEntropy),
                    loss_config: LossConfig::new(),
                });
                let f = e.submit(tenant, id, None, op).await?;
                let s = e
                    .submit(tenant, id, None, Op::OptimStep(AdamParams::default()))
                    .await?;
                e.result(tenant, &f, T).await?;
                e.result(tenant, &s, T).await?;
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Unavailable(format!("client panicked: {e}")))??;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Sample 8 tokens from each of `picks`, `clients` at a time; wall seconds.
async fn sample(
    e: &Engine,
    picks: Vec<(TenantId, AdapterId)>,
    clients: usize,
    vocab: usize,
) -> Result<f64> {
    let picks = Arc::new(picks);
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients.max(1) {
        let (e, picks, next) = (e.clone(), picks.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SplitMix64::new(99 + c as u64);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((tenant, id)) = picks.get(k) else {
                    return Ok::<_, Error>(());
                };
                let sid = e.sampling_session(tenant, id, None, T).await?;
                let prompt: Vec<u32> = (0..16)
                    .map(|_| (rng.next_u64() % vocab as u64) as u32)
                    .collect();
                let params = SamplingParams {
                    max_tokens: 8,
                    temperature: 1.0,
                    seed: Some(k as u64),
                    ..Default::default()
                };
                let f = e
                    .sample(tenant, &sid, SampleRequest::new(prompt, params))
                    .await?;
                if !matches!(&*e.result(tenant, &f, T).await?, JobOutput::Sample(_)) {
                    return Err(Error::Unavailable("a sample request gave no sample".into()));
                }
                e.registry().remove_session(tenant, &sid)?;
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Unavailable(format!("client panicked: {e}")))??;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

pub fn adapters(args: &AdaptersBenchArgs) -> Result<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (dev, _) = crate::model::default_device();
    let model = Arc::new(BaseModel::open(&args.model)?);
    let vocab = model.config.vocab_size;
    let per_entry = entry_bytes(&lora(0), &model.config);
    // On disk: weights and two moments (the automatic checkpoint), plus one being written.
    let per_disk = per_entry / 16 * 12;
    std::fs::create_dir_all(&args.data_dir)?;
    let free = free_disk(&args.data_dir).unwrap_or(u64::MAX);
    let mut n = args.adapters.max(1);
    let resident_n = args.resident.max(1);
    let mut notes = Vec::new();
    // 10% of the free space stays free; each case's store is removed before the next
    // starts, so the two never need disk at once.
    let usable = free / 10 * 9;
    let fits = (usable / per_disk.max(1)) as usize;
    if fits < resident_n.max(2) {
        return Err(Error::invalid(
            "adapters",
            format!(
                "{} free under {}: not even {} adapters of {} MB each fit",
                gib(free),
                args.data_dir.display(),
                resident_n,
                per_disk >> 20
            ),
        ));
    }
    if n > fits {
        notes.push(format!(
            "trimmed from {n} to {fits} adapters: {} free under {}, {} MB per adapter on disk",
            gib(free),
            args.data_dir.display(),
            per_disk >> 20
        ));
        n = fits;
    }
    let base_rss = rss_bytes().unwrap_or(0);
    let tokens = n * args.seq_len;

    let dir_r = args.data_dir.join("resident");
    let dir_n = args.data_dir.join("many");
    // Leftovers of an interrupted run would be restored as runs too.
    let _ = std::fs::remove_dir_all(&dir_r);
    let _ = std::fs::remove_dir_all(&dir_n);
    // N adapters within the budget.
    // First, so its peak RSS is its own (the all-resident case below holds more).
    reset_peak_rss();
    let (wall, sample_wall, snap, loads, evictions, write_backs, mut lat) = rt.block_on(async {
        let (e, _) = engine(&model, &dir_n, args.adapter_memory)?;
        let runs = Arc::new(create(&e, n).await?);
        let wall = train(&e, &runs, n, args.clients, args.seq_len, vocab).await?;
        let mut rng = SplitMix64::new(5);
        let picks: Vec<_> = (0..args.sample_from.min(n))
            .map(|_| runs[(rng.next_u64() % n as u64) as usize].clone())
            .collect();
        let sample_wall = sample(&e, picks, args.clients, vocab).await?;
        let res = e.registry().residency();
        let st = &res.stats;
        Ok::<_, Error>((
            wall,
            sample_wall,
            res.snapshot(),
            st.loads.load(Ordering::Relaxed),
            st.evictions.load(Ordering::Relaxed),
            st.write_backs.load(Ordering::Relaxed),
            st.recent_loads(),
        ))
    })?;
    let peak = peak_rss_bytes().unwrap_or(0);

    // Restart: open the store, start an engine, list every run (none loaded).
    let (restart_s, restored, resident_after) = rt.block_on(async {
        let t = Instant::now();
        let (e, durable) = engine(&model, &dir_n, args.adapter_memory)?;
        // The base is in memory already (its loader hands it over): not timed here.
        e.base_model().await?;
        let e2 = e.clone();
        let r = tokio::task::spawn_blocking(move || durable.restore(&e2))
            .await
            .map_err(|e| Error::Unavailable(format!("restore panicked: {e}")))??;
        Ok::<_, Error>((t.elapsed().as_secs_f64(), r.models, e.residency().resident))
    })?;
    let _ = std::fs::remove_dir_all(&dir_n);

    // The same token count over `resident` adapters that all stay in memory. Its peak RSS,
    // less the base and its adapters, is what the same load takes besides adapters
    // (activations, KV caches, allocator): the reference for the budgeted run's peak.
    reset_peak_rss();
    let resident_wall = rt.block_on(async {
        let (e, _) = engine(&model, &dir_r, u64::MAX / 4)?;
        let runs = Arc::new(create(&e, resident_n).await?);
        // One untimed step each: first loads and page faults.
        train(&e, &runs, resident_n, args.clients, args.seq_len, vocab).await?;
        train(&e, &runs, n, args.clients, args.seq_len, vocab).await
    })?;
    let _ = std::fs::remove_dir_all(&dir_r);
    let resident_peak = peak_rss_bytes().unwrap_or(0);
    let other = resident_peak.saturating_sub(base_rss + resident_n as u64 * per_entry);
    let allowed = base_rss + args.adapter_memory + other;

    let p50 = percentile(&mut lat, 0.5);
    let p99 = percentile(&mut lat, 0.99);
    let mut w = vec![resident_wall];
    let resident_tps = tokens as f64 / median(&mut w);
    let tps = tokens as f64 / wall;
    let budget = args.adapter_memory;
    let mut out = format!(
        "model {} ({:?}); {n} adapters (rank {RANK}, all seven sites, {} MB resident, {} MB on disk each) over {} tenants; {} clients; one training step each ({} tokens), round-robin; then sampling 8 tokens from {} random adapters\n\n",
        model.name,
        dev,
        per_entry >> 20,
        per_disk >> 20,
        (n / 10).max(1),
        args.clients,
        args.seq_len,
        args.sample_from.min(n)
    );
    for note in &notes {
        out.push_str(&format!("note: {note}\n\n"));
    }
    out.push_str("| measure | value |\n|---|---|\n");
    let rows = [
        ("adapter-memory budget", gib(budget)),
        ("base RSS (model loaded)", gib(base_rss)),
        ("peak RSS", gib(peak)),
        (
            "peak RSS / (base + budget)",
            format!("{:.2}", peak as f64 / (base_rss + budget) as f64),
        ),
        ("peak resident adapter bytes", gib(snap.peak_bytes)),
        (
            "all-resident case: peak RSS − base − its adapters (activations, caches, allocator)",
            gib(other),
        ),
        (
            "peak RSS / (base + budget + that)",
            format!("{:.2}", peak as f64 / allowed as f64),
        ),
        (
            "training throughput, N adapters (tokens/s)",
            format!("{tps:.1}"),
        ),
        (
            "same tokens over all-resident adapters (tokens/s)",
            format!("{resident_tps:.1} ({resident_n} adapters)"),
        ),
        ("throughput ratio", format!("{:.2}", tps / resident_tps)),
        ("sampling wall (s)", format!("{sample_wall:.1}")),
        (
            "loads / evictions / write-backs",
            format!("{loads} / {evictions} / {write_backs}"),
        ),
        ("cold load p50 (s)", format!("{p50:.3}")),
        ("cold load p99 (s)", format!("{p99:.3}")),
        (
            "restart: open store + list runs (s)",
            format!("{restart_s:.2} ({restored} runs, {resident_after} loaded)"),
        ),
    ];
    for (k, v) in rows {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    Ok(out)
}
