//! Checkpoint files: an adapter's LoRA weights (and, for a training checkpoint, its AdamW
//! moments and step count) in one directory: `adapter.safetensors`, `optimizer.safetensors`
//! and `checkpoint.json` (config, kind, step, created time, each file's size and SHA-256).
//!
//! Writes and deletes are atomic ([`super::atomic`]): a directory under its final name is
//! always complete; a crash leaves at most a hidden temporary, which is never listed or
//! loaded and is removed when the store opens. Loading verifies every file's size and hash.
//!
//! This module owns the on-disk layout; it never decides names (the caller does) and never
//! touches the database.

use super::atomic::{
    create_dir_all_synced, is_hidden, remove_dir_atomically, sweep_temporaries, AtomicDir,
};
use super::error::{Result, StoreError};
use crate::jobs::{AdapterId, TenantId};
use crate::lora::optim::{AdamState, Moments};
use crate::lora::{LoraConfig, LoraPair, LoraWeights, Site, Target};
use crate::model::LlamaConfig;
use crate::train::TrainableAdapter;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bumped when the layout changes; older readers refuse newer checkpoints.
pub const FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "checkpoint.json";
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
pub const OPTIM_FILE: &str = "optimizer.safetensors";
/// Longest name of a checkpoint (or tenant / model path component) we accept.
const MAX_NAME_LEN: usize = 128;

/// What a checkpoint holds: everything to resume training, or weights to sample from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Weights, AdamW moments and step count (Tinker's `save_state`).
    Training,
    /// Weights only (Tinker's `save_weights_for_sampler`).
    Sampler,
    /// Weights only, to be downloaded in Hugging Face PEFT layout (Tinker's
    /// `save_weights_external`; [`super::peft`] renders the files).
    External,
}

impl CheckpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Training => "training",
            CheckpointKind::Sampler => "sampler",
            CheckpointKind::External => "external",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "training" => Ok(CheckpointKind::Training),
            "sampler" => Ok(CheckpointKind::Sampler),
            "external" => Ok(CheckpointKind::External),
            _ => Err(StoreError::invalid(
                "checkpoint kind",
                format!("{s:?} is not training, sampler or external"),
            )),
        }
    }

    /// The kind a `tinker://` path segment names.
    pub fn from_segment(seg: &str) -> Option<Self> {
        match seg {
            "weights" => Some(CheckpointKind::Training),
            "sampler_weights" => Some(CheckpointKind::Sampler),
            "external_weights" => Some(CheckpointKind::External),
            _ => None,
        }
    }

    /// The path segment in a `tinker://` path and on disk.
    pub fn segment(self) -> &'static str {
        match self {
            CheckpointKind::Training => "weights",
            CheckpointKind::Sampler => "sampler_weights",
            CheckpointKind::External => "external_weights",
        }
    }
}

/// One file of a checkpoint, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub kind: CheckpointKind,
    pub lora_config: LoraConfig,
    /// Optimizer steps taken when it was saved.
    pub step: u64,
    pub created_unix_ms: u64,
    pub num_params: usize,
    /// Every file of the checkpoint, `checkpoint.json` included.
    pub size_bytes: u64,
    /// The tensor files (not `checkpoint.json` itself).
    pub files: Vec<FileEntry>,
}

/// A loaded checkpoint. `optim` is present for training checkpoints only.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub weights: LoraWeights,
    pub optim: Option<AdamState>,
}

impl Checkpoint {
    /// That this adapter fits `model`: the same sites with the same shapes.
    pub fn check_model(&self, model: &LlamaConfig) -> Result<()> {
        let want = self.weights.config.sites(model);
        let have: Vec<Site> = self.weights.pairs.keys().copied().collect();
        if want != have {
            return Err(StoreError::invalid(
                "checkpoint",
                format!(
                    "made for another model: {} LoRA sites, this model has {}",
                    have.len(),
                    want.len()
                ),
            ));
        }
        let r = self.weights.config.rank;
        for (site, p) in &self.weights.pairs {
            let (inp, out) = site.dims(model);
            if p.a.dims() != [r, inp] || p.b.dims() != [out, r] {
                return Err(StoreError::invalid(
                    "checkpoint",
                    format!("{} has the wrong shape for this model", site_key(*site)),
                ));
            }
        }
        Ok(())
    }

