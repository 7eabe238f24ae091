//! Training rows and the one check they pass before a training pass. [`BaseModel`] checks a
//! row's tokens, target ids, `k`, vocabulary and context here and nowhere else: either a
//! whole batch of borrowed rows at once ([`BaseModel::train_batch`]) or one owned row at a
//! request's submission ([`BaseModel::check_train_row`], kept as a [`CheckedRow`] until
//! its batch runs). [`BaseModel::forward_train`] takes only a [`TrainBatch`], so what it
//! runs has been checked; it looks again only at the adapters, which are known there.

use super::config::LlamaConfig;
use super::BaseModel;
use crate::error::{Error, Result};

/// A training row: `targets` holds `k` candidate ids per position (`k = 1` for ordinary
/// next-token targets), row-major `[len, k]`.
#[derive(Debug, Clone, Copy)]
pub struct TrainRow<'a> {
    pub tokens: &'a [u32],
    pub targets: &'a [u32],
    pub k: usize,
    pub adapter: Option<usize>,
}

/// A row's tokens and target ids as a model accepted them: every id inside its
/// vocabulary, the row within its context, `targets.len() == tokens.len() · k`, `k ≥ 1`.
/// Only [`BaseModel::check_train_row`] makes one.
#[derive(Debug, Clone)]
pub struct CheckedRow {
    tokens: Vec<u32>,
    targets: Vec<u32>,
    k: usize,
    /// The vocabulary size it was checked against: every id is below it.
    vocab: usize,
}

impl CheckedRow {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// `[len, k]` row-major.
    pub fn targets(&self) -> &[u32] {
        &self.targets
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Its tokens back, for a caller that gives the row up.
    pub fn into_tokens(self) -> Vec<u32> {
        self.tokens
    }
}

/// Rows ready for [`BaseModel::forward_train`]: checked, each with its adapter slot.
/// Made by [`BaseModel::train_batch`] (which checks) or [`TrainBatch::of_checked`] (from
/// rows checked before).
#[derive(Debug, Clone)]
pub struct TrainBatch<'a> {
    rows: Vec<TrainRow<'a>>,
    /// The smallest vocabulary any row was checked against, and the longest row: what a
    /// model must hold to run the batch, compared in constant time.
    vocab: usize,
    max_len: usize,
}

impl<'a> TrainBatch<'a> {
    /// A batch of rows that [`BaseModel::check_train_row`] accepted, with their adapter
    /// slots; the rows are not looked at again.
    pub fn of_checked(rows: impl IntoIterator<Item = (&'a CheckedRow, Option<usize>)>) -> Self {
        let mut b = TrainBatch {
            rows: Vec::new(),
            vocab: usize::MAX,
            max_len: 0,
        };
        for (r, adapter) in rows {
            b.vocab = b.vocab.min(r.vocab);
            b.max_len = b.max_len.max(r.tokens.len());
            b.rows.push(TrainRow {
                tokens: &r.tokens,
                targets: &r.targets,
                k: r.k,
                adapter,
            });
        }
        b
    }

    pub fn rows(&self) -> &[TrainRow<'a>] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether a model of this configuration can run the batch: not empty, every id inside
    /// its vocabulary and every row inside its context (known from the check).
    pub(crate) fn runs_on(&self, config: &LlamaConfig) -> Result<()> {
        if self.rows.is_empty() {
            return Err(Error::invalid("data", "empty batch"));
        }
        if self.vocab > config.vocab_size || self.max_len > config.max_position_embeddings {
            return Err(Error::invalid(
                "data",
                format!(
                    "rows were checked against another model (vocabulary {}, {} positions); \
                     this one has a vocabulary of {} and a context of {}",
                    self.vocab, self.max_len, config.vocab_size, config.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }
}

impl BaseModel {
    /// Check borrowed rows (fields `data[i]`) and batch them for [`Self::forward_train`].
    pub fn train_batch<'a>(&self, rows: &[TrainRow<'a>]) -> Result<TrainBatch<'a>> {
        for (i, r) in rows.iter().enumerate() {
            self.check_row(&format!("data[{i}]"), r.tokens, r.targets, r.k)?;
        }
        Ok(TrainBatch {
            rows: rows.to_vec(),
            vocab: self.config.vocab_size,
            max_len: rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0),
        })
    }

    /// Check one row, named `field` in errors, and keep it as checked. `targets` gives the
    /// target ids and `k` once the tokens have passed (so a bad `model_input` is reported
    /// before anything about its targets).
    pub fn check_train_row(
        &self,
        field: &str,
        tokens: Vec<u32>,
        targets: impl FnOnce() -> Result<(Vec<u32>, usize)>,
    ) -> Result<CheckedRow> {
        self.check_tokens(&format!("{field}.model_input"), &tokens, 0)?;
        let (targets, k) = targets()?;
        self.check_targets(field, tokens.len(), &targets, k)?;
        Ok(CheckedRow {
            tokens,
            targets,
            k,
            vocab: self.config.vocab_size,
        })
    }

    fn check_row(&self, field: &str, tokens: &[u32], targets: &[u32], k: usize) -> Result<()> {
        self.check_tokens(&format!("{field}.model_input"), tokens, 0)?;
        self.check_targets(field, tokens.len(), targets, k)
    }

    fn check_targets(&self, field: &str, len: usize, targets: &[u32], k: usize) -> Result<()> {
        let f = || format!("{field}.loss_fn_inputs.target_tokens");
        if k == 0 || len.checked_mul(k) != Some(targets.len()) {
            return Err(Error::invalid(
                f(),
                format!(
                    "has {} entries; expected {len} (model_input length) x {}",
                    targets.len(),
                    k.max(1)
                ),
            ));
        }
        if let Some(t) = targets
            .iter()
            .find(|t| **t as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(
                f(),
                format!(
                    "token id {t} is outside the vocabulary (size {})",
                    self.config.vocab_size
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_checked_for_a_bigger_model_does_not_run_on_a_smaller_one() {
        let small = crate::model::config::LlamaConfig::tiny();
        let mut big = small.clone();
        big.vocab_size += 10;
        let row = CheckedRow {
            tokens: vec![1, 2],
            targets: vec![2, small.vocab_size as u32 + 3],
            k: 1,
            vocab: big.vocab_size,
        };
        let b = TrainBatch::of_checked([(&row, None)]);
        assert!(b.runs_on(&big).is_ok());
        let e = b.runs_on(&small).unwrap_err().to_string();
        assert!(e.contains("another model"), "{e}");
        let empty = TrainBatch::of_checked([]);
        assert!(empty
            .runs_on(&big)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}
