//! Quantized base weights as stored in a GGUF file, and the cpu backend's products with
//! them: `x · Wᵀ` (training forward, prefill, decode) and `dy · W` (the input gradient of
//! the backward pass), reading the quantized blocks directly. Nothing here builds a
//! dequantized copy of a whole weight: a product dequantizes a few weight rows at a time
//! into a tile that stays in cache (one row at a time for few rows of `x`, as in a decode
//! step, where the product is bound by the bytes read; tiles of about 1 MiB for many, which then
//! go through the `gemm` crate like the f32 weights do).
//!
//! Layouts are llama.cpp's (ggml-quants.c), byte for byte: Q8_0, Q4_0, Q4_1 (32 values per
//! block) and Q4_K, Q5_K, Q6_K (256 per block). Each has a portable dequantizer; Q8_0,
//! Q4_0 and Q4_1 also have AVX2 ones. The tests hold every layout to candle's own
//! dequantization (an independent implementation) and the products to f32 products of the
//! dequantized weights.

use super::{gemm_raw, Mat};
use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

/// A GGUF block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q5K,
    Q6K,
    /// Plain bf16 values (safetensors, GGUF BF16, or `--base-dtype bf16`), in "blocks" of
    /// 32 values so that they share the products' code.
    BF16,
    /// Plain f16 values, likewise.
    F16,
}

impl QKind {
    /// Every layout.
    pub const ALL: [QKind; 8] = [
        QKind::Q8_0,
        QKind::Q4_0,
        QKind::Q4_1,
        QKind::Q4K,
        QKind::Q5K,
        QKind::Q6K,
        QKind::BF16,
        QKind::F16,
    ];

    /// candle's name of the GGUF tensor type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QKind::Q8_0 => GgmlDType::Q8_0,
            QKind::Q4_0 => GgmlDType::Q4_0,
            QKind::Q4_1 => GgmlDType::Q4_1,
            QKind::Q4K => GgmlDType::Q4K,
            QKind::Q5K => GgmlDType::Q5K,
            QKind::Q6K => GgmlDType::Q6K,
            QKind::BF16 => GgmlDType::BF16,
            QKind::F16 => GgmlDType::F16,
        }
    }

    /// The layout of a GGUF tensor type, if the cpu backend reads it in place.
    pub fn from_ggml(d: GgmlDType) -> Option<QKind> {
        QKind::ALL.into_iter().find(|k| k.ggml() == d)
    }

    /// Whether the fused AVX2 kernel reads it (32-value blocks).
    fn fused(self) -> bool {
        !matches!(self, QKind::Q4K | QKind::Q5K | QKind::Q6K)
    }

    /// Whether a block's values carry an offset besides their scale (Q4_0's `-8d`, Q4_1's
    /// `m`), which the fused products take as `offset · Σ x`.
    fn offset(self) -> bool {
        matches!(self, QKind::Q4_0 | QKind::Q4_1)
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            QKind::Q8_0 | QKind::Q4_0 | QKind::Q4_1 | QKind::BF16 | QKind::F16 => 32,
            QKind::Q4K | QKind::Q5K | QKind::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q8_0 => 34,
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q4K => 144,
            QKind::Q5K => 176,
            QKind::Q6K => 210,
            QKind::BF16 | QKind::F16 => 64,
        }
    }

    /// llama.cpp's name.
    pub fn name(self) -> &'static str {
        match self {
            QKind::Q8_0 => "Q8_0",
            QKind::Q4_0 => "Q4_0",
            QKind::Q4_1 => "Q4_1",
            QKind::Q4K => "Q4_K",
            QKind::Q5K => "Q5_K",
            QKind::Q6K => "Q6_K",
            QKind::BF16 => "BF16",
            QKind::F16 => "F16",
        }
    }
}

/// A frozen `[rows, cols]` weight kept in its quantized blocks (row-major: each row is
/// `cols / block_values` whole blocks).
#[derive(Clone)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({} [{}, {}])",
            self.kind.name(),
            self.rows,
            self.cols
        )
    }
}

impl QMatrix {
    /// Wrap the blocks of a `[rows, cols]` tensor, checking that the sizes agree (they come
    /// from a file: a mismatch is an error, never a panic or an out-of-bounds read).
    pub fn new(kind: QKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let bv = kind.block_values();
        if cols == 0 || cols % bv != 0 {
            return Err(Error::Unsupported(format!(
                "a {} weight needs a row length that is a multiple of {bv}, got {cols}",
                kind.name()
            )));
        }
        let want = rows
            .checked_mul(cols / bv)
            .and_then(|b| b.checked_mul(kind.block_bytes()));
        if want != Some(data.len()) {
            return Err(Error::Unsupported(format!(
                "a {} weight [{rows}, {cols}] takes {want:?} bytes, the data has {}",
                kind.name(),
                data.len()
            )));
        }
        Ok(QMatrix {
            kind,
            rows,
            cols,
            data,
        })
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of its blocks.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_values() * self.kind.block_bytes()
    }

