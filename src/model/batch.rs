//! Packing rows of different lengths and adapters into one token matrix. Rows are ordered
//! by adapter so each adapter's tokens form one contiguous segment: the base matmuls run
//! once over all tokens; the cpu backend runs each segment's LoRA update once over its own
//! slice (the candle backend stacks all adapters instead, see `backend/candle/lora.rs`).

/// One packed row: tokens `[start, start+len)` of the batch, at positions `pos0..pos0+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub start: usize,
    pub len: usize,
    pub pos0: usize,
    pub adapter: Option<usize>,
}

/// A maximal run of consecutive tokens that use the same adapter (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    /// In packed order.
    pub rows: Vec<Row>,
    pub segments: Vec<Segment>,
    /// `order[i]` is the caller's index of packed row `i`.
    pub order: Vec<usize>,
}

impl PackedBatch {
    /// `rows[i] = (tokens, adapter index, first position)`.
    pub fn new(rows: &[(&[u32], Option<usize>, usize)]) -> Self {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].1.map_or(0, |a| a + 1));
        let mut tokens = Vec::with_capacity(rows.iter().map(|r| r.0.len()).sum());
        let mut packed = Vec::with_capacity(rows.len());
        let mut segments: Vec<Segment> = Vec::new();
        for &i in &order {
            let (toks, adapter, pos0) = rows[i];
            let start = tokens.len();
            tokens.extend_from_slice(toks);
            packed.push(Row {
                start,
                len: toks.len(),
                pos0,
                adapter,
            });
            match segments.last_mut() {
                Some(s) if s.adapter == adapter => s.len += toks.len(),
                _ => segments.push(Segment {
                    start,
                    len: toks.len(),
                    adapter,
                }),
            }
        }
        PackedBatch {
            tokens,
            rows: packed,
            segments,
            order,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}