    /// An adapter to continue training: the saved moments and step for a training
    /// checkpoint, a fresh optimizer for a sampler checkpoint. Gradients start empty.
    pub fn into_trainable(self) -> TrainableAdapter {
        let mut t = TrainableAdapter::new(self.weights);
        if let Some(o) = self.optim {
            t.optim = o;
        }
        t
    }
}

/// The safetensors key prefix of a site: `layers.3.q`, `lm_head`.
pub fn site_key(site: Site) -> String {
    match site {
        Site::Layer(l, t) => format!("layers.{l}.{}", target_key(t)),
        Site::LmHead => "lm_head".into(),
    }
}

fn target_key(t: Target) -> &'static str {
    match t {
        Target::Q => "q",
        Target::K => "k",
        Target::V => "v",
        Target::O => "o",
        Target::Gate => "gate",
        Target::Up => "up",
        Target::Down => "down",
    }
}

fn parse_site(key: &str) -> Option<Site> {
    if key == "lm_head" {
        return Some(Site::LmHead);
    }
    let rest = key.strip_prefix("layers.")?;
    let (l, t) = rest.split_once('.')?;
    let t = Target::ALL.into_iter().find(|x| target_key(*x) == t)?;
    Some(Site::Layer(l.parse().ok()?, t))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A name we put on disk: 1..=128 of `[A-Za-z0-9._-]`, not starting with a dot (dot names
/// are our temporaries).
pub fn check_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            field,
            format!(
                "{name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-', \
                 not starting with '.'"
            ),
        ))
    }
}

fn tensors_to_bytes(tensors: Vec<(String, Tensor)>) -> Result<Vec<u8>> {
    // On the CPU as contiguous f32, so safetensors' copy-out cannot fail.
    let cpu = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            Ok((k, t))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(cpu, None).map_err(|e| StoreError::Tensor(candle_core::Error::wrap(e)))
}

fn entry(name: &str, bytes: &[u8]) -> FileEntry {
    FileEntry {
        name: name.into(),
        size_bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    }
}

/// Atomically write a checkpoint to `dir` (which must not exist yet). A training checkpoint
/// needs `optim`; a sampler checkpoint takes only its step count from it.
pub fn write_checkpoint(
    dir: &Path,
    kind: CheckpointKind,
    weights: &LoraWeights,
    optim: Option<&AdamState>,
) -> Result<CheckpointMeta> {
    // A sampler checkpoint records the step but not the moments.
    let step = optim.map_or(0, |o| o.step);
    let optim = match (kind, optim) {
        (CheckpointKind::Training, None) => {
            return Err(StoreError::invalid(
                "checkpoint",
                "a training checkpoint needs the optimizer state",
            ))
        }
        (CheckpointKind::Training, Some(o)) => Some(o),
        (CheckpointKind::Sampler | CheckpointKind::External, _) => None,
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StoreError::invalid("checkpoint dir", "has no UTF-8 name"))?;
    check_name("checkpoint name", name)?;
    let out = AtomicDir::begin(dir, "checkpoint")?;

    let mut files = Vec::new();
    let mut w = Vec::with_capacity(weights.pairs.len() * 2);
    for (site, p) in &weights.pairs {
        let k = site_key(*site);
        w.push((format!("{k}.lora_a"), p.a.clone()));
        w.push((format!("{k}.lora_b"), p.b.clone()));
    }
    let bytes = tensors_to_bytes(w)?;
    out.write(WEIGHTS_FILE, &bytes)?;
    files.push(entry(WEIGHTS_FILE, &bytes));
    drop(bytes);
    if let Some(o) = optim {
        if !o.moments.is_empty() {
            let mut t = Vec::with_capacity(o.moments.len() * 2);
            for ((site, which), m) in &o.moments {
                let k = format!("{}.{}", site_key(*site), ab(*which)?);
                t.push((format!("{k}.m"), m.m.clone()));
                t.push((format!("{k}.v"), m.v.clone()));
            }
            let bytes = tensors_to_bytes(t)?;
            out.write(OPTIM_FILE, &bytes)?;
            files.push(entry(OPTIM_FILE, &bytes));
        }
    }
    let mut meta = CheckpointMeta {
        format: FORMAT_VERSION,
        kind,
        lora_config: weights.config.clone(),
        step,
        created_unix_ms: now_unix_ms(),
        num_params: weights.num_params(),
        size_bytes: files.iter().map(|f| f.size_bytes).sum(),
        files,
    };
    // The metadata's own size is part of the total; it settles after one round.
    let mut json = serde_json::to_vec_pretty(&meta).map_err(|e| decode("checkpoint.json", e))?;
    for _ in 0..3 {
        let total = meta.files.iter().map(|f| f.size_bytes).sum::<u64>() + json.len() as u64;
        if total == meta.size_bytes {
            break;
        }
        meta.size_bytes = total;
        json = serde_json::to_vec_pretty(&meta).map_err(|e| decode("checkpoint.json", e))?;
    }
    out.write(META_FILE, &json)?;
    out.commit("checkpoint")?;
    Ok(meta)
}

