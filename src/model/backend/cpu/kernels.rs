//! The cpu backend's kernels: a matmul with few rows against a wide frozen weight (a
//! decode step), where candle's GEMM would pack the whole weight for each call; one-token
//! attention over a KV cache; half-split RoPE. The layer that uses them is [`super`].
//!
//! Never used on a GPU: only the cpu backend (a CPU model in f32) calls them. Numerics are
//! checked against candle in this module's tests.

use rayon::prelude::*;

/// Rows up to which inference uses [`matmul_nt`] rather than candle's GEMM: at few rows the
/// GEMM packs the whole weight for each call, while this kernel streams it once. On this
/// machine it is 2-2.5x faster at 1-16 rows and even at 64 (`loraplex bench kernels`).
pub const SMALL_M: usize = 64;

/// Work (multiply-adds) below which a kernel runs on the calling thread: waking the pool
/// costs more than it saves.
pub(crate) const PAR_MIN_WORK: usize = 1 << 17;

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `out[i][j] += alpha · Σₖ x[i][k] · w[j][k]` for `x: [m, k]`, `w: [n, k]`, `out: [m, ldo]`
/// (columns `col0..col0+n` of each output row). Each weight row is read once for all rows
/// of `x`; the column range is split across the thread pool when the work is large.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_acc(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    alpha: f32,
    out: &mut [f32],
    ldo: usize,
    col0: usize,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && col0 + n <= ldo);
    assert!(m == 0 || out.len() >= (m - 1) * ldo + col0 + n);
    if m == 0 || n == 0 {
        return;
    }
    let dst = Out {
        ptr: out.as_mut_ptr(),
        ldo,
        alpha,
    };
    let threads = rayon::current_num_threads();
    if m * n * k < PAR_MIN_WORK || threads == 1 {
        // SAFETY: `out` covers rows 0..m at columns col0..col0+n (asserted above).
        unsafe { dot_block(x, m, k, w, 0, n, dst.at(col0)) };
        return;
    }
    // Column blocks, a few per thread; each writes only its own columns.
    let per = n.div_ceil(threads * 4).next_multiple_of(8).max(8);
    (0..n.div_ceil(per)).into_par_iter().for_each(|b| {
        let j0 = b * per;
        let j1 = (j0 + per).min(n);
        // SAFETY: as above; blocks write disjoint column ranges of the same rows.
        unsafe { dot_block(x, m, k, w, j0, j1, dst.at(col0)) };
    });
}

/// `x · wᵀ` as a new `[m, n]` buffer.
pub fn matmul_nt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    matmul_nt_acc(x, m, k, w, n, 1.0, &mut out, n, 0);
    out
}

/// Where a kernel accumulates: row `i`, column `j` is `ptr[i · ldo + j]`, scaled by `alpha`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ldo: usize,
    alpha: f32,
}

// SAFETY: threads given the same `Out` write disjoint column ranges (see `matmul_nt_acc`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The same output shifted right by `col` columns.
    fn at(self, col: usize) -> Out {
        // SAFETY: callers keep every accessed element inside the original buffer.
        Out {
            ptr: unsafe { self.ptr.add(col) },
            ..self
        }
    }

    /// # Safety
    /// Element (i, j) must lie in the buffer and belong to this thread.
    unsafe fn add(self, i: usize, j: usize, v: f32) {
        let p = self.ptr.add(i * self.ldo + j);
        *p += self.alpha * v;
    }
}