    /// Dequantize rows `r0..r1` into `out` (`(r1 - r0) · cols` values).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        assert!(r0 <= r1 && r1 <= self.rows && out.len() >= (r1 - r0) * self.cols);
        let src = &self.data[r0 * rb..r1 * rb];
        dequantize(self.kind, src, &mut out[..(r1 - r0) * self.cols]);
    }

    /// The whole matrix in f32 (tests and references only: products never call it).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }
}

/// Dequantize whole blocks: `out.len()` values from `src`.
fn dequantize(kind: QKind, src: &[u8], out: &mut [f32]) {
    let (bb, bv) = (kind.block_bytes(), kind.block_values());
    debug_assert_eq!(src.len() / bb * bv, out.len());
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma()
        && std::arch::is_x86_feature_detected!("f16c")
        && matches!(kind, QKind::Q8_0 | QKind::Q4_0 | QKind::Q4_1)
    {
        for (b, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
            // SAFETY: AVX2, FMA and F16C were detected; `b` and `o` hold one block each.
            unsafe { avx2::dequant_block(kind, b, o) };
        }
        return;
    }
    for (b, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        dequant_block(kind, b, o);
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_K / Q5_K: the 6-bit scale and min of sub-block `j` (of 8) from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// One block, portably.
fn dequant_block(kind: QKind, b: &[u8], y: &mut [f32]) {
    match kind {
        QKind::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        QKind::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
                y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        QKind::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = d * (qs[j] & 0xF) as f32 + m;
                y[j + 16] = d * (qs[j] >> 4) as f32 + m;
            }
        }
        QKind::Q4K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for c in 0..4 {
                let (s1, m1) = scale_min_k4(2 * c, scales);
                let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
                let q = &qs[32 * c..32 * c + 32];
                let o = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    o[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        QKind::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            for c in 0..4 {
                let (s1, m1) = scale_min_k4(2 * c, scales);
                let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
                let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                let q = &qs[32 * c..32 * c + 32];
                let o = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    o[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                    o[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        QKind::BF16 => {
            for (o, v) in y.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([v[0], v[1]]).to_f32();
            }
        }
        QKind::F16 => {
            for (o, v) in y.iter_mut().zip(b.chunks_exact(2)) {
                *o = f16::from_le_bytes([v[0], v[1]]).to_f32();
            }
        }
        QKind::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
                let sc = &sc[8 * n..8 * n + 8];
                let o = &mut y[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    let s = |i: usize| d * (sc[i] as i8) as f32;
                    o[l] = s(is) * q1 as f32;
                    o[l + 32] = s(is + 2) * q2 as f32;
                    o[l + 64] = s(is + 4) * q3 as f32;
                    o[l + 96] = s(is + 6) * q4 as f32;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::QKind;
    use std::arch::x86_64::*;

    /// One block of Q8_0, Q4_0 or Q4_1 (any other layout: the portable path).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_block(kind: QKind, b: &[u8], y: &mut [f32]) {
        assert!(y.len() >= 32 && b.len() >= kind.block_bytes());
        let v = match kind {
            QKind::Q8_0 => scaled::<0>(block_ints::<0>(b.as_ptr())),
            QKind::Q4_0 => scaled::<1>(block_ints::<1>(b.as_ptr())),
            QKind::Q4_1 => scaled::<2>(block_ints::<2>(b.as_ptr())),
            _ => return super::dequant_block(kind, b, y),
        };
        for (i, v) in v.into_iter().enumerate() {
            _mm256_storeu_ps(y.as_mut_ptr().add(8 * i), v);
        }
    }

    /// The block at `q` of Q8_0 (`L` = 0), Q4_0 (1) or Q4_1 (2): its f16 scales as f32,
    /// `[d, m, 0, 0]` for Q4_1 and `[d, 0, 0, 0]` otherwise, and its 32 integers in order
    /// widened to f32 (exactly), straight from memory with no shuffles besides the widening.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_ints<const L: u8>(q: *const u8) -> (__m128, [__m256; 4]) {
        let raw = if L == 2 {
            (q as *const i32).read_unaligned()
        } else {
            (q as *const u16).read_unaligned() as i32
        };
        let h = _mm_cvtph_ps(_mm_cvtsi32_si128(raw));
        let ints = if L == 0 {
            let f = |i: usize| {
                let v = _mm_loadl_epi64(q.add(2 + 8 * i) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
            };
            [f(0), f(1), f(2), f(3)]
        } else {
            let qs = q.add(if L == 1 { 2 } else { 4 });
            let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs as *const __m128i));
            let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8) as *const __m128i));
            let m4 = _mm256_set1_epi32(0xF);
            [
                _mm256_cvtepi32_ps(_mm256_and_si256(v0, m4)),
                _mm256_cvtepi32_ps(_mm256_and_si256(v1, m4)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)),
            ]
        };
        (h, ints)
    }

    /// A block's values from [`block_ints`]: `d · q` (Q8_0), `d · q - 8d` (Q4_0) or
    /// `d · q + m` (Q4_1).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scaled<const L: u8>((h, ints): (__m128, [__m256; 4])) -> [__m256; 4] {
        let dv = _mm256_broadcastss_ps(h);
        match L {
            0 => ints.map(|v| _mm256_mul_ps(dv, v)),
            1 => {
                let mv = _mm256_mul_ps(dv, _mm256_set1_ps(-8.0));
                ints.map(|v| _mm256_fmadd_ps(dv, v, mv))
            }
            _ => {
                let mv = _mm256_broadcastss_ps(_mm_movehdup_ps(h));
                ints.map(|v| _mm256_fmadd_ps(dv, v, mv))
            }
        }
    }

    /// Every weight row `j` of `w` (rows of a 32-value layout, `rb` bytes apart) against
    /// `M` rows of `x`: [`dot_row_q`] or [`dot_row_half`] as the layout asks (`xsum` as
    /// the former takes it), row `r`'s value to `out[r · ld + j]`, which must be writable
    /// for every `r < M` and weight row `j`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dot_rows<const M: usize>(
        kind: QKind,
        w: &[u8],
        rb: usize,
        x: *const f32,
        ldx: usize,
        xsum: *const f32,
        out: *mut f32,
        ld: usize,
    ) {
        for (j, wr) in w.chunks_exact(rb).enumerate() {
            let mut o = [0f32; M];
            match kind {
                QKind::Q8_0 => dot_row_q::<M, 0>(wr, x, ldx, xsum, &mut o),
                QKind::Q4_0 => dot_row_q::<M, 1>(wr, x, ldx, xsum, &mut o),
                QKind::Q4_1 => dot_row_q::<M, 2>(wr, x, ldx, xsum, &mut o),
                _ => dot_row_half::<M>(kind, wr, x, ldx, &mut o),
            }
            for (r, v) in o.iter().enumerate() {
                *out.add(r * ld + j) = *v;
            }
        }
    }

    /// `out[r] = Σₖ x_r[k] · W[k]` for one weight row `w` of Q8_0 (`L` = 0), Q4_0 (1) or
    /// Q4_1 (2) blocks and `M` rows of `x` (`x[r · ldx ..]`), each block's integers
    /// widened to f32 in registers (exactly). For one row the scales are factored out of
    /// the block, `d · Σ x q` plus Q4_1's offset `m · Σ x` (Q4_0's `-8d · Σ x`) from
    /// `xsum`, the sums of the row's 32-value blocks (`xsum[b]`; unread for Q8_0): 6 vector
    /// operations per block instead of 8. For more rows the block is dequantized first
    /// and shared by them. Either way the result is the f32 product up to accumulation
    /// order.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row_q<const M: usize, const L: u8>(
        w: &[u8],
        x: *const f32,
        ldx: usize,
        xsum: *const f32,
        out: &mut [f32; M],
    ) {
        let bb = [34usize, 18, 20][L as usize];
        let nb = w.len() / bb;
        // Two sets of accumulators, for even and odd blocks, so that one chain of FMAs does
        // not wait on the previous block's (8 rows have chains enough, and registers for
        // one set only). `off` gathers `h · Σ x` (`h` the block's f16 scales).
        let mut tot = [[_mm256_setzero_ps(); M]; 2];
        let mut off = [[_mm_setzero_ps(); M]; 2];
        let wp = w.as_ptr();
        let mut b = 0;
        while b + 2 <= nb {
            q_block::<M, L>(wp.add(b * bb), x, ldx, xsum, b, &mut tot[0], &mut off[0]);
            let (t, o) = (&mut tot[usize::from(M < 8)], &mut off[1]);
            q_block::<M, L>(wp.add((b + 1) * bb), x, ldx, xsum, b + 1, t, o);
            b += 2;
        }
        if b < nb {
            q_block::<M, L>(wp.add(b * bb), x, ldx, xsum, b, &mut tot[0], &mut off[0]);
        }
        for (r, o) in out.iter_mut().enumerate() {
            let s = _mm256_add_ps(tot[0][r], tot[1][r]);
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            let of = _mm_add_ps(off[0][r], off[1][r]);
            *o = _mm_cvtss_f32(h)
                + match L {
                    1 => -8.0 * _mm_cvtss_f32(of),
                    2 => _mm_cvtss_f32(_mm_movehdup_ps(of)),
                    _ => 0.0,
                };
        }
    }

    /// Block `b` (at `q`) of [`dot_row_q`] against each of the `M` rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn q_block<const M: usize, const L: u8>(
        q: *const u8,
        x: *const f32,
        ldx: usize,
        xsum: *const f32,
        b: usize,
        tot: &mut [__m256; M],
        off: &mut [__m128; M],
    ) {
        let (h, wv) = block_ints::<L>(q);
        if M == 1 {
            let a = _mm256_mul_ps(wv[0], _mm256_loadu_ps(x.add(b * 32)));
            let c = _mm256_mul_ps(wv[1], _mm256_loadu_ps(x.add(b * 32 + 8)));
            let a = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(x.add(b * 32 + 16)), a);
            let c = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(x.add(b * 32 + 24)), c);
            tot[0] = _mm256_fmadd_ps(_mm256_broadcastss_ps(h), _mm256_add_ps(a, c), tot[0]);
            if L != 0 {
                off[0] = _mm_fmadd_ps(h, _mm_broadcast_ss(&*xsum.add(b)), off[0]);
            }
            return;
        }
        let wv = scaled::<L>((h, wv));
        for (r, t) in tot.iter_mut().enumerate() {
            let xr = x.add(r * ldx + b * 32);
            let a = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xr));
            let c = _mm256_mul_ps(wv[1], _mm256_loadu_ps(xr.add(8)));
            let a = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xr.add(16)), a);
            let c = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xr.add(24)), c);
            *t = _mm256_add_ps(*t, _mm256_add_ps(a, c));
        }
    }

    /// `out[r] = Σₖ x_r[k] · W[k]` for one weight row `w` of bf16 or f16 values and `M`
    /// rows of `x` (`x[r · ldx ..]`), 32 values at a time widened in registers and used for
    /// every row before the next are read.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row_half<const M: usize>(
        kind: QKind,
        w: &[u8],
        x: *const f32,
        ldx: usize,
        out: &mut [f32; M],
    ) {
        // Independent accumulators per row: 4 for one row, fewer as rows add their own.
        let lanes = (4 / M).max(1);
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        for (bi, b) in w.chunks_exact(64).enumerate() {
            let q = b.as_ptr();
            let mut wv = [_mm256_setzero_ps(); 4];
            for (i, o) in wv.iter_mut().enumerate() {
                let raw = _mm_loadu_si128(q.add(16 * i) as *const __m128i);
                *o = if kind == QKind::BF16 {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
                } else {
                    _mm256_cvtph_ps(raw)
                };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xr = x.add(r * ldx + bi * 32);
                for (i, w) in wv.iter().enumerate() {
                    let ai = &mut a[i % lanes];
                    *ai = _mm256_fmadd_ps(*w, _mm256_loadu_ps(xr.add(8 * i)), *ai);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            *o = _mm_cvtss_f32(h);
        }
    }

    /// `Σ a[i] · b[i]` over `n` values (`n` a multiple of 32).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(o)), _mm256_loadu_ps(b.add(o)), *s);
            }
            i += 32;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        _mm_cvtss_f32(h)
    }
}

