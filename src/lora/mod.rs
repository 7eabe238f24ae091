//! LoRA adapters: which linear layers get a low-rank update (sites), the A/B parameters of
//! one adapter, their deterministic initialisation, and gradient accumulators. The model
//! reads adapters; it never mutates them. The optimizer lives in [`optim`].

pub mod optim;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The linear layers of a block that can carry LoRA.

/// The sizes of a base model that fix where LoRA pairs go and their shapes. The model's
/// config implements it; this module never imports the model (the model imports LoRA).
pub trait ModelShape {
    fn hidden(&self) -> usize;
    fn intermediate(&self) -> usize;
    fn vocab(&self) -> usize;
    fn layers(&self) -> usize;
    /// Output features of the query projection (`heads · head_dim`).
    fn q_features(&self) -> usize;
    /// Output features of the key and value projections (`kv_heads · head_dim`).
    fn kv_features(&self) -> usize;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
    pub const ATTN: [Target; 4] = [Target::Q, Target::K, Target::V, Target::O];
    pub const MLP: [Target; 3] = [Target::Gate, Target::Up, Target::Down];

    /// The Hugging Face / PEFT module name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// (in, out) features of this layer.
    pub fn dims(self, c: &impl ModelShape) -> (usize, usize) {
        let h = c.hidden();
        match self {
            Target::Q => (h, c.q_features()),
            Target::K | Target::V => (h, c.kv_features()),
            Target::O => (c.q_features(), h),
            Target::Gate | Target::Up => (h, c.intermediate()),
            Target::Down => (c.intermediate(), h),
        }
    }
}

/// Where one LoRA pair sits: a target in a block, or the LM head (unembedding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    Layer(usize, Target),
    LmHead,
}

impl Site {
    pub fn dims(self, c: &impl ModelShape) -> (usize, usize) {
        match self {
            Site::Layer(_, t) => t.dims(c),
            Site::LmHead => (c.hidden(), c.vocab()),
        }
    }
    /// PEFT's module path, e.g. `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn peft_module(self) -> String {
        match self {
            Site::Layer(l, t) => format!("base_model.model.model.layers.{l}.{}", t.hf_name()),
            Site::LmHead => "base_model.model.lm_head".into(),
        }
    }
}

/// Tinker's `LoraConfig`, plus an explicit target list for finer control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    /// Scaling numerator: the update is `(alpha / rank) · B A x`.
    pub alpha: f32,
    pub seed: u64,
    pub targets: Vec<Target>,
    pub train_unembed: bool,
}

impl LoraConfig {
    pub const DEFAULT_ALPHA: f32 = 32.0;

    /// From Tinker's flags: attention → q,k,v,o; MLP → gate,up,down; unembed → LM head.
    pub fn from_tinker(
        rank: usize,
        seed: u64,
        train_attn: bool,
        train_mlp: bool,
        train_unembed: bool,
    ) -> Result<Self> {
        let mut targets = Vec::new();
        if train_attn {
            targets.extend(Target::ATTN);
        }
        if train_mlp {
            targets.extend(Target::MLP);
        }
        let c = LoraConfig {
            rank,
            alpha: Self::DEFAULT_ALPHA,
            seed,
            targets,
            train_unembed,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(Error::invalid(
                "lora_config.rank",
                format!("{} is not in 1..=1024", self.rank),
            ));
        }
        if self.targets.is_empty() && !self.train_unembed {
            return Err(Error::invalid(
                "lora_config",
                "at least one of train_attn, train_mlp, train_unembed must be true",
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::invalid(
                "lora_config.alpha",
                "must be a positive number",
            ));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha as f64 / self.rank as f64
    }

    pub fn sites(&self, c: &impl ModelShape) -> Vec<Site> {
        let mut v: Vec<Site> = (0..c.layers())
            .flat_map(|l| self.targets.iter().map(move |t| Site::Layer(l, *t)))
            .collect();
        if self.train_unembed {
            v.push(Site::LmHead);
        }
        v.sort();
        v.dedup();
        v
    }
}

/// One LoRA pair: `A: [rank, in]`, `B: [out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// An adapter's parameters (f32, on the model's device).
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub config: LoraConfig,
    pub scale: f64,
    pub pairs: BTreeMap<Site, LoraPair>,
}

impl LoraWeights {
    /// B = 0 and A ~ U(−1/√in, 1/√in) from the seed (PEFT's Kaiming-uniform bound), so a new
    /// adapter leaves the base model's outputs unchanged and is reproducible.
    pub fn init(config: &LoraConfig, model: &impl ModelShape, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = crate::util::SplitMix64::new(config.seed);
        let mut pairs = BTreeMap::new();
        for site in config.sites(model) {
            let (inp, out) = site.dims(model);
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..config.rank * inp)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect();
            pairs.insert(
                site,
                LoraPair {
                    a: Tensor::from_vec(a, (config.rank, inp), device)?,
                    b: Tensor::zeros((out, config.rank), DType::F32, device)?,
                },
            );
        }
        Ok(LoraWeights {
            scale: config.scale(),
            config: config.clone(),
            pairs,
        })
    }

    pub fn get(&self, site: Site) -> Option<&LoraPair> {
        self.pairs.get(&site)
    }

    pub fn num_params(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }
}

/// Gradients for one adapter, same sites as its weights. Accumulates across calls.
#[derive(Debug, Clone, Default)]
pub struct LoraGrads {
    pub pairs: BTreeMap<Site, (Tensor, Tensor)>,
}

impl LoraGrads {
    pub fn add(&mut self, site: Site, da: Tensor, db: Tensor) -> Result<()> {
        use std::collections::btree_map::Entry;
        match self.pairs.entry(site) {
            Entry::Vacant(e) => {
                e.insert((da, db));
            }
            Entry::Occupied(mut e) => {
                let (a, b) = e.get_mut();
                *a = (&*a + da)?;
                *b = (&*b + db)?;
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, other: LoraGrads) -> Result<()> {
        for (site, (a, b)) in other.pairs {
            self.add(site, a, b)?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Global L2 norm over every gradient tensor.
    pub fn norm(&self) -> Result<f64> {
        let mut s = 0f64;
        for t in self.pairs.values().flat_map(|(a, b)| [a, b]) {
            let on_host = t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
            s += if on_host {
                let v = crate::view::HostView::new(t)?;
                v.slice()
                    .iter()
                    .map(|x| (*x as f64) * (*x as f64))
                    .sum::<f64>()
            } else {
                t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
            };
        }
        Ok(s.sqrt())
    }
}