/// Output columns `j0..j1`: `out(i, j) += alpha · Σₖ x[i][k] · w[j][k]`.
///
/// # Safety
/// `out` must cover rows `0..m`, columns `j0..j1`, and no other thread may write them.
unsafe fn dot_block(x: &[f32], m: usize, k: usize, w: &[f32], j0: usize, j1: usize, out: Out) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        avx::dot_block(x, m, k, w, j0, j1, out);
        return;
    }
    for i in 0..m {
        let xi = &x[i * k..(i + 1) * k];
        for j in j0..j1 {
            out.add(i, j, dot_portable(xi, &w[j * k..(j + 1) * k]));
        }
    }
}
/// A dot product with eight independent partial sums (vectorizes without target features).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::Out;
    use std::arch::x86_64::*;

    /// Sum of each of four vectors' lanes: `[Σa0, Σa1, Σa2, Σa3]`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
        let t01 = _mm256_hadd_ps(a[0], a[1]);
        let t23 = _mm256_hadd_ps(a[2], a[3]);
        let t = _mm256_hadd_ps(t01, t23);
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1))
    }

    /// Dot products of `R` (1 or 4) weight rows from `j` with `C` input rows from `i`.
    /// Every (row, column) pair sums in the same order whatever `C`, so a row's result does
    /// not depend on the rows batched with it.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const C: usize, const PF: usize>(
        x: *const f32,
        i: usize,
        k: usize,
        w: *const f32,
        j: usize,
        out: Out,
    ) {
        let k8 = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let mut kk = 0;
        while kk < k8 {
            // The input vectors first, then one weight vector at a time: C + 1 registers
            // beside the R · C accumulators.
            let mut xv = [_mm256_setzero_ps(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add((i + c) * k + kk));
            }
            for r in 0..R {
                let wv = _mm256_loadu_ps(w.add((j + r) * k + kk));
                if PF > 0 {
                    // Weight rows `PF` ahead, while these are in use: the stream from
                    // memory overlaps the arithmetic.
                    _mm_prefetch::<_MM_HINT_T0>(w.add((j + PF + r) * k + kk) as *const i8);
                }
                for c in 0..C {
                    acc[c][r] = _mm256_fmadd_ps(wv, xv[c], acc[c][r]);
                }
            }
            kk += 8;
        }
        for (c, a) in acc.iter().enumerate() {
            let mut sums = [0f32; R];
            if R == 4 {
                _mm_storeu_ps(
                    sums.as_mut_ptr(),
                    hsum4([a[0], a[1 % R], a[2 % R], a[3 % R]]),
                );
            } else {
                let s = hsum4([a[0], a[0], a[0], a[0]]);
                sums[0] = _mm_cvtss_f32(s);
            }
            for (r, s) in sums.iter_mut().enumerate() {
                for t in k8..k {
                    *s += *x.add((i + c) * k + t) * *w.add((j + r) * k + t);
                }
                out.add(i + c, j + r, *s);
            }
        }
    }

    /// Eight weight rows from `j` against input row `i`, reduced to one vector of eight
    /// sums in the same order as [`hsum4`] (so results match [`tile`]'s), then
    /// accumulated into eight adjacent outputs. Few loads per output: the shape for one
    /// input row, or for a short `k` such as a LoRA rank.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile8(x: *const f32, i: usize, k: usize, w: *const f32, j: usize, out: Out) {
        let k8 = k / 8 * 8;
        let mut a = [_mm256_setzero_ps(); 8];
        let mut kk = 0;
        while kk < k8 {
            let xv = _mm256_loadu_ps(x.add(i * k + kk));
            for (r, acc) in a.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(w.add((j + r) * k + kk)), xv, *acc);
            }
            kk += 8;
        }
        let q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(q0, q1),
            _mm256_permute2f128_ps::<0x31>(q0, q1),
        );
        let mut s = [0f32; 8];
        _mm256_storeu_ps(s.as_mut_ptr(), sums);
        for (r, v) in s.iter_mut().enumerate() {
            for t in k8..k {
                *v += *x.add(i * k + t) * *w.add((j + r) * k + t);
            }
            out.add(i, j + r, *v);
        }
    }

    /// One query head `q` (`hd` values, a multiple of 8 up to 128) against keys and values
    /// at column `koff` of rows `kvd` wide: scores into `p` (one per row), softmax, and the
    /// weighted sum of values into `o`, kept in registers across rows.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_head(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kvd: usize,
        koff: usize,
        scale: f32,
        p: &mut [f32],
        o: &mut [f32],
    ) {
        let hd = q.len();
        let len = p.len();
        assert!(hd % 8 == 0 && hd <= 128 && o.len() == hd && koff + hd <= kvd);
        assert!(keys.len() >= len * kvd && values.len() >= len * kvd);
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = dot8(q, &keys[j * kvd + koff..j * kvd + koff + hd]) * scale;
            max = max.max(*pj);
        }
        let mut sum = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        let inv = 1.0 / sum;
        let mut acc = [_mm256_setzero_ps(); 16];
        let n8 = hd / 8;
        let vp = values.as_ptr();
        for (j, pj) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pj * inv);
            let row = vp.add(j * kvd + koff);
            for (c, a) in acc.iter_mut().take(n8).enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * c)), *a);
            }
        }
        for (c, a) in acc.iter().take(n8).enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * c), *a);
        }
    }

    /// `Σ a[i] · b[i]` for equal lengths that are a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn dot8(a: &[f32], b: &[f32]) -> f32 {
        assert!(a.len() == b.len() && a.len() % 8 == 0);
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i < a.len() {
            let s = &mut acc[(i / 8) & 1];
            *s = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i)), _mm256_loadu_ps(bp.add(i)), *s);
            i += 8;
        }
        let s = _mm256_add_ps(acc[0], acc[1]);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        _mm_cvtss_f32(h)
    }

    /// # Safety
    /// AVX2 and FMA must be available; `x: [m, k]`, `w: [≥ j1, k]`; `out` as for
    /// [`super::dot_block`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_block(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        j0: usize,
        j1: usize,
        out: Out,
    ) {
        assert!(x.len() >= m * k && w.len() >= j1 * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut j = j0;
        if m < 3 || k < 32 {
            while j + 8 <= j1 {
                for i in 0..m {
                    tile8(xp, i, k, wp, j, out);
                }
                j += 8;
            }
        }
        while j + 4 <= j1 {
            // Four weight rows by three input rows: twelve accumulators, three input
            // vectors and one weight vector fill the sixteen registers. Every tile
            // prefetches the rows two blocks ahead, where they exist, so the memory stream
            // runs during all of a block's tiles, not just the first.
            let pf = j + 12 <= j1;
            let mut i = 0;
            while i + 3 <= m {
                if pf {
                    tile::<4, 3, 8>(xp, i, k, wp, j, out);
                } else {
                    tile::<4, 3, 0>(xp, i, k, wp, j, out);
                }
                i += 3;
            }
            match (m - i, pf) {
                (2, true) => tile::<4, 2, 8>(xp, i, k, wp, j, out),
                (2, false) => tile::<4, 2, 0>(xp, i, k, wp, j, out),
                (1, true) => tile::<4, 1, 8>(xp, i, k, wp, j, out),
                (1, false) => tile::<4, 1, 0>(xp, i, k, wp, j, out),
                _ => {}
            }
            j += 4;
        }
        while j < j1 {
            for i in 0..m {
                tile::<1, 1, 0>(xp, i, k, wp, j, out);
            }
            j += 1;
        }
    }
}

