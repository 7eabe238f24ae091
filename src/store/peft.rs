//! Export to Hugging Face PEFT: `adapter_config.json` and `adapter_model.safetensors` with
//! PEFT's tensor names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`,
//! …, `base_model.model.lm_head.lora_B.weight`), as a directory or a `.tar` archive.
//!
//! Layout: loraplex keeps one LoRA pair per Hugging Face module even where the base
//! matrices are fused (q/k/v, gate/up), so each pair maps to one PEFT module unchanged.
//! GGUF's Q/K row permutation is undone when the base model loads, so q and k rows are
//! already in Hugging Face order (checked against `peft` in `tests/store_peft.rs`).
//! PEFT's scaling is `lora_alpha / r`, the same as ours. Owns the format; reads no files.

use super::atomic::AtomicDir;
use super::error::{Result, StoreError};
use crate::lora::{LoraConfig, LoraWeights, Site, Target};
use candle_core::{DType, Device, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's short module name for a target (what `target_modules` lists).
fn module_name(t: Target) -> &'static str {
    let full = t.hf_name();
    full.rsplit('.').next().unwrap_or(full)
}

/// `adapter_config.json` for `config` on the model named `base_model` (a Hugging Face repo id
/// or path, recorded for PEFT's `base_model_name_or_path`).
pub fn peft_config(config: &LoraConfig, base_model: &str) -> serde_json::Value {
    let mut targets: Vec<&str> = config.targets.iter().map(|t| module_name(*t)).collect();
    if config.train_unembed {
        targets.push("lm_head");
    }
    targets.sort();
    targets.dedup();
    // PEFT reads lora_alpha as a number; write an integer when it is one.
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e9 {
        serde_json::json!(config.alpha as i64)
    } else {
        serde_json::json!(config.alpha)
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// PEFT's tensor name of one half of a site's pair.
pub fn peft_tensor_name(site: Site, b: bool) -> String {
    format!(
        "{}.lora_{}.weight",
        site.peft_module(),
        if b { "B" } else { "A" }
    )
}

/// The two files of a PEFT adapter, in memory: (file name, bytes).
pub fn peft_files(weights: &LoraWeights, base_model: &str) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(weights.pairs.len() * 2);
    for (site, p) in &weights.pairs {
        for (is_b, t) in [(false, &p.a), (true, &p.b)] {
            let t = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            tensors.push((peft_tensor_name(*site, is_b), t));
        }
    }
    let st = safetensors::serialize(tensors, None)
        .map_err(|e| StoreError::Tensor(candle_core::Error::wrap(e)))?;
    let cfg =
        serde_json::to_vec_pretty(&peft_config(&weights.config, base_model)).map_err(|e| {
            StoreError::Decode {
                what: "adapter_config.json",
                message: e.to_string(),
            }
        })?;
    Ok(vec![(PEFT_CONFIG_FILE, cfg), (PEFT_WEIGHTS_FILE, st)])
}

/// Write a PEFT adapter directory at `dir` (which must not exist), atomically. Returns the
/// paths of the files written.
pub fn export_peft_dir(
    weights: &LoraWeights,
    base_model: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let files = peft_files(weights, base_model)?;
    let out = AtomicDir::begin(dir, "export")?;
    for (name, bytes) in &files {
        out.write(name, bytes)?;
    }
    out.commit("export")?;
    Ok(files.iter().map(|(n, _)| dir.join(n)).collect())
}

/// Write a PEFT adapter as an uncompressed `.tar` stream with the two files at its top
/// level (what a download endpoint serves).
pub fn export_peft_tar(weights: &LoraWeights, base_model: &str, out: impl Write) -> Result<()> {
    let files = peft_files(weights, base_model)?;
    let tar_err = |e: std::io::Error| StoreError::Io {
        op: "write tar",
        path: PathBuf::from("<archive>"),
        source: e,
    };
    let mut tar = tar::Builder::new(out);
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (name, bytes) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes.as_slice())
            .map_err(tar_err)?;
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(tar_err)
}

/// [`export_peft_tar`] of the adapter in a checkpoint directory (training or sampler).
pub fn export_checkpoint_tar(
    checkpoint_dir: &Path,
    base_model: &str,
    out: impl Write,
) -> Result<()> {
    let c = super::checkpoint::read_checkpoint(checkpoint_dir, &Device::Cpu)?;
    export_peft_tar(&c.weights, base_model, out)
}
