//! Many adapters' LoRA in one set of products, forward and backward, for the candle
//! backend.
//!
//! The math: token `n` on adapter `a` adds `s_a · (x_n A_aᵀ) B_aᵀ` at a site (`s_a` its
//! scale); a token without an adapter (or whose adapter has no pair at the site) adds
//! nothing. The adapters present at a site are stacked along the rank axis,
//! `A = [A_1; A_2; …]` `[R, in]` and `B = [B_1 B_2 …]` `[out, R]` (`R` the sum of their
//! ranks, so ranks may differ and nothing is padded), and a `[N, R]` pick matrix `P`
//! holds `s_a` in the columns of each token's adapter and 0 elsewhere. Then for all tokens
//! at once
//!
//! ```text
//! forward:   xs = P ⊙ (x Aᵀ)          Δy = xs Bᵀ
//! backward:  dB = dyᵀ xs              dxa = P ⊙ (dy B)
//!            dA = dxaᵀ x              dx  = dxa A
//! ```
//!
//! and each adapter's `dA`, `dB` are its rows / columns of the stacked ones. Zero picks
//! make other adapters' tokens contribute exactly zero. When every token is on the one
//! adapter present, `P` is that adapter's scale and no matrix is built. The price of one
//! product for all: `x Aᵀ` and `dxaᵀ x` cost `R` columns per token rather than the
//! token's own rank.

use crate::error::{Error, Result};
use crate::lora::{LoraGrads, Site};
use crate::model::batch::PackedBatch;
use crate::model::front::Adapters;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Per stacked adapter: its index, `dA` and `dB`.
pub(crate) type AdapterGrads = Vec<(usize, Tensor, Tensor)>;

/// How each packed token picks its adapter's columns of a stack.
#[derive(Clone)]
enum Pick {
    /// Every token is on the one adapter stacked: its scale.
    All(f64),
    /// `[N, R]`: the token's adapter's scale in its columns, 0 elsewhere.
    Matrix(Tensor),
}

/// The adapters carrying one site in a batch, stacked (see the module doc).
pub(crate) struct Stack {
    /// `[R, in]` and `[out, R]`, in the model's dtype.
    a: Tensor,
    b: Tensor,
    pick: Pick,
    /// Per stacked adapter: its index, first column and rank.
    cols: Vec<(usize, usize, usize)>,
}

/// A batch's tokens and adapters, ready to stack any site. Built once per pass; pick
/// matrices are shared by the sites whose stacks have the same columns.
pub(crate) struct LoraPlan<'a> {
    adapters: &'a Adapters<'a>,
    /// Per packed token, its adapter.
    token_adapter: Vec<Option<usize>>,
    /// The adapters some token is on, ascending.
    present: Vec<usize>,
    device: Device,
    dtype: DType,
    picks: HashMap<Vec<(usize, usize)>, Pick>,
}

impl<'a> LoraPlan<'a> {
    pub(crate) fn new(
        b: &PackedBatch,
        adapters: &'a Adapters<'a>,
        device: &Device,
        dtype: DType,
    ) -> Self {
        let mut token_adapter = Vec::with_capacity(b.num_tokens());
        for r in &b.rows {
            token_adapter.extend(std::iter::repeat_n(r.adapter, r.len));
        }
        let mut present: Vec<usize> = b.rows.iter().filter_map(|r| r.adapter).collect();
        present.sort_unstable();
        present.dedup();
        LoraPlan {
            adapters,
            token_adapter,
            present,
            device: device.clone(),
            dtype,
            picks: HashMap::new(),
        }
    }

    /// Whether some token in `start..start + len` is on an adapter with a pair at `site`.
    pub(crate) fn any_in(&self, site: Site, start: usize, len: usize) -> bool {
        self.token_adapter[start..start + len]
            .iter()
            .flatten()
            .any(|&a| self.adapters.get(a).is_some_and(|w| w.get(site).is_some()))
    }