/// Half-split RoPE (Hugging Face Llama) of one head vector in place, at one position.
/// `cos`, `sin`: that position's `[head_dim / 2]` rows.
pub fn rope_in_place(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = v.len() / 2;
    let (a, b) = v.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

/// Geometry of single-token attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One new token's attention over a host cache. `q: [heads · head_dim]` (RoPE applied),
/// `keys`, `values`: `[len, kv_heads · head_dim]` including this token. Writes
/// `o: [heads · head_dim]`.
#[cfg_attr(not(test), allow(dead_code))]
pub fn attend_one(s: AttnShape, q: &[f32], keys: &[f32], values: &[f32], o: &mut [f32]) {
    let hd = s.head_dim;
    for (h, oh) in o[..s.heads * hd].chunks_exact_mut(hd).enumerate() {
        attend_head(s, h, &q[h * hd..(h + 1) * hd], keys, values, oh);
    }
}

/// [`attend_one`] for query head `h` alone (`q`, `o`: that head's `head_dim` values), so
/// that one decoding row's heads can run in parallel.
pub fn attend_head(s: AttnShape, h: usize, q: &[f32], keys: &[f32], values: &[f32], o: &mut [f32]) {
    let hd = s.head_dim;
    let kvd = s.kv_heads * hd;
    let len = keys.len() / kvd;
    let kh = h / (s.heads / s.kv_heads);
    let mut p = vec![0f32; len];
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && hd % 8 == 0 && hd <= 128 && q.len() == hd && o.len() == hd {
        // SAFETY: AVX2 and FMA were detected; `q` and `o` hold `hd` values, and every
        // key and value row `j < len` holds `kvd ≥ (kh + 1) · hd` values.
        unsafe { avx::attend_head(q, keys, values, kvd, kh * hd, s.scale, &mut p, o) };
        return;
    }
    let mut max = f32::NEG_INFINITY;
    for (j, pj) in p.iter_mut().enumerate() {
        let kj = &keys[j * kvd + kh * hd..j * kvd + (kh + 1) * hd];
        *pj = dot(q, kj) * s.scale;
        max = max.max(*pj);
    }
    let mut sum = 0f32;
    for pj in p.iter_mut() {
        *pj = (*pj - max).exp();
        sum += *pj;
    }
    o.fill(0.0);
    for (j, pj) in p.iter().enumerate() {
        let w = pj / sum;
        let vj = &values[j * kvd + kh * hd..j * kvd + (kh + 1) * hd];
        for (od, vd) in o.iter_mut().zip(vj) {
            *od += w * vd;
        }
    }
}

/// `Σ a[i] · b[i]`, with AVX2 and FMA when present and the length is a multiple of 8.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && a.len() % 8 == 0 && a.len() == b.len() {
        // SAFETY: AVX2 and FMA were detected; both slices hold `a.len()` values.
        return unsafe { avx::dot8(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use crate::util::SplitMix64;
    use candle_core::{Device, Tensor};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|_| (r.next_u64() % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn matmul_matches_candle_at_every_shape() -> Result<()> {
        // Odd sizes exercise every tile and the k remainder; a big n takes the parallel path.
        for &(m, k, n) in &[
            (1, 5, 3),
            (3, 17, 9),
            (2, 64, 4),
            (7, 576, 960),
            (24, 131, 3001),
        ] {
            let x = rand(m * k, 1);
            let w = rand(n * k, 2);
            let got = matmul_nt(&x, m, k, &w, n);
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu)?;
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)?;
            let want = xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4 * (k as f32).sqrt(), "({m},{k},{n}): {err}");
        }
        Ok(())
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (k, n) = (100, 37);
        let x = rand(5 * k, 3);
        let w = rand(n * k, 4);
        let all = matmul_nt(&x, 5, k, &w, n);
        for i in 0..5 {
            let one = matmul_nt(&x[i * k..(i + 1) * k], 1, k, &w, n);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn accumulate_scales_into_a_column_range() {
        let (m, k, n, ldo) = (3, 10, 4, 9);
        let x = rand(m * k, 5);
        let w = rand(n * k, 6);
        let plain = matmul_nt(&x, m, k, &w, n);
        let mut out = vec![1f32; m * ldo];
        matmul_nt_acc(&x, m, k, &w, n, 0.5, &mut out, ldo, 2);
        for i in 0..m {
            for j in 0..ldo {
                let want = if (2..6).contains(&j) {
                    1.0 + 0.5 * plain[i * n + j - 2]
                } else {
                    1.0
                };
                assert!((out[i * ldo + j] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn attention_matches_a_softmax_written_out() {
        // Two kv heads shared by four query heads, three cached tokens.
        let s = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            scale: 0.5,
        };
        let q = rand(16, 7);
        let keys = rand(3 * 8, 8);
        let values = rand(3 * 8, 9);
        let mut o = vec![0f32; 16];
        attend_one(s, &q, &keys, &values, &mut o);
        for h in 0..4 {
            let kh = h / 2;
            let sc: Vec<f32> = (0..3)
                .map(|j| {
                    (0..4)
                        .map(|d| q[h * 4 + d] * keys[j * 8 + kh * 4 + d])
                        .sum::<f32>()
                        * 0.5
                })
                .collect();
            let z: f32 = sc.iter().map(|v| v.exp()).sum();
            for d in 0..4 {
                let want: f32 = (0..3)
                    .map(|j| sc[j].exp() / z * values[j * 8 + kh * 4 + d])
                    .sum();
                assert!((o[h * 4 + d] - want).abs() < 1e-5, "head {h} dim {d}");
            }
        }
    }
}
