//! What a sampling request asks of its prompt besides a continuation, all read off the
//! logits of the prompt's prefill: the logprob of each prompt token, the top-k tokens at
//! each position, the logprobs of ids the caller names (`target_prompt_logprobs`) and
//! independent draws from the model's distribution (`prompt_alt_tokens_k`).
//!
//! Row `i` of every output belongs to prompt position `i + 1` and is read off the logits
//! at position `i` (position 0 has nothing before it). The model hands the logits over in
//! chunks ([`crate::model::front::LogitsVisitor`]); this module never runs the model, and
//! allocates only sizes the request's validation has bounded.

use crate::error::{Error, Result};
use crate::util::SplitMix64;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Most prompt cells (`rows × columns` of `target_prompt_logprobs`, `rows × k` of
/// `prompt_alt_tokens_k`) one request may ask for: each is a few bytes of output, and this
/// keeps a request's answer to a few MB whatever its shape says.
pub const MAX_PROMPT_CELLS: usize = 1 << 20;

/// Most alternative draws per prompt position.
pub const MAX_PROMPT_ALT_TOKENS: usize = 64;

/// The cells of a `[rows, cols]` table: all of them in row-major order (dense), or the
/// listed ones of a CSR layout (sparse). Request and answer share one layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellLayout {
    pub rows: usize,
    pub cols: usize,
    /// CSR row pointers (`rows + 1`, from 0 to the number of cells) and each cell's
    /// column; `None`: dense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<Csr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Csr {
    pub crow: Vec<usize>,
    pub col: Vec<usize>,
}

impl CellLayout {
    /// Cells in the layout.
    pub fn cells(&self) -> usize {
        match &self.sparse {
            Some(c) => c.col.len(),
            None => self.rows.saturating_mul(self.cols),
        }
    }

    /// The cells of row `r`: consecutive in both layouts.
    pub fn row(&self, r: usize) -> Range<usize> {
        match &self.sparse {
            Some(c) => match (c.crow.get(r), c.crow.get(r + 1)) {
                (Some(&a), Some(&b)) => a..b,
                _ => 0..0,
            },
            None => r * self.cols..(r + 1) * self.cols,
        }
    }

    /// Shape and CSR consistency: `field` names the request field in errors.
    pub fn validate(&self, field: &str) -> Result<()> {
        let cells = self
            .rows
            .checked_mul(self.cols)
            .filter(|&n| n <= MAX_PROMPT_CELLS)
            .ok_or_else(|| {
                Error::invalid(
                    field,
                    format!(
                        "shape [{}, {}] holds more than {MAX_PROMPT_CELLS} cells",
                        self.rows, self.cols
                    ),
                )
            })?;
        if let Some(c) = &self.sparse {
            let ok = c.crow.len() == self.rows + 1
                && c.crow.first() == Some(&0)
                && c.crow.last() == Some(&c.col.len())
                && c.crow.windows(2).all(|w| w[0] <= w[1])
                && c.col.iter().all(|&j| j < self.cols);
            if !ok || c.col.len() > cells {
                return Err(Error::invalid(field, "inconsistent sparse CSR indices"));
            }
        }
        Ok(())
    }
}

/// `target_prompt_logprobs` of a request: per cell a token id to score, or `None` (the
/// SDK's `-1`). Row `i` is scored at prompt position `i + 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTargets {
    pub layout: CellLayout,
    /// One per cell of `layout`, in layout order.
    pub ids: Vec<Option<u32>>,
}

impl PromptTargets {
    /// Against the prompt it scores (`rows = prompt_len - 1`) and the vocabulary.
    pub fn validate(&self, prompt_len: usize, vocab: usize) -> Result<()> {
        const F: &str = "target_prompt_logprobs";
        self.layout.validate(F)?;
        if self.layout.rows != prompt_len.saturating_sub(1) || prompt_len < 2 {
            return Err(Error::invalid(
                F,
                format!(
                    "has {} rows; a prompt of {prompt_len} tokens needs len(prompt) - 1 = {} (and at least 2 tokens)",
                    self.layout.rows,
                    prompt_len.saturating_sub(1)
                ),
            ));
        }
        if self.ids.len() != self.layout.cells() {
            return Err(Error::invalid(
                F,
                format!(
                    "{} values for {} cells",
                    self.ids.len(),
                    self.layout.cells()
                ),
            ));
        }
        if let Some(t) = self.ids.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(
                F,
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        if self.first_row().is_none() {
            return Err(Error::invalid(F, "names no token id (every cell is -1)"));
        }
        Ok(())
    }

    /// The first row that names an id: rows before it need no logits.
    pub fn first_row(&self) -> Option<usize> {
        (0..self.layout.rows).find(|&r| self.layout.row(r).any(|c| self.ids[c].is_some()))
    }
}

/// What to compute from the prompt's logits, borrowed from a request.
#[derive(Debug, Clone, Copy)]
pub struct PromptAsk<'a> {
    pub prompt: &'a [u32],
    /// The logprob of every prompt token after the first.
    pub logprobs: bool,
    /// With `logprobs`: the `top_k` most likely tokens at each position.
    pub top_k: usize,
    /// Only the last `n` prompt tokens are scored (plain and top-k logprobs).
    pub last_n: Option<usize>,
    pub targets: Option<&'a PromptTargets>,
    /// Draws per position.
    pub alt_k: usize,
    /// The draws' temperature (0: the most likely token every time).
    pub temperature: f32,
    pub seed: u64,
}