/// `Σ a[i] · b[i]` (lengths equal, a multiple of 32).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() && a.len() % 32 == 0 {
        // SAFETY: AVX2 and FMA were detected; both slices hold `a.len()` values.
        return unsafe { avx2::dot(a.as_ptr(), b.as_ptr(), a.len()) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Rows of `x` up to which `x · Wᵀ` dequantizes one weight row at a time and dots it with
/// every row of `x`; beyond, tiles of about 1 MiB go through the GEMM.
pub const ROW_AT_A_TIME_M: usize = 16;
const TILE_ROWS: usize = 64;
/// Bytes of a dequantized tile beyond few rows: big enough that the GEMM's packing of the
/// other operand, repeated per tile, stays small against the tile's own work (64-row tiles
/// made the LM head of a training pass 30% slower than in f32), small enough for L2.
const TILE_BYTES: usize = 1 << 20;

/// Weight rows per dequantized tile for rows of `width` values (a multiple of 64).
fn tile_rows(width: usize) -> usize {
    (TILE_BYTES / (4 * width.max(1))).clamp(TILE_ROWS, 4096) / TILE_ROWS * TILE_ROWS
}

/// Multiply-adds below which a product runs on the calling thread.
const PAR_MIN_WORK: usize = super::kernels::PAR_MIN_WORK;

/// Disjoint column ranges of one row-major output, written from several threads at once:
/// each worker of a product writes only the columns it owns (the products below split
/// their output by columns, which slices of rows cannot express).
#[derive(Clone, Copy)]
struct SharedCols<'a> {
    ptr: *mut f32,
    len: usize,
    ld: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointer comes from a `&'a mut [f32]` held for `'a`; workers sharing it write
// disjoint elements (their own columns), which is what the products guarantee.
unsafe impl Send for SharedCols<'_> {}
unsafe impl Sync for SharedCols<'_> {}

impl<'a> SharedCols<'a> {
    /// `out` as rows `ld` apart, with `m` rows and columns `c0..c1` checked to lie inside.
    fn new(out: &'a mut [f32], ld: usize, m: usize, (c0, c1): (usize, usize)) -> Self {
        assert!(c0 <= c1 && c1 <= ld && (m == 0 || (m - 1) * ld + c1 <= out.len()));
        SharedCols {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            ld,
            _out: std::marker::PhantomData,
        }
    }

    /// Pointer to element `(i, j)`, checked to lie inside.
    fn at(&self, i: usize, j: usize) -> *mut f32 {
        assert!(j < self.ld && i * self.ld + j < self.len);
        // SAFETY: in bounds (asserted).
        unsafe { self.ptr.add(i * self.ld + j) }
    }

    /// Pointer to element `(i0, j0)` of a block of `rows x cols` elements (rows `ld`
    /// apart) checked to lie inside: what a kernel writing the whole block takes.
    fn block(&self, (i0, rows): (usize, usize), (j0, cols): (usize, usize)) -> *mut f32 {
        assert!(rows > 0 && cols > 0);
        // The block's last element lies inside (`at` checks it), and every row's columns
        // j0..j0+cols lie within `ld`, so does the rest.
        self.at(i0 + rows - 1, j0 + cols - 1);
        self.at(i0, j0)
    }
}

thread_local! {
    /// Each thread's dequantized tile, kept between products (a fresh 1 MiB buffer per
    /// tile costs page faults and a memset).
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's tile buffer of at least `len` values (a fresh one if the
/// thread's own is in use).
fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    TILE.with(|t| match t.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// `out[i][col0 + j] = Σₖ x[i][k] · W[j][k]` for `x: [m, cols]`, `out` rows `ldo` wide:
/// the quantized counterpart of [`super::kernels::matmul_nt`]. Column blocks of the output go to the pool, each written
/// in place.
pub fn qmatmul_nt_to(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32], ldo: usize, col0: usize) {
    nt_parts(x, m, &[(w, col0)], out, ldo)
}

/// [`qmatmul_nt_to`] for several weights with the same row length, each `(W, col0)` into
/// its own columns of `out`, as one split across the pool (a decode step then waits for
/// the pool once per stacked weight, not once per part).
fn nt_parts(x: &[f32], m: usize, parts: &[(&QMatrix, usize)], out: &mut [f32], ldo: usize) {
    let Some(k) = parts.first().map(|(w, _)| w.cols) else {
        return;
    };
    assert!(parts.iter().all(|(w, _)| w.cols == k) && x.len() >= m * k);
    let ntot: usize = parts.iter().map(|(w, _)| w.rows).sum();
    if m == 0 || ntot == 0 {
        return;
    }
    let c0 = parts.iter().map(|&(_, c)| c).min().unwrap_or(0);
    let c1 = parts.iter().map(|(w, c)| c + w.rows).max().unwrap_or(0);
    let dst = SharedCols::new(out, ldo, m, (c0, c1));
    let tile = if m <= ROW_AT_A_TIME_M {
        4
    } else {
        tile_rows(k)
    };
    // Few rows of a 32-value layout on AVX2: blocks dequantized in registers, no buffer.
    #[cfg(target_arch = "x86_64")]
    let simd = m <= ROW_AT_A_TIME_M
        && super::kernels::has_avx2_fma()
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    // The sums of each row's 32-value blocks of `x`, for Q4_0 and Q4_1's offsets.
    let xsum: Vec<f32> = if simd && parts.iter().any(|(w, _)| w.kind.offset()) {
        x[..m * k]
            .chunks_exact(32)
            .map(|c| c.iter().sum())
            .collect()
    } else {
        Vec::new()
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = &xsum;
    // Row blocks of whole tiles of every part, a few per thread; each dequantizes its
    // weight rows a tile at a time (or reads them in registers) and writes its own columns
    // of `out`.
    let threads = rayon::current_num_threads();
    let per = ntot.div_ceil(threads * 4).next_multiple_of(tile);
    let items: Vec<(usize, usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(pi, (w, _))| {
            (0..w.rows)
                .step_by(per)
                .map(move |j0| (pi, j0, (j0 + per).min(w.rows)))
        })
        .collect();
    let work = |&(pi, j0, j1): &(usize, usize, usize)| {
        let (w, col0) = parts[pi];
        #[cfg(target_arch = "x86_64")]
        if simd && w.kind.fused() {
            let (rb, nb) = (w.row_bytes(), k / 32);
            let wr = &w.data[j0 * rb..j1 * rb];
            let mut i = 0;
            while i < m {
                let step = [1, 1, 2, 2, 4, 4, 4, 4, 8][(m - i).min(8)];
                let o = dst.block((i, step), (col0 + j0, j1 - j0));
                let xp = x[i * k..].as_ptr();
                let sp = xsum.get(i * nb..).unwrap_or_default().as_ptr();
                // SAFETY: AVX2, FMA and F16C were detected (`simd`); rows i..i+step of `x`
                // hold `k` values each (asserted on entry), as many as each weight row in
                // `wr`, and `xsum`, when the layout reads it, their `k / 32` block sums
                // each; `o` starts a block of rows i..i+step, columns col0+j0..col0+j1
                // inside `out` (checked), which are this worker's columns.
                unsafe {
                    match step {
                        8 => avx2::dot_rows::<8>(w.kind, wr, rb, xp, k, sp, o, ldo),
                        4 => avx2::dot_rows::<4>(w.kind, wr, rb, xp, k, sp, o, ldo),
                        2 => avx2::dot_rows::<2>(w.kind, wr, rb, xp, k, sp, o, ldo),
                        _ => avx2::dot_rows::<1>(w.kind, wr, rb, xp, k, sp, o, ldo),
                    }
                }
                i += step;
            }
            return;
        }
        with_tile(tile * k, |wt| {
            for t0 in (j0..j1).step_by(tile) {
                let rows = tile.min(j1 - t0);
                w.dequantize_rows(t0, t0 + rows, wt);
                if m <= ROW_AT_A_TIME_M {
                    for (jj, wr) in wt[..rows * k].chunks_exact(k).enumerate() {
                        for i in 0..m {
                            let v = dot(&x[i * k..(i + 1) * k], wr);
                            // SAFETY: `at` checks the bounds; the column is this worker's.
                            unsafe { *dst.at(i, col0 + t0 + jj) = v };
                        }
                    }
                } else {
                    let (a, b) = (Mat::rows(x, 0, k), Mat::t(wt, 0, k));
                    a.check(m, k);
                    b.check(k, rows);
                    let o = dst.block((0, m), (col0 + t0, rows));
                    // SAFETY: rows 0..m, columns col0+t0..col0+t0+rows of `out` lie inside
                    // it (checked) and are this worker's; the operands hold their views
                    // (checked).
                    unsafe { gemm_raw((m, rows, k), o, ldo, false, a, b, 1.0, false) };
                }
            }
        });
    };
    if m * ntot * k < PAR_MIN_WORK || threads == 1 {
        items.iter().for_each(work);
    } else {
        items.par_iter().for_each(work);
    }
}

/// `x · Wᵀ` as a new `[m, rows]` buffer.
pub fn qmatmul_nt(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
    let mut out = vec![0f32; m * w.rows];
    qmatmul_nt_to(x, m, w, &mut out, w.rows, 0);
    out
}

/// `out[i][k] += Σⱼ dy[i][j] · W[j][k]` for `dy: [m, rows]`, `out: [m, cols]`: the input
/// gradient of `x · Wᵀ`. Column blocks of `out` are split across the pool; each
/// dequantizes its blocks of every weight row, a tile of about 1 MiB at a time, and runs
/// the GEMM on them into its own columns of `out`.
pub fn qmatmul_nn_acc(dy: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    qmatmul_nn_acc_cols(dy, w.rows, 0, m, w, out)
}

/// [`qmatmul_nn_acc`] with `dy`'s columns `dcol0..dcol0 + W rows` of rows `ldy` wide.
fn qmatmul_nn_acc_cols(
    dy: &[f32],
    ldy: usize,
    dcol0: usize,
    m: usize,
    w: &QMatrix,
    out: &mut [f32],
) {
    let (n, k) = (w.rows, w.cols);
    assert!(dcol0 + n <= ldy);
    assert!(m == 0 || dy.len() >= (m - 1) * ldy + dcol0 + n);
    if m == 0 || n == 0 {
        return;
    }
    let dst = SharedCols::new(out, k, m, (0, k));
    let bv = w.kind.block_values();
    let bb = w.kind.block_bytes();
    let row_bytes = w.row_bytes();
    // Column chunks of whole blocks, a few per thread.
    let threads = rayon::current_num_threads();
    let blocks = k / bv;
    let per = blocks.div_ceil(threads * 2).max(1);
    let chunks: Vec<(usize, usize)> = (0..blocks.div_ceil(per))
        .map(|c| (c * per, ((c + 1) * per).min(blocks)))
        .collect();
    let work = |&(b0, b1): &(usize, usize)| {
        let (c0, width) = (b0 * bv, (b1 - b0) * bv);
        let tile = tile_rows(width);
        with_tile(tile.min(n) * width, |wt| {
            for j0 in (0..n).step_by(tile) {
                let rows = tile.min(n - j0);
                for r in 0..rows {
                    let src =
                        &w.data[(j0 + r) * row_bytes + b0 * bb..(j0 + r) * row_bytes + b1 * bb];
                    dequantize(w.kind, src, &mut wt[r * width..(r + 1) * width]);
                }
                let (a, b) = (Mat::rows(dy, dcol0 + j0, ldy), Mat::rows(wt, 0, width));
                a.check(m, rows);
                b.check(rows, width);
                let o = dst.block((0, m), (c0, width));
                // SAFETY: rows 0..m, columns c0..c0+width of `out` lie inside it (checked)
                // and are this worker's; the operands hold their views (checked).
                unsafe { gemm_raw((m, width, rows), o, k, true, a, b, 1.0, false) };
            }
        });
    };
    if m * n * k < PAR_MIN_WORK || threads == 1 {
        chunks.iter().for_each(work);
    } else {
        chunks.par_iter().for_each(work);
    }
}

/// A frozen `[rows, cols]` weight kept packed: one or more [`QMatrix`] parts stacked along
/// the rows (a fused q/k/v or gate/up weight whose parts a file stores in different
/// layouts, as llama.cpp's mixed `_M` files do).
#[derive(Clone, Debug)]
pub struct Packed {
    parts: Vec<QMatrix>,
    rows: usize,
    cols: usize,
}

impl Packed {
    /// Stack `parts` (at least one, all with the same row length).
    pub fn new(parts: Vec<QMatrix>) -> Result<Self> {
        let cols = parts
            .first()
            .map(|p| p.cols)
            .ok_or_else(|| Error::Unsupported("a packed weight needs at least one part".into()))?;
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            return Err(Error::Unsupported(format!(
                "stacked weight parts have row lengths {cols} and {}",
                p.cols
            )));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Ok(Packed { parts, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of its blocks.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes()).sum()
    }
    /// Its layouts, e.g. `Q4_1` or `Q4_K+Q6_K`.
    pub fn layout(&self) -> String {
        let mut names: Vec<&str> = self.parts.iter().map(|p| p.kind.name()).collect();
        names.dedup();
        names.join("+")
    }

    /// `out[i][col0 + j] = Σₖ x[i][k] · W[j][k]` (see [`qmatmul_nt_to`]).
    #[allow(clippy::too_many_arguments)]
    pub fn nt_to(&self, x: &[f32], m: usize, out: &mut [f32], ldo: usize, col0: usize) {
        let mut r0 = col0;
        let parts: Vec<(&QMatrix, usize)> = self
            .parts
            .iter()
            .map(|p| {
                r0 += p.rows;
                (p, r0 - p.rows)
            })
            .collect();
        nt_parts(x, m, &parts, out, ldo);
    }

    /// `x · Wᵀ` as a new `[m, rows]` buffer.
    pub fn nt(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.rows];
        self.nt_to(x, m, &mut out, self.rows, 0);
        out
    }

    /// `out[i][k] += Σⱼ dy[i][j] · W[j][k]` for `dy: [m, rows]`, `out: [m, cols]`.
    pub fn nn_acc(&self, dy: &[f32], m: usize, out: &mut [f32]) {
        let mut r0 = 0;
        for p in &self.parts {
            qmatmul_nn_acc_cols(dy, self.rows, r0, m, p, out);
            r0 += p.rows;
        }
    }

    /// Row `r` in f32 into `out` (`cols` values): an embedding lookup.
    pub fn row(&self, mut r: usize, out: &mut [f32]) {
        for p in &self.parts {
            if r < p.rows {
                return p.dequantize_rows(r, r + 1, out);
            }
            r -= p.rows;
        }
        panic!("row {r} past the end of a packed weight");
    }

    /// The whole weight in f32, row-major (references, exports and the candle backend's
    /// dense copy: the products never call it).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for p in &self.parts {
            out.extend(p.to_f32());
        }
        out
    }
}

impl QMatrix {
    /// The same weight with its rows reordered: row `i` of the result is row `from[i]`.
    pub fn permute_rows(&self, from: &[usize]) -> Result<QMatrix> {
        let rb = self.row_bytes();
        if from.len() != self.rows || from.iter().any(|&r| r >= self.rows) {
            return Err(Error::Unsupported(format!(
                "a row permutation of {} entries for a weight of {} rows",
                from.len(),
                self.rows
            )));
        }
        let mut data = Vec::with_capacity(self.data.len());
        for &r in from {
            data.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        QMatrix::new(self.kind, self.rows, self.cols, data)
    }

    /// Plain values packed as a [`QKind::BF16`] or [`QKind::F16`] matrix.
    pub fn from_f32(kind: QKind, rows: usize, cols: usize, v: &[f32]) -> Result<QMatrix> {
        if v.len() != rows.saturating_mul(cols) {
            return Err(Error::Unsupported(format!(
                "{} values for a [{rows}, {cols}] weight",
                v.len()
            )));
        }
        let data: Vec<u8> = match kind {
            QKind::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            QKind::F16 => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
            other => {
                return Err(Error::Unsupported(format!(
                    "packing plain values as {}",
                    other.name()
                )))
            }
        };
        QMatrix::new(kind, rows, cols, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|_| (r.next_u64() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }

    /// A random `[rows, cols]` weight quantized by candle, as our matrix and as candle's
    /// own dequantization.
    fn quantized(kind: QKind, rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<f32>) {
        let t = Tensor::from_vec(rand(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, kind.ggml()).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let reference = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (QMatrix::new(kind, rows, cols, bytes).unwrap(), reference)
    }

    #[test]
    fn every_layout_dequantizes_like_candle() {
        for kind in QKind::ALL {
            let (q, reference) = quantized(kind, 7, 512, kind as u64 + 1);
            let ours = q.to_f32();
            let mut portable = vec![0f32; ours.len()];
            for (b, o) in q
                .data
                .chunks_exact(kind.block_bytes())
                .zip(portable.chunks_exact_mut(kind.block_values()))
            {
                dequant_block(kind, b, o);
            }
            for (i, ((a, p), r)) in ours.iter().zip(&portable).zip(&reference).enumerate() {
                // The AVX2 path fuses d·q + m into one rounding; candle rounds twice.
                let tol = 1e-6 * (1.0 + r.abs());
                assert!(
                    (a - r).abs() <= tol && (p - r).abs() <= tol,
                    "{}: value {i}: ours {a}, portable {p}, candle {r}",
                    kind.name()
                );
            }
            // Not all zeros: the comparison meant something.
            assert!(reference.iter().any(|v| v.abs() > 0.1), "{}", kind.name());
        }
    }

    fn matmul_ref(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        out
    }

    /// `base + dy · W` in f64 for `dy: [m, n]`, `W: [n, k]`.
    fn matmul_nn_ref(dy: &[f32], m: usize, w: &[f32], n: usize, k: usize, base: f64) -> Vec<f64> {
        let mut out = vec![base; m * k];
        for i in 0..m {
            for j in 0..n {
                let d = dy[i * n + j] as f64;
                for c in 0..k {
                    out[i * k + c] += d * w[j * k + c] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn products_match_the_dequantized_weight_at_odd_shapes() {
        for kind in QKind::ALL {
            let k = if kind.block_values() == 32 { 96 } else { 512 };
            for &(m, n) in &[
                (1, 1),
                (1, 67),
                (3, 130),
                (13, 40),
                (16, 9),
                (17, 70),
                (300, 33),
            ] {
                let (q, wf) = quantized(kind, n, k, (m * 1000 + n) as u64);
                let x = rand(m * k, 7 + m as u64);
                let want = matmul_ref(&x, m, &wf, n, k);
                let got = qmatmul_nt(&x, m, &q);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt();
                    assert!(
                        (*g as f64 - w).abs() <= tol,
                        "{} x·Wᵀ m={m} n={n} entry {i}: {g} vs {w}",
                        kind.name()
                    );
                }
                // dy · W, accumulated onto what `out` held.
                let dy = rand(m * n, 11 + n as u64);
                let mut got = vec![0.5f32; m * k];
                qmatmul_nn_acc(&dy, m, &q, &mut got);
                let want = matmul_nn_ref(&dy, m, &wf, n, k, 0.5);
                for i in 0..m {
                    for c in 0..k {
                        let w = want[i * k + c];
                        let g = got[i * k + c] as f64;
                        let tol = 1e-5 * (1.0 + w.abs()) * (n as f64).sqrt();
                        assert!(
                            (g - w).abs() <= tol,
                            "{} dy·W m={m} n={n} ({i},{c}): {g} vs {w}",
                            kind.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stacked_parts_write_their_own_columns_of_a_wider_output() {
        // Two layouts stacked along the rows, enough rows for several column blocks per
        // thread, written into columns 3.. of an output 7 columns wider than the weight:
        // the columns around stay as they were, and `dy · W` accumulates onto `out`.
        let k = 64;
        let (q1, w1) = quantized(QKind::Q4_1, 4100, k, 5);
        let (q2, w2) = quantized(QKind::Q8_0, 70, k, 6);
        let p = Packed::new(vec![q1, q2]).unwrap();
        let n = p.rows();
        let wf: Vec<f32> = w1.iter().chain(&w2).copied().collect();
        for m in [1, 5, 17, 40] {
            let x = rand(m * k, 9 + m as u64);
            let want = matmul_ref(&x, m, &wf, n, k);
            let ldo = n + 7;
            let mut out = vec![-3.0f32; m * ldo];
            p.nt_to(&x, m, &mut out, ldo, 3);
            for i in 0..m {
                let row = &out[i * ldo..(i + 1) * ldo];
                assert!(row[..3].iter().chain(&row[3 + n..]).all(|&v| v == -3.0));
                for j in 0..n {
                    let (g, w) = (row[3 + j] as f64, want[i * n + j]);
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * 8.0,
                        "m={m} ({i},{j}): {g} vs {w}"
                    );
                }
            }
            let dy = rand(m * n, 21 + m as u64);
            let mut got = vec![0.25f32; m * k];
            p.nn_acc(&dy, m, &mut got);
            let want = matmul_nn_ref(&dy, m, &wf, n, k, 0.25);
            for i in 0..m {
                for c in 0..k {
                    let w = want[i * k + c];
                    let g = got[i * k + c] as f64;
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * (n as f64).sqrt(),
                        "dy·W m={m} ({i},{c}): {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_are_deterministic_across_calls() {
        let k = 576;
        let (q, _) = quantized(QKind::Q4_1, 3000, k, 41);
        for m in [1, 2, 4, 8, 60] {
            let x = rand(m * k, 5 + m as u64);
            let mut first = vec![0f32; m * 3000];
            qmatmul_nt_to(&x, m, &q, &mut first, 3000, 0);
            for _ in 0..20 {
                let mut again = vec![0f32; m * 3000];
                qmatmul_nt_to(&x, m, &q, &mut again, 3000, 0);
                assert!(first == again, "m={m}: a repeat gave other bits");
            }
        }
    }

    #[test]
    fn sizes_that_disagree_are_refused() {
        assert!(QMatrix::new(QKind::Q4_1, 2, 33, vec![0; 40]).is_err());
        assert!(QMatrix::new(QKind::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(QMatrix::new(QKind::Q4K, usize::MAX, 256, vec![0; 144]).is_err());
        assert!(QMatrix::new(QKind::Q4_1, 2, 32, vec![0; 40]).is_ok());
    }
}