    /// The stack of `site`, or None if no token's adapter has a pair there.
    pub(crate) fn stack(&mut self, site: Site) -> Result<Option<Stack>> {
        let mut cols = Vec::new();
        let mut a_parts = Vec::new();
        let mut b_parts = Vec::new();
        let mut r0 = 0;
        for &ai in &self.present {
            let Some(p) = self.adapters.get(ai).and_then(|w| w.get(site)) else {
                continue;
            };
            let rank = p.a.dim(0)?;
            cols.push((ai, r0, rank));
            a_parts.push(p.a.to_dtype(self.dtype)?);
            b_parts.push(p.b.to_dtype(self.dtype)?);
            r0 += rank;
        }
        if cols.is_empty() {
            return Ok(None);
        }
        let key: Vec<(usize, usize)> = cols.iter().map(|&(ai, _, r)| (ai, r)).collect();
        let pick = match self.picks.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = self.pick(&cols, r0)?;
                self.picks.insert(key, p.clone());
                p
            }
        };
        let (a, b) = if a_parts.len() == 1 {
            (a_parts.swap_remove(0), b_parts.swap_remove(0))
        } else {
            (Tensor::cat(&a_parts, 0)?, Tensor::cat(&b_parts, 1)?)
        };
        Ok(Some(Stack { a, b, pick, cols }))
    }

    fn pick(&self, cols: &[(usize, usize, usize)], width: usize) -> Result<Pick> {
        let scale = |ai: usize| self.adapters.get(ai).map_or(0.0, |w| w.scale);
        if let [(only, _, _)] = cols {
            if self.token_adapter.iter().all(|a| *a == Some(*only)) {
                return Ok(Pick::All(scale(*only)));
            }
        }
        let n = self.token_adapter.len();
        let size = n
            .checked_mul(width)
            .ok_or_else(|| Error::invalid("batch", "LoRA pick matrix does not fit in memory"))?;
        let mut m = vec![0f64; size];
        for (t, a) in self.token_adapter.iter().enumerate() {
            let Some(&(ai, c0, rank)) = cols.iter().find(|c| Some(c.0) == *a) else {
                continue;
            };
            m[t * width + c0..t * width + c0 + rank].fill(scale(ai));
        }
        // Scales stay exact in f64; other dtypes convert from f32, which every device casts.
        let t = if self.dtype == DType::F64 {
            Tensor::from_vec(m, (n, width), &self.device)?
        } else {
            let m: Vec<f32> = m.into_iter().map(|v| v as f32).collect();
            Tensor::from_vec(m, (n, width), &self.device)?.to_dtype(self.dtype)?
        };
        Ok(Pick::Matrix(t))
    }
}

impl Stack {
    /// `xa` `[len, R]` of tokens `start..start + len` times their picks.
    fn apply(&self, xa: &Tensor, start: usize) -> Result<Tensor> {
        Ok(match &self.pick {
            Pick::All(s) => xa.affine(*s, 0.0)?,
            Pick::Matrix(m) => (xa * m.narrow(0, start, xa.dim(0)?)?)?,
        })
    }

    /// The update `Δy` `[len, out]` of tokens `start..start + len` (input `x` `[len, in]`),
    /// and `xs` for backward.
    pub(crate) fn forward(&self, x: &Tensor, start: usize) -> Result<(Tensor, Tensor)> {
        let xs = self.apply(&x.matmul(&self.a.t()?)?, start)?;
        Ok((xs.matmul(&self.b.t()?)?, xs))
    }

    /// Backward of [`Self::forward`] given the update's gradient `dy`: adds each stacked
    /// adapter's `dA`, `dB` (f32) at `site` to `grads` and returns the input gradient.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        xs: &Tensor,
        start: usize,
        site: Site,
        grads: &mut [LoraGrads],
    ) -> Result<Tensor> {
        let (dx, parts) = self.backward_parts(x, dy, xs, start)?;
        for (ai, da, db) in parts {
            if let Some(g) = grads.get_mut(ai) {
                g.add(site, da.to_dtype(DType::F32)?, db.to_dtype(DType::F32)?)?;
            }
        }
        Ok(dx)
    }

    /// The input gradient and, per stacked adapter, its index, `dA` and `dB` (in the
    /// model's dtype).
    pub(crate) fn backward_parts(
        &self,
        x: &Tensor,
        dy: &Tensor,
        xs: &Tensor,
        start: usize,
    ) -> Result<(Tensor, AdapterGrads)> {
        let db = dy.t()?.matmul(xs)?;
        let dxa = self.apply(&dy.matmul(&self.b)?, start)?;
        let da = dxa.t()?.matmul(x)?;
        let parts = self
            .cols
            .iter()
            .map(|&(ai, c0, rank)| {
                Ok((
                    ai,
                    da.narrow(0, c0, rank)?.contiguous()?,
                    db.narrow(1, c0, rank)?.contiguous()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((dxa.matmul(&self.a)?, parts))
    }
}