fn ab(which: u8) -> Result<&'static str> {
    match which {
        0 => Ok("lora_a"),
        1 => Ok("lora_b"),
        _ => Err(StoreError::invalid(
            "optimizer state",
            "moment index not 0 or 1",
        )),
    }
}

fn decode(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Decode {
        what,
        message: e.to_string(),
    }
}

/// Largest `checkpoint.json` read back.
const MAX_META_BYTES: u64 = 1 << 20;

/// Read `checkpoint.json` only.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(META_FILE);
    // checkpoint.json lists a few files; anything larger is not ours.
    if let Ok(m) = fs::metadata(&path) {
        if m.len() > MAX_META_BYTES {
            return Err(StoreError::corrupt(
                &path,
                format!("{} bytes; at most {MAX_META_BYTES}", m.len()),
            ));
        }
    }
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if dir.is_dir() {
                StoreError::corrupt(dir, "no checkpoint.json")
            } else {
                StoreError::NotFound {
                    kind: "checkpoint",
                    id: dir.display().to_string(),
                }
            })
        }
        Err(e) => return Err(StoreError::io("read", &path)(e)),
    };
    let meta: CheckpointMeta =
        serde_json::from_slice(&text).map_err(|e| StoreError::corrupt(&path, e))?;
    if meta.format > FORMAT_VERSION {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "format {} is newer than this build reads ({FORMAT_VERSION})",
                meta.format
            ),
        ));
    }
    Ok(meta)
}

fn read_tensors(
    dir: &Path,
    meta: &CheckpointMeta,
    name: &str,
    device: &Device,
) -> Result<Option<BTreeMap<String, Tensor>>> {
    let Some(fe) = meta.files.iter().find(|f| f.name == name) else {
        return Ok(None);
    };
    let path = dir.join(name);
    // Read only a file of the size checkpoint.json recorded when it was written.
    let on_disk = fs::metadata(&path)
        .map_err(StoreError::io("read", &path))?
        .len();
    if on_disk != fe.size_bytes {
        return Err(StoreError::corrupt(
            &path,
            format!(
                "{on_disk} bytes on disk, {} in checkpoint.json",
                fe.size_bytes
            ),
        ));
    }
    let file = fs::File::open(&path).map_err(StoreError::io("read", &path))?;
    // Mapped, not read: the pages are the page cache's, dropped with the map, so loading
    // a checkpoint leaves no second copy of the file in the process.
    // SAFETY: checkpoint files are written once under a temporary name and renamed into
    // place; nothing writes to a file under its final name, and a delete only unlinks it
    // (the mapping stays valid). A file changed behind our back fails the hash below.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(StoreError::io("map", &path))?;
    if bytes.len() as u64 != fe.size_bytes || hex::encode(Sha256::digest(&bytes)) != fe.sha256 {
        return Err(StoreError::corrupt(
            &path,
            "size or SHA-256 differs from checkpoint.json",
        ));
    }
    let map = candle_core::safetensors::load_buffer(&bytes[..], device)
        .map_err(|e| StoreError::corrupt(&path, e))?;
    Ok(Some(map.into_iter().collect()))
}

/// Split `layers.3.q.lora_a.m` into (site, which, rest): (Layer(3, Q), 0, ".m").
fn split_key<'a>(key: &'a str, path: &Path) -> Result<(Site, u8, &'a str)> {
    let bad = || StoreError::corrupt(path, format!("unexpected tensor {key:?}"));
    let (site, which, rest) = if let Some(i) = key.find(".lora_a") {
        (&key[..i], 0u8, &key[i + 7..])
    } else if let Some(i) = key.find(".lora_b") {
        (&key[..i], 1u8, &key[i + 7..])
    } else {
        return Err(bad());
    };
    Ok((parse_site(site).ok_or_else(bad)?, which, rest))
}