impl PromptAsk<'_> {
    /// First position where plain and top-k logprobs are wanted.
    fn logprobs_from(&self) -> Option<usize> {
        let rows = self.prompt.len().checked_sub(1)?;
        self.logprobs
            .then(|| rows - self.last_n.unwrap_or(rows).min(rows))
    }

    /// First position whose logits anything needs (`None`: nothing): the prefix before it
    /// may come from a cache, as no logits are read there.
    pub fn first_position(&self) -> Option<usize> {
        if self.prompt.len() < 2 {
            return None;
        }
        [
            self.logprobs_from(),
            self.targets.and_then(PromptTargets::first_row),
            (self.alt_k > 0).then_some(0),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Draws of `prompt_alt_tokens_k`: `k` per row, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AltTokens {
    pub k: usize,
    pub tokens: Vec<u32>,
    /// The model's logprob (temperature 1) of each drawn token.
    pub logprobs: Vec<f32>,
}

/// Logprobs of `target_prompt_logprobs`: one per cell of its layout, 0 where it named no
/// id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetLogprobs {
    pub layout: CellLayout,
    pub logprobs: Vec<f32>,
}

/// The answers for one prompt, filled in as its logits arrive. Plain logprobs have one
/// entry per prompt token after the first (0 where not scored); top-k rows are empty where
/// not scored.
#[derive(Debug, Default)]
pub struct PromptScores {
    pub logprobs: Option<Vec<f32>>,
    pub top: Option<Vec<Vec<(u32, f32)>>>,
    pub targets: Option<TargetLogprobs>,
    pub alt: Option<AltTokens>,
}

/// One position's answers, computed apart from the others.
struct RowScores {
    logprob: Option<f32>,
    top: Vec<(u32, f32)>,
    targets: Vec<f32>,
    alt: Vec<(u32, f32)>,
}

impl PromptScores {
    /// Room for every answer `ask` wants (its sizes are bounded by validation).
    pub fn new(ask: &PromptAsk) -> Self {
        let rows = ask.prompt.len().saturating_sub(1);
        PromptScores {
            logprobs: ask.logprobs.then(|| vec![0.0; rows]),
            top: (ask.logprobs && ask.top_k > 0).then(|| vec![Vec::new(); rows]),
            targets: ask.targets.map(|t| TargetLogprobs {
                layout: t.layout.clone(),
                logprobs: vec![0.0; t.ids.len()],
            }),
            alt: (ask.alt_k > 0).then(|| AltTokens {
                k: ask.alt_k,
                tokens: vec![0; rows * ask.alt_k],
                logprobs: vec![0.0; rows * ask.alt_k],
            }),
        }
    }

    /// Take the logits of positions `first..first + n` (`logits` is `[n, vocab]`).
    pub fn visit(
        &mut self,
        ask: &PromptAsk,
        first: usize,
        logits: &[f32],
        vocab: usize,
    ) -> Result<()> {
        let rows = ask.prompt.len().saturating_sub(1);
        if vocab == 0 || logits.len() % vocab != 0 {
            return Err(Error::invalid(
                "logits",
                "not a whole number of vocabulary rows",
            ));
        }
        let n = (logits.len() / vocab).min(rows.saturating_sub(first));
        let lp_from = ask.logprobs_from();
        let scored: Vec<RowScores> = (0..n)
            .into_par_iter()
            .map(|j| {
                let q = first + j;
                let row = &logits[j * vocab..(j + 1) * vocab];
                score_row(ask, q, lp_from.is_some_and(|f| q >= f), row)
            })
            .collect();
        for (j, s) in scored.into_iter().enumerate() {
            let q = first + j;
            if let (Some(lp), Some(v)) = (s.logprob, self.logprobs.as_mut()) {
                v[q] = lp;
            }
            if let Some(top) = self.top.as_mut() {
                if !s.top.is_empty() {
                    top[q] = s.top;
                }
            }
            if let (Some(t), Some(ask_t)) = (self.targets.as_mut(), ask.targets) {
                let cells = ask_t.layout.row(q);
                if cells.len() == s.targets.len() {
                    t.logprobs[cells].copy_from_slice(&s.targets);
                }
            }
            if let Some(a) = self.alt.as_mut() {
                for (c, (tok, lp)) in s.alt.into_iter().enumerate() {
                    a.tokens[q * a.k + c] = tok;
                    a.logprobs[q * a.k + c] = lp;
                }
            }
        }
        Ok(())
    }
}

/// Everything `ask` wants from the logits at position `q` (which predict prompt token
/// `q + 1`).
fn score_row(ask: &PromptAsk, q: usize, lp_here: bool, row: &[f32]) -> RowScores {
    let lse = log_sum_exp_f64(row);
    let lp = |t: u32| row.get(t as usize).map_or(f32::NEG_INFINITY, |&l| l - lse);
    let logprob = lp_here.then(|| lp(ask.prompt[q + 1]));
    let top = if lp_here && ask.top_k > 0 {
        crate::model::front::top_k_of(row, ask.top_k, lse)
    } else {
        Vec::new()
    };
    let targets = match ask.targets {
        Some(t) => t.layout.row(q).map(|c| t.ids[c].map_or(0.0, lp)).collect(),
        None => Vec::new(),
    };
    let alt = if ask.alt_k > 0 {
        // A stream per position: the draws do not depend on how the prompt was chunked.
        let mut rng =
            SplitMix64::new(ask.seed ^ (q as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        draw(row, ask.temperature, ask.alt_k, &mut rng)
            .into_iter()
            .map(|t| (t, lp(t)))
            .collect()
    } else {
        Vec::new()
    };
    RowScores {
        logprob,
        top,
        targets,
        alt,
    }
}

/// `ln Σ exp(x)`, summed in f64 (the vocabulary is wide).
pub fn log_sum_exp_f64(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let s: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (max as f64 + s.ln()) as f32
}

/// `k` independent draws, with replacement, from `softmax(row / temperature)`
/// (temperature 0: the most likely token each time).
pub fn draw(row: &[f32], temperature: f32, k: usize, rng: &mut SplitMix64) -> Vec<u32> {
    let argmax = || {
        row.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                if x > b.1 {
                    (i, x)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 || row.is_empty() {
        return vec![argmax(); k];
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut cum = Vec::with_capacity(row.len());
    let mut acc = 0f64;
    for &l in row {
        acc += (((l - max) / temperature) as f64).exp();
        cum.push(acc);
    }
    (0..k)
        .map(|_| {
            let u = rng.uniform() * acc;
            // The first entry whose cumulative weight exceeds u.
            cum.partition_point(|&c| c <= u).min(row.len() - 1) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(prompt: &[u32]) -> PromptAsk<'_> {
        PromptAsk {
            prompt,
            logprobs: false,
            top_k: 0,
            last_n: None,
            targets: None,
            alt_k: 0,
            temperature: 1.0,
            seed: 1,
        }
    }

    #[test]
    fn first_position_is_the_earliest_logits_anything_reads() {
        let p = [1u32, 2, 3, 4, 5, 6];
        assert_eq!(ask(&p).first_position(), None);
        let mut a = ask(&p);
        a.logprobs = true;
        assert_eq!(a.first_position(), Some(0));
        a.last_n = Some(2);
        assert_eq!(a.first_position(), Some(3));
        let t = PromptTargets {
            layout: CellLayout {
                rows: 5,
                cols: 1,
                sparse: None,
            },
            ids: vec![None, Some(3), None, None, None],
        };
        a.targets = Some(&t);
        assert_eq!(a.first_position(), Some(1));
        a.alt_k = 2;
        assert_eq!(a.first_position(), Some(0));
    }

    #[test]
    fn sparse_rows_and_validation() {
        let l = CellLayout {
            rows: 3,
            cols: 4,
            sparse: Some(Csr {
                crow: vec![0, 0, 2, 3],
                col: vec![1, 3, 0],
            }),
        };
        l.validate("f").unwrap();
        assert_eq!(l.row(0), 0..0);
        assert_eq!(l.row(1), 0..2);
        assert_eq!(l.row(2), 2..3);
        let bad = CellLayout {
            sparse: Some(Csr {
                crow: vec![0, 0, 2, 3],
                col: vec![1, 4, 0],
            }),
            ..l.clone()
        };
        assert!(bad.validate("f").is_err());
        let huge = CellLayout {
            rows: 1 << 40,
            cols: 1 << 40,
            sparse: None,
        };
        let e = huge.validate("target_prompt_logprobs").unwrap_err();
        assert!(e.to_string().contains("target_prompt_logprobs"), "{e}");
    }

    #[test]
    fn draws_follow_the_tempered_distribution() {
        let row = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = SplitMix64::new(5);
        let d = draw(&row, 1.0, 40_000, &mut rng);
        let ones = d.iter().filter(|&&t| t == 1).count() as f64 / d.len() as f64;
        assert!((ones - 0.75).abs() < 0.01, "{ones}");
        assert!(d.iter().all(|&t| t < 2));
        // Temperature 2 flattens 1:3 to 1:sqrt(3).
        let d = draw(&row, 2.0, 40_000, &mut rng);
        let ones = d.iter().filter(|&&t| t == 1).count() as f64 / d.len() as f64;
        let want = 3f64.sqrt() / (1.0 + 3f64.sqrt());
        assert!((ones - want).abs() < 0.01, "{ones} vs {want}");
        assert_eq!(draw(&row, 0.0, 3, &mut rng), vec![1, 1, 1]);
    }
}