/// Load a complete checkpoint from `dir`, verifying every file against its recorded size
/// and hash and every tensor's shape against the LoRA config.
pub fn read_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let meta = read_meta(dir)?;
    let config = meta.lora_config.clone();
    config
        .validate()
        .map_err(|e| StoreError::corrupt(dir, format!("LoRA config: {e}")))?;
    let wpath = dir.join(WEIGHTS_FILE);
    let tensors = read_tensors(dir, &meta, WEIGHTS_FILE, device)?
        .ok_or_else(|| StoreError::corrupt(dir, "no adapter.safetensors"))?;
    let mut halves: BTreeMap<Site, [Option<Tensor>; 2]> = BTreeMap::new();
    for (key, t) in tensors {
        let (site, which, rest) = split_key(&key, &wpath)?;
        if !rest.is_empty() {
            return Err(StoreError::corrupt(
                &wpath,
                format!("unexpected tensor {key:?}"),
            ));
        }
        halves.entry(site).or_default()[which as usize] = Some(t);
    }
    let r = config.rank;
    let mut pairs = BTreeMap::new();
    for (site, [a, b]) in halves {
        let allowed = match site {
            Site::Layer(_, t) => config.targets.contains(&t),
            Site::LmHead => config.train_unembed,
        };
        let (Some(a), Some(b)) = (a, b) else {
            return Err(StoreError::corrupt(
                &wpath,
                format!("{} lacks lora_a or lora_b", site_key(site)),
            ));
        };
        let shapes_ok =
            matches!(a.dims(), [ra, _] if *ra == r) && matches!(b.dims(), [_, rb] if *rb == r);
        if !allowed || !shapes_ok {
            return Err(StoreError::corrupt(
                &wpath,
                format!("{} does not fit the LoRA config", site_key(site)),
            ));
        }
        pairs.insert(site, LoraPair { a, b });
    }
    if pairs.is_empty() {
        return Err(StoreError::corrupt(&wpath, "no LoRA tensors"));
    }
    let weights = LoraWeights {
        scale: config.scale(),
        config,
        pairs,
    };
    let optim = match meta.kind {
        CheckpointKind::Sampler | CheckpointKind::External => None,
        CheckpointKind::Training => {
            let opath = dir.join(OPTIM_FILE);
            let mut moments = BTreeMap::new();
            let tensors = read_tensors(dir, &meta, OPTIM_FILE, device)?.unwrap_or_default();
            let mut halves: BTreeMap<(Site, u8), [Option<Tensor>; 2]> = BTreeMap::new();
            for (key, t) in tensors {
                let (site, which, rest) = split_key(&key, &opath)?;
                let slot = match rest {
                    ".m" => 0,
                    ".v" => 1,
                    _ => {
                        return Err(StoreError::corrupt(
                            &opath,
                            format!("unexpected tensor {key:?}"),
                        ))
                    }
                };
                halves.entry((site, which)).or_default()[slot] = Some(t);
            }
            for ((site, which), [m, v]) in halves {
                let param = weights
                    .pairs
                    .get(&site)
                    .map(|p| if which == 0 { &p.a } else { &p.b });
                match (param, m, v) {
                    (Some(p), Some(m), Some(v)) if m.dims() == p.dims() && v.dims() == p.dims() => {
                        moments.insert((site, which), Moments { m, v });
                    }
                    _ => {
                        return Err(StoreError::corrupt(
                            &opath,
                            format!("moments of {} do not fit the weights", site_key(site)),
                        ))
                    }
                }
            }
            Some(AdamState {
                step: meta.step,
                moments,
            })
        }
    };
    Ok(Checkpoint {
        meta,
        weights,
        optim,
    })
}

/// Whether `dir` is a complete checkpoint by name: not a hidden temporary, has metadata.
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    !is_hidden(dir) && dir.join(META_FILE).is_file()
}

/// `tinker://{model}/{weights|sampler_weights|external_weights}/{name}`.
pub fn tinker_path(model: &AdapterId, kind: CheckpointKind, name: &str) -> String {
    format!("tinker://{model}/{}/{name}", kind.segment())
}

/// The parts of a `tinker://` checkpoint path.
pub fn parse_tinker_path(path: &str) -> Result<(AdapterId, CheckpointKind, String)> {
    let bad = || {
        StoreError::invalid(
            "path",
            format!(
                "{path:?} is not tinker://<model_id>/(weights|sampler_weights|external_weights)/<name>"
            ),
        )
    };
    let rest = path.strip_prefix("tinker://").ok_or_else(bad)?;
    let mut it = rest.splitn(3, '/');
    let (Some(model), Some(seg), Some(name)) = (it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    let kind = CheckpointKind::from_segment(seg).ok_or_else(bad)?;
    check_name("path", model)?;
    check_name("path", name)?;
    Ok((AdapterId(model.into()), kind, name.into()))
}

/// A model id as a directory name: Tinker ids (`{session}:train:{n}`) have colons, which
/// become dots (generated ids never contain dots, so this stays one-to-one).
pub fn model_dir_name(model: &AdapterId) -> Result<String> {
    let name = model.as_str().replace(':', ".");
    check_name("model_id", &name)?;
    Ok(name)
}

/// Checkpoints under one root directory, laid out `root/{tenant}/{model}/{kind}/{name}`.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
}

impl CheckpointStore {
    /// Create the root if needed and remove temporaries a crash left behind. Open it once,
    /// at startup: the sweep would also remove a live writer's temporaries.
    pub fn open(root: impl Into<PathBuf>) -> Result<(CheckpointStore, usize)> {
        let root = root.into();
        create_dir_all_synced(&root)?;
        // root / tenant / model / kind / name: temporaries sit at most four levels down.
        let swept = sweep_temporaries(&root, 4, &is_checkpoint_dir)?;
        if swept > 0 {
            tracing::info!(root = %root.display(), swept, "removed unfinished checkpoint writes");
        }
        Ok((CheckpointStore { root }, swept))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a checkpoint lives (whether or not it exists).
    pub fn dir_of(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        kind: CheckpointKind,
        name: &str,
    ) -> Result<PathBuf> {
        check_name("tenant", tenant.as_str())?;
        let model_dir = model_dir_name(model)?;
        check_name("name", name)?;
        Ok(self
            .root
            .join(tenant.as_str())
            .join(&model_dir)
            .join(kind.segment())
            .join(name))
    }

    /// Save `adapter` under `name`: weights, moments and step for a training checkpoint,
    /// weights only for a sampler checkpoint. Returns the directory and its metadata.
    pub fn save(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        kind: CheckpointKind,
        name: &str,
        adapter: &TrainableAdapter,
    ) -> Result<(PathBuf, CheckpointMeta)> {
        let dir = self.dir_of(tenant, model, kind, name)?;
        let meta = write_checkpoint(&dir, kind, &adapter.weights, Some(&adapter.optim))?;
        Ok((dir, meta))
    }

    pub fn load(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        kind: CheckpointKind,
        name: &str,
        device: &Device,
    ) -> Result<Checkpoint> {
        let dir = self.dir_of(tenant, model, kind, name)?;
        read_checkpoint(&dir, device).map_err(|e| match e {
            StoreError::NotFound { .. } => StoreError::NotFound {
                kind: "checkpoint",
                id: tinker_path(model, kind, name),
            },
            e => e,
        })
    }

    /// Names and metadata of a model's complete checkpoints of one kind, by name.
    pub fn list(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        kind: CheckpointKind,
    ) -> Result<Vec<(String, CheckpointMeta)>> {
        check_name("tenant", tenant.as_str())?;
        let model_dir = model_dir_name(model)?;
        let dir = self
            .root
            .join(tenant.as_str())
            .join(&model_dir)
            .join(kind.segment());
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("list", &dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let path = e.map_err(StoreError::io("list", &dir))?.path();
            if !is_checkpoint_dir(&path) {
                continue;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            out.push((name, read_meta(&path)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Remove a checkpoint: renamed to a hidden trash name first, so a crash midway never
    /// leaves a half-deleted directory under its real name.
    pub fn delete(
        &self,
        tenant: &TenantId,
        model: &AdapterId,
        kind: CheckpointKind,
        name: &str,
    ) -> Result<()> {
        let dir = self.dir_of(tenant, model, kind, name)?;
        remove_checkpoint_dir(&dir)
    }
}

/// Atomically remove a checkpoint directory (see [`CheckpointStore::delete`]).
pub fn remove_checkpoint_dir(dir: &Path) -> Result<()> {
    if !is_checkpoint_dir(dir) {
        return Err(StoreError::NotFound {
            kind: "checkpoint",
            id: dir.display().to_string(),
        });
    }
    remove_dir_atomically(dir)
}
