//! Hand-written CPU kernels over f32 slices, for the steps where candle's generic ops cost more
//! than the arithmetic: dot products, GELU, attention for a few queries. Each is compiled twice,
//! for AVX2+FMA (picked at run time) and for the baseline target; the loops are written in
//! independent lanes so that the compiler vectorizes both.

use std::mem::MaybeUninit;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A weight element the dot products widen to f32 as they load it.
pub(crate) trait Widen: Copy {
    fn widen(self) -> f32;

    /// Eight elements from `src`, widened; for kernels compiled with AVX2 (and F16C).
    ///
    /// # Safety
    /// Eight elements must be readable at `src`, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen8(src: *const Self) -> __m256;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(src: *const Self) -> __m256 {
        _mm256_loadu_ps(src)
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(src: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(src.cast()))
    }
}

impl Widen for half::bf16 {
    /// bf16 is the top half of an f32: a shift the compiler vectorizes.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(src: *const Self) -> __m256 {
        let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(src.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
    }
}

/// The fastest dot product of f32 values with `W` values this CPU runs.
pub(crate) fn dot_kernel<W: Widen>() -> fn(&[f32], &[W]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features dot_avx2 is compiled for are present.
        return |x, w| unsafe { dot_avx2(x, w) };
    }
    dot_lanes::<W>
}

/// AVX2 and FMA, and F16C for the f16 loads (every CPU with the former two has it).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// x·w with four AVX registers of independent sums: the compiler's own vectorization of
/// [`dot_lanes`] used 2-wide registers, a quarter of the width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    let len = x.len().min(w.len());
    let (xs, ws) = (x.as_ptr(), w.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= len {
        for (lane, sum) in acc.iter_mut().enumerate() {
            let at = i + 8 * lane;
            *sum = _mm256_fmadd_ps(_mm256_loadu_ps(xs.add(at)), W::widen8(ws.add(at)), *sum);
        }
        i += 32;
    }
    while i + 8 <= len {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xs.add(i)), W::widen8(ws.add(i)), acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    horizontal_sum(sum) + x[i..len].iter().zip(&w[i..len]).map(|(a, b)| a * b.widen()).sum::<f32>()
}

/// The sum of a register's eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
}

/// `outs[j·m + i] += xs[i]·w[j]` for the m input rows `xs` [m, k] and each weight row `w[j]`
/// of `w` [rows, k]: the product of a few rows (batched decoding) with a block of weights,
/// which are read once, straight from where they are stored (no packed copy), widened in
/// registers. `outs` is [rows, m].
pub(crate) fn rows_times_weights<W: Widen>(xs: &[f32], m: usize, k: usize, w: &[W], outs: &mut [f32]) {
    if k == 0 {
        return; // an empty sum: outs keep what they hold
    }
    assert!(xs.len() == m * k && w.len().is_multiple_of(k) && outs.len() == w.len() / k * m);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features are present; the sizes were checked above.
        return unsafe { rows_times_weights_avx2(xs, m, k, w, outs) };
    }
    let dot = dot_kernel::<W>();
    for (weights, outs) in w.chunks_exact(k).zip(outs.chunks_exact_mut(m)) {
        for (x, out) in xs.chunks_exact(k).zip(outs) {
            *out += dot(x, weights);
        }
    }
}

/// Tiles of 4 input rows × 3 weight rows: 12 independent sums (enough to keep both FMA units
/// busy), 7 loads per 12 FMAs, all 16 registers in use.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_times_weights_avx2<W: Widen>(xs: &[f32], m: usize, k: usize, w: &[W], outs: &mut [f32]) {
    let rows = w.len() / k;
    let (x, w, outs) = (xs.as_ptr(), w.as_ptr(), outs.as_mut_ptr());
    let mut j = 0;
    while j < rows {
        let mut i = 0;
        let cols = (rows - j).min(3);
        while i < m {
            let tile = (m - i).min(4);
            match (tile, cols) {
                (4, 3) => rows_tile::<W, 4, 3>(x, w, outs, (m, k), (i, j)),
                (3, 3) => rows_tile::<W, 3, 3>(x, w, outs, (m, k), (i, j)),
                (2, 3) => rows_tile::<W, 2, 3>(x, w, outs, (m, k), (i, j)),
                (1, 3) => rows_tile::<W, 1, 3>(x, w, outs, (m, k), (i, j)),
                (4, 2) => rows_tile::<W, 4, 2>(x, w, outs, (m, k), (i, j)),
                (3, 2) => rows_tile::<W, 3, 2>(x, w, outs, (m, k), (i, j)),
                (2, 2) => rows_tile::<W, 2, 2>(x, w, outs, (m, k), (i, j)),
                (1, 2) => rows_tile::<W, 1, 2>(x, w, outs, (m, k), (i, j)),
                (4, _) => rows_tile::<W, 4, 1>(x, w, outs, (m, k), (i, j)),
                (3, _) => rows_tile::<W, 3, 1>(x, w, outs, (m, k), (i, j)),
                (2, _) => rows_tile::<W, 2, 1>(x, w, outs, (m, k), (i, j)),
                _ => rows_tile::<W, 1, 1>(x, w, outs, (m, k), (i, j)),
            }
            i += tile;
        }
        j += cols;
    }
}

/// One tile of [`rows_times_weights_avx2`]: input rows i..i+R against weight rows j..j+C.
///
/// # Safety
/// Within the sizes of `rows_times_weights`, on a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_tile<W: Widen, const R: usize, const C: usize>(
    x: *const f32,
    w: *const W,
    outs: *mut f32,
    (m, k): (usize, usize),
    (i, j): (usize, usize),
) {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut l = 0;
    while l + 8 <= k {
        let mut weights = [_mm256_setzero_ps(); C];
        for (c, weight) in weights.iter_mut().enumerate() {
            *weight = W::widen8(w.add((j + c) * k + l));
            if i == 0 {
                // The next tile's weight rows, a whole tile ahead of their use: the hardware
                // prefetcher alone left the loads waiting on memory half the time. (A hint only:
                // the address may lie past the block, where it does nothing.)
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + C + c) * k + l).cast());
            }
        }
        for (r, sums) in acc.iter_mut().enumerate() {
            let input = _mm256_loadu_ps(x.add((i + r) * k + l));
            for (sum, &weight) in sums.iter_mut().zip(&weights) {
                *sum = _mm256_fmadd_ps(input, weight, *sum);
            }
        }
        l += 8;
    }
    for (r, sums) in acc.iter().enumerate() {
        for (c, &sum) in sums.iter().enumerate() {
            let tail: f32 = (l..k).map(|l| *x.add((i + r) * k + l) * (*w.add((j + c) * k + l)).widen()).sum();
            *outs.add((j + c) * m + i + r) += horizontal_sum(sum) + tail;
        }
    }
}

/// The portable x·w: 32 independent lanes, which the compiler vectorizes for the baseline target, summed
/// pairwise at the end (attention's 64-long dots make the final sum a large share).
#[inline(always)]
fn dot_lanes<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (x_chunks, w_chunks) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let tail: f32 = x_chunks.remainder().iter().zip(w_chunks.remainder()).map(|(a, b)| a * b.widen()).sum();
    for (a, b) in x_chunks.zip(w_chunks) {
        for lane in 0..LANES {
            let b = b[lane].widen();
            acc[lane] += a[lane] * b;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            acc[lane] += acc[lane + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// Widens bf16 values to f32 (`dst` as long as `src`).
pub(crate) fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features widen_bf16_avx2 is compiled for are present.
        return unsafe { widen_bf16_avx2(src, dst) };
    }
    widen_lanes(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_bf16_avx2(src: &[half::bf16], dst: &mut [f32]) {
    widen_lanes(src, dst)
}

#[inline(always)]
fn widen_lanes<W: Widen>(src: &[W], dst: &mut [f32]) {
    dst.iter_mut().zip(src).for_each(|(f, w)| *f = w.widen());
}

/// The exact GELU, `x·½·(1 + erf(x/√2))`, as PyTorch's vectorized CPU kernel computes it: erf by
/// Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7, PyTorch's own choice), exp by a Cephes
/// polynomial. In place, on all threads.
pub(crate) fn gelu(data: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features gelu_avx2 is compiled for are present.
        data.par_chunks_mut(CHUNK).for_each(|chunk| unsafe { gelu_avx2(chunk) });
        return;
    }
    data.par_chunks_mut(CHUNK).for_each(gelu_lanes);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(data: &mut [f32]) {
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        _mm256_storeu_ps(chunk.as_mut_ptr(), gelu8(_mm256_loadu_ps(chunk.as_ptr())));
    }
    gelu_lanes(chunks.into_remainder())
}

/// [`gelu_lanes`]' formula on eight lanes, with fused multiply-adds (the compiler, bound to
/// Rust's separate rounding of `a * b + c`, cannot fuse them itself).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu8(x: __m256) -> __m256 {
    let set = _mm256_set1_ps;
    let z = _mm256_mul_ps(x, set(std::f32::consts::FRAC_1_SQRT_2));
    let sign = _mm256_and_ps(z, set(-0.0));
    let a = _mm256_andnot_ps(set(-0.0), z);
    let t = _mm256_div_ps(set(1.0), _mm256_fmadd_ps(set(0.327_591_1), a, set(1.0)));
    let mut r = _mm256_fmadd_ps(set(1.061_405_4), t, set(-1.453_152));
    r = _mm256_fmadd_ps(r, t, set(1.421_413_8));
    r = _mm256_fmadd_ps(r, t, set(-0.284_496_74));
    r = _mm256_fmadd_ps(r, t, set(0.254_829_6));
    let e = exp8(_mm256_mul_ps(_mm256_xor_ps(a, set(-0.0)), a));
    let erf = _mm256_or_ps(_mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, set(1.0)), sign);
    let half_x = _mm256_mul_ps(x, set(0.5));
    _mm256_fmadd_ps(half_x, erf, half_x)
}

#[inline(always)]
fn gelu_lanes(data: &mut [f32]) {
    for x in data.iter_mut() {
        *x = *x * 0.5 * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// LayerNorm of each row of `xs` (rows of `weight.len()` values) into a new buffer, on all
/// threads: (x − mean)/√(var + eps)·weight + bias, the variance from the centred values (two
/// passes over a row, which stays in L1), as PyTorch computes it up to f32 rounding.
pub(crate) fn layer_norm(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    assert!(bias.len() == dim && dim > 0 && xs.len().is_multiple_of(dim));
    let rows_per_task = (1 << 14) / dim + 1;
    // Each value written once, into fresh memory (no zeroing pass first).
    let mut out = Vec::with_capacity(xs.len());
    out.spare_capacity_mut()[..xs.len()]
        .par_chunks_mut(rows_per_task * dim)
        .zip(xs.par_chunks(rows_per_task * dim))
        .for_each(|(out, xs)| {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the features layer_norm_avx2 is compiled for are present.
                return unsafe { layer_norm_avx2(xs, weight, bias, eps, out) };
            }
            layer_norm_rows(xs, weight, bias, eps, out)
        });
    // SAFETY: every element was written above (the chunks cover xs.len() values).
    unsafe { out.set_len(xs.len()) };
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_avx2(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    layer_norm_rows(xs, weight, bias, eps, out)
}

/// [`layer_norm`] of some rows.
#[inline(always)]
fn layer_norm_rows(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let dim = weight.len();
    for (row, out) in xs.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = lane_sum(row, |x| x) / dim as f32;
        let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / dim as f32;
        let inverse = 1.0 / (variance + eps).sqrt();
        for (((y, &x), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
            y.write((x - mean) * inverse * w + b);
        }
    }
}

/// Σ f(x) over `row` in 8 independent lanes, which the compiler vectorizes.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut sums = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for lane in 0..LANES {
            sums[lane] += f(chunk[lane]);
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// Softmax of `scale`·x over each row of `row_len` values, in place, on all threads.
pub(crate) fn softmax(data: &mut [f32], row_len: usize, scale: f32) {
    let chunk = ((1 << 14) / row_len.max(1) + 1) * row_len;
    data.par_chunks_mut(chunk).for_each(|rows| softmax_rows(rows, row_len, scale));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32], scale: f32) {
    // the max of the scaled values, as softmax_row takes it (whatever the scale's sign)
    let (mut maxes, scale8) = (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(scale));
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        maxes = _mm256_max_ps(maxes, _mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), scale8));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), maxes);
    let tail = chunks.remainder().iter().map(|&x| x * scale);
    let max = tail.chain(lanes).fold(f32::NEG_INFINITY, f32::max);
    let inverse = 1.0 / exp_and_sum_avx2(row, scale, max);
    row.iter_mut().for_each(|x| *x *= inverse);
}

/// x ← exp(x − `max`) over the row, in place; returns the sum.
fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features exp_shifted_avx2 is compiled for are present.
        return unsafe { exp_shifted_avx2(row, max) };
    }
    exp_and_sum(row, 1.0, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) -> f32 {
    exp_and_sum_avx2(row, 1.0, max)
}

/// [`exp_and_sum`] through [`exp8`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_and_sum_avx2(row: &mut [f32], scale: f32, max: f32) -> f32 {
    let (scale8, max8) = (_mm256_set1_ps(scale), _mm256_set1_ps(max));
    let mut sums = [_mm256_setzero_ps(); 2];
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (half, sum) in sums.iter_mut().enumerate() {
            let at = chunk.as_mut_ptr().add(8 * half);
            let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(at), scale8, max8));
            _mm256_storeu_ps(at, e);
            *sum = _mm256_add_ps(*sum, e);
        }
    }
    horizontal_sum(_mm256_add_ps(sums[0], sums[1])) + exp_and_sum(chunks.into_remainder(), scale, max)
}

/// The max and the sum run in 8 independent lanes, as PyTorch's vectorized softmax does (a
/// single running sum would be a chain of dependent additions the compiler cannot vectorize).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    const LANES: usize = 8;
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail_max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    for chunk in chunks {
        for lane in 0..LANES {
            maxes[lane] = maxes[lane].max(chunk[lane] * scale);
        }
    }
    let max = maxes.iter().fold(tail_max, |m, &x| m.max(x));
    let sum = exp_and_sum(row, scale, max);
    // one division per row, as PyTorch's vectorized softmax does
    let inverse = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inverse);
}

/// x ← exp(`scale`·x − `max`) over the row, in place; returns the sum, in 8 lanes.
#[inline(always)]
fn exp_and_sum(row: &mut [f32], scale: f32, max: f32) -> f32 {
    const LANES: usize = 8;
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            chunk[lane] = exp(chunk[lane] * scale - max);
            sums[lane] += chunk[lane];
        }
    }
    let mut tail_sum = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x * scale - max);
        tail_sum += *x;
    }
    sums.iter().sum::<f32>() + tail_sum
}

/// A matrix operand for [`matmul`]: where element (0, 0) is and the steps between rows and
/// between columns, in elements.
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row: isize,
    pub col: isize,
}

/// `dst = a·b`, or `dst += a·b` when `accumulate`, for a [m, k], b [k, n] and dst [m, n] with
/// any strides, on this thread or over `parallelism`'s threads. With the `openblas` feature
/// OpenBLAS's sgemm computes it wherever the strides fit BLAS's layouts (all of this project's
/// calls), otherwise the `gemm` crate.
///
/// # Safety
/// Every element the three views address must lie within its buffer, and dst must not overlap
/// a or b.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    parallelism: gemm::Parallelism,
) {
    #[cfg(feature = "openblas")]
    if let Some(call) = blas::SgemmCall::new((m, n, k), &dst, &a, &b) {
        return call.run(dst.ptr, accumulate, a.ptr, b.ptr, parallelism);
    }
    let alpha = if accumulate { 1.0 } else { 0.0 };
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.col,
        dst.row,
        accumulate,
        a.ptr,
        a.col,
        a.row,
        b.ptr,
        b.col,
        b.row,
        alpha,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// OpenBLAS's sgemm, always single-threaded in the calling thread: the parallel split is this
/// project's (rayon's pool), so OpenBLAS's own threads never spin against rayon's.
#[cfg(feature = "openblas")]
mod blas {
    use std::os::raw::c_int;
    use std::sync::Once;

    use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE};
    use rayon::prelude::*;

    use super::Strided;

    extern "C" {
        fn openblas_set_num_threads(threads: c_int);
    }

    /// Fewest rows or columns of dst per thread worth a split.
    const MIN_PART: usize = 64;

    /// A product whose views BLAS can address: the layout dst is in, and how a and b are read.
    pub(super) struct SgemmCall {
        dims: (usize, usize, usize),
        layout: CBLAS_LAYOUT,
        ld_dst: usize,
        a: (CBLAS_TRANSPOSE, usize),
        b: (CBLAS_TRANSPOSE, usize),
        /// Elements between rows of dst and of a, to split the rows among threads.
        row_steps: (isize, isize),
        /// Elements between columns of dst and of b, to split the columns among threads.
        col_steps: (isize, isize),
    }

    impl SgemmCall {
        pub(super) fn new(
            (m, n, k): (usize, usize, usize),
            dst: &Strided<*mut f32>,
            a: &Strided<*const f32>,
            b: &Strided<*const f32>,
        ) -> Option<Self> {
            // BLAS takes sizes and strides as C ints.
            let fits = |x: usize| x > 0 && x <= c_int::MAX as usize;
            let strides = [dst.row, dst.col, a.row, a.col, b.row, b.col];
            if ![m, n, k].into_iter().all(fits) || !strides.into_iter().all(|x| fits(x.unsigned_abs())) {
                return None;
            }
            // In BLAS terms a view is (lead, unit): the step between its rows (row-major) or
            // columns (column-major), which must be at least their length, and 1.
            let (layout, ld_dst) = if dst.col == 1 && dst.row >= n as isize {
                (CBLAS_LAYOUT::CblasRowMajor, dst.row)
            } else if dst.row == 1 && dst.col >= m as isize {
                (CBLAS_LAYOUT::CblasColMajor, dst.col)
            } else {
                return None;
            };
            let operand = |view_row: isize, view_col: isize, rows: usize, cols: usize| {
                let (lead, unit, natural, transposed) = match layout {
                    CBLAS_LAYOUT::CblasRowMajor => (view_row, view_col, cols, rows),
                    CBLAS_LAYOUT::CblasColMajor => (view_col, view_row, rows, cols),
                };
                if unit == 1 && lead >= natural as isize {
                    Some((CBLAS_TRANSPOSE::CblasNoTrans, lead as usize))
                } else if lead == 1 && unit >= transposed as isize {
                    Some((CBLAS_TRANSPOSE::CblasTrans, unit as usize))
                } else {
                    None
                }
            };
            Some(Self {
                dims: (m, n, k),
                layout,
                ld_dst: ld_dst as usize,
                a: operand(a.row, a.col, m, k)?,
                b: operand(b.row, b.col, k, n)?,
                row_steps: (dst.row, a.row),
                col_steps: (dst.col, b.col),
            })
        }

        /// # Safety
        /// As [`super::matmul`]'s.
        pub(super) unsafe fn run(
            &self,
            dst: *mut f32,
            accumulate: bool,
            a: *const f32,
            b: *const f32,
            parallelism: gemm::Parallelism,
        ) {
            static SINGLE_THREADED: Once = Once::new();
            // SAFETY: sets a global of OpenBLAS's, before its first product.
            SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
            let (m, n, _) = self.dims;
            // Each thread packs its share of the split operand and all of the other: split the
            // larger of dst's rows (a) and columns (b).
            let split_rows = m >= n;
            let along = if split_rows { m } else { n };
            let threads = match parallelism {
                gemm::Parallelism::Rayon(threads) => threads.clamp(1, along.div_ceil(MIN_PART)),
                _ => 1,
            };
            if threads == 1 {
                return self.sgemm((m, n), dst, accumulate, a, b);
            }
            let per_part = along.div_ceil(threads);
            // Pointers cross threads as addresses; each part writes its own block of dst.
            let (dst, a, b) = (dst as usize, a as usize, b as usize);
            (0..threads).into_par_iter().for_each(|part| {
                let first = (part * per_part) as isize;
                let len = per_part.min(along - part * per_part);
                // SAFETY: rows (or columns) first..first + len of dst and a (or b), within the
                // caller's views.
                unsafe {
                    let (dst, a, b) = (dst as *mut f32, a as *const f32, b as *const f32);
                    if split_rows {
                        let dst = dst.offset(first * self.row_steps.0);
                        self.sgemm((len, n), dst, accumulate, a.offset(first * self.row_steps.1), b)
                    } else {
                        let dst = dst.offset(first * self.col_steps.0);
                        self.sgemm((m, len), dst, accumulate, a, b.offset(first * self.col_steps.1))
                    }
                }
            });
        }

        unsafe fn sgemm(&self, (m, n): (usize, usize), dst: *mut f32, accumulate: bool, a: *const f32, b: *const f32) {
            let k = self.dims.2;
            let beta = if accumulate { 1.0 } else { 0.0 };
            cblas_sys::cblas_sgemm(
                self.layout,
                self.a.0,
                self.b.0,
                m as c_int,
                n as c_int,
                k as c_int,
                1.0,
                a,
                self.a.1 as c_int,
                b,
                self.b.1 as c_int,
                beta,
                dst,
                self.ld_dst as c_int,
            );
        }
    }
}

/// Softmax of `scale`·x over each row of `row_len` values, in place, on this thread.
fn softmax_rows(data: &mut [f32], row_len: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features softmax_avx2 is compiled for are present.
        return data.chunks_mut(row_len).for_each(|row| unsafe { softmax_avx2(row, scale) });
    }
    data.chunks_mut(row_len).for_each(|row| softmax_row(row, scale));
}

/// Self-attention straight from a fused projection's output `qkv` [batch, tokens, 3, heads,
/// head_dim] (the vision tower's layout) to the context with heads merged [batch, tokens,
/// heads·head_dim], one task per image and head. With AVX2 (and head_dim a multiple of 16)
/// each head runs by blocks of queries in register tiles ([`attend_head_blocked`]), ~10–15%
/// faster than sgemm on these k = 64 products and [tokens, tokens] scores; otherwise as sgemm,
/// softmax, sgemm ([`attend_head`]).
pub(crate) fn attend_packed(
    qkv: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let (n, d, width) = (tokens, head_dim, heads * head_dim);
    let mut out = vec![0f32; batch * n * width];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let base = b * n * 3 * width + h * d;
        let (q, k, v) = (&qkv[base..], &qkv[base + width..], &qkv[base + 2 * width..]);
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: q, k and v are read within qkv (the last row of v ends at its last element);
            // each task writes only its own head's columns of its own image's rows of out, which
            // no other task touches. Nothing here re-enters rayon, so no other task runs on this
            // thread while it holds its scratch buffer.
            unsafe {
                let out = out_ptr.at(b * n * width + h * d);
                #[cfg(target_arch = "x86_64")]
                if has_avx2_fma() && d % QUERY_BLOCK == 0 {
                    return attend_head_blocked(q, k, v, (n, d, 3 * width), scale, scratch, (out, width));
                }
                attend_head(q, k, v, (n, d, 3 * width), scale, scratch, (out, width))
            }
        })
    });
    out
}

/// Queries per block of [`attend_head_blocked`]: two registers wide.
const QUERY_BLOCK: usize = 16;

/// One head of [`attend_packed`] by blocks of 16 queries: `q`, `k`, `v` [n, d] with rows `row`
/// apart (d a multiple of 16), the context written to `out` [n, d] with rows `out_row` apart.
/// The block's scores are kept transposed, [n, 16] (37 KB at 577 tokens): q·kᵀ
/// writes them in register tiles of 6 keys × 16 queries, softmax's exponentials run down the
/// columns in whole registers, the mixing of v reads each key's 16 weights in order, and each
/// mixed row is then divided by its sum. The
/// operands are contiguous copies: k by groups of 6 keys [d, 6], the block's qᵀ [d, 16], v
/// in panels [n, 16] of 16 columns.
///
/// # Safety
/// Every element addressed must lie within its buffer, `out` must not overlap the others, and
/// the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_head_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (n, d, row): (usize, usize, usize),
    scale: f32,
    scratch: &mut Vec<f32>,
    (out, out_row): (*mut f32, usize),
) {
    const B: usize = QUERY_BLOCK;
    const { assert!(B == 16, "exp_columns16 takes blocks of 16 queries") };
    // Every element of the scratch is written before it is read.
    scratch.resize(2 * n * d + d * B + n * B, 0.0);
    let (key_groups, rest) = scratch.split_at_mut(n * d);
    let (value_panels, rest) = rest.split_at_mut(n * d);
    let (queries_t, scores_t) = rest.split_at_mut(d * B);
    for (j, (key, value)) in k.chunks(row).zip(v.chunks(row)).take(n).enumerate() {
        let (group, size) = (j / 6 * 6, (n - j / 6 * 6).min(6));
        for (c, &x) in key[..d].iter().enumerate() {
            key_groups[group * d + c * size + j - group] = x;
        }
        for (c, columns) in value[..d].chunks_exact(B).enumerate() {
            value_panels[(c * n + j) * B..][..B].copy_from_slice(columns);
        }
    }
    for first in (0..n).step_by(B) {
        let rows = (n - first).min(B);
        // Scaled here rather than in the scores: exact when the scale is a power of two (1/8
        // at head_dim 64), and one multiply per query element instead of per score.
        if rows < B {
            queries_t.fill(0.0);
        }
        for r in 0..rows {
            for (c, &x) in q[(first + r) * row..][..d].iter().enumerate() {
                queries_t[c * B + r] = x * scale;
            }
        }
        for group in (0..n).step_by(6) {
            let size = (n - group).min(6);
            let tile = CombineTile {
                coef: key_groups.as_ptr().add(group * d),
                coef_step: size,
                len: d,
                w: queries_t.as_ptr(),
                w_row: B,
                out: scores_t.as_mut_ptr().add(group * B),
                out_row: B,
                accumulate: false,
            };
            tile.run_rows(size);
        }
        let inverses = exp_columns16(scores_t);
        for group in (0..rows).step_by(6) {
            for (c, panel) in value_panels.chunks_exact(n * B).enumerate() {
                let tile = CombineTile {
                    coef: scores_t.as_ptr().add(group),
                    coef_step: B,
                    len: n,
                    w: panel.as_ptr(),
                    w_row: B,
                    out: out.add((first + group) * out_row + c * B),
                    out_row,
                    accumulate: false,
                };
                tile.run_rows((rows - group).min(6));
            }
        }
        for (r, &inverse) in inverses[..rows].iter().enumerate() {
            let mixed = std::slice::from_raw_parts_mut(out.add((first + r) * out_row), d);
            mixed.iter_mut().for_each(|x| *x *= inverse);
        }
    }
}

/// The exponentials of softmax down each of the 16 columns of `data` [rows, 16], in place:
/// exp(x − the column's max), two registers a row. Returns each column's 1 / sum, which the
/// caller applies to the 16 mixed rows instead of to every probability.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_columns16(data: &mut [f32]) -> [f32; 16] {
    let mut maxes = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
    for row in data.chunks_exact(16) {
        for (half, max) in maxes.iter_mut().enumerate() {
            *max = _mm256_max_ps(*max, _mm256_loadu_ps(row.as_ptr().add(8 * half)));
        }
    }
    let mut sums = [_mm256_setzero_ps(); 2];
    for row in data.chunks_exact_mut(16) {
        for (half, (sum, &max)) in sums.iter_mut().zip(&maxes).enumerate() {
            let at = row.as_mut_ptr().add(8 * half);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(at), max));
            _mm256_storeu_ps(at, e);
            *sum = _mm256_add_ps(*sum, e);
        }
    }
    let mut inverses = [0f32; 16];
    for (half, &sum) in sums.iter().enumerate() {
        _mm256_storeu_ps(inverses.as_mut_ptr().add(8 * half), _mm256_div_ps(_mm256_set1_ps(1.0), sum));
    }
    inverses
}

/// One head of [`attend_packed`] with sgemm: [n, n] scores, softmax, mixing of v. Arguments as
/// [`attend_head_blocked`]'s.
///
/// # Safety
/// As [`attend_head_blocked`]'s.
unsafe fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (n, d, row): (usize, usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
    (out, out_row): (*mut f32, usize),
) {
    // The thread's [n, n] buffer is reused from task to task and layer to layer: no 1.3 MB
    // allocation and zeroing per head, and it stays in cache.
    scores.resize(n * n, 0.0);
    let row = row as isize;
    let none = gemm::Parallelism::None;
    let key_t = Strided { ptr: k.as_ptr(), row: 1, col: row };
    let query = Strided { ptr: q.as_ptr(), row, col: 1 };
    matmul((n, n, d), Strided { ptr: scores.as_mut_ptr(), row: n as isize, col: 1 }, false, query, key_t, none);
    softmax_rows(scores, n, scale);
    let context = Strided { ptr: out, row: out_row as isize, col: 1 };
    let probs = Strided { ptr: scores.as_ptr(), row: n as isize, col: 1 };
    matmul((n, d, n), context, false, probs, Strided { ptr: v.as_ptr(), row, col: 1 }, none);
}

thread_local! {
    /// [`attend_packed`]'s scratch (scores, and the copies of k and v), per thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output buffer of [`attend_packed`], written by all tasks at disjoint places.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// SAFETY: `offset` must lie within the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}
// SAFETY: tasks write disjoint elements (see attend_packed).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// erf by Abramowitz & Stegun 7.1.26, branch-free (PyTorch's `Vectorized<float>::erf`).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let r = (((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6;
    (1.0 - r * t * exp(-a * a)).copysign(x)
}

/// eˣ for x ≤ 88, branch-free: x = n·ln2 + r, e^r by Cephes' expf polynomial (≤ 1 ulp or so),
/// 2ⁿ from the exponent bits. Below −87 (where eˣ turns subnormal) it is 0, so that masked
/// attention scores get exactly zero weight.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let clamped = x.max(-87.0);
    let n = (clamped * std::f32::consts::LOG2_E + 0.5).floor();
    let r = clamped - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.5;
    // 2ⁿ from the biased exponent n + 127, an integer in [0, 255]: added to 2²³, it lands in the
    // low mantissa bits. The same bits as `(n as i32 + 127) << 23`, but `as i32` saturates, which
    // the compiler does not vectorize.
    let biased = (n + 127.0 + 8_388_608.0).to_bits() - 0x4B00_0000;
    let y = (p * r * r + r + 1.0) * f32::from_bits(biased << 23);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// [`exp`] on eight lanes, its polynomial in fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    let set = _mm256_set1_ps;
    let clamped = _mm256_max_ps(x, set(-87.0));
    let n = _mm256_floor_ps(_mm256_fmadd_ps(clamped, set(std::f32::consts::LOG2_E), set(0.5)));
    let r = _mm256_fmadd_ps(n, set(2.121_944_4e-4), _mm256_fnmadd_ps(n, set(0.693_359_4), clamped));
    let mut p = _mm256_fmadd_ps(set(1.987_569_1e-4), r, set(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, set(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, set(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, set(0.166_666_65));
    p = _mm256_fmadd_ps(p, r, set(0.5));
    let y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, set(1.0)));
    // 2ⁿ: n + 127 in [0, 255] shifted into the exponent bits
    let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let scaled = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)));
    _mm256_and_ps(scaled, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, set(-87.0)))
}

/// `out[i][e] += Σ_l coef[i][l] · w[l][e]` for i < m, l < len, e < width: the rows of `w`
/// weighted by the rows of `coef`. Each matrix is given by its first element and the step
/// between its rows.
///
/// # Safety
/// Every element addressed must lie within its buffer, and `out` must not overlap the others.
unsafe fn combine_rows<W: Widen>(
    (coef, coef_row): (*const f32, usize),
    (m, len): (usize, usize),
    (w, w_row): (*const W, usize),
    width: usize,
    (out, out_row): (*mut f32, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return combine_rows_avx2((coef, coef_row), (m, len), (w, w_row), width, (out, out_row));
    }
    for i in 0..m {
        for l in 0..len {
            let c = *coef.add(i * coef_row + l);
            for e in 0..width {
                *out.add(i * out_row + e) += c * (*w.add(l * w_row + e)).widen();
            }
        }
    }
}

/// Rows of `w` per pass: a pass updates all of `out` from 32 rows of `w` (24 KB at 192 columns),
/// which stay in L1 while every tile of `out` reads them.
const COMBINE_BLOCK: usize = 32;

/// Tiles of up to 6 rows × 16 columns (12 sums; 2 loads and 6 broadcasts per 12 FMAs), or, for
/// a single row, 1 × 64 (8 sums), over passes of [`COMBINE_BLOCK`] rows of `w`. Each pass first
/// copies its coefficients, interleaved by row, so that a tile's broadcasts read one pointer at
/// fixed offsets (strided rows had the compiler spill their addresses).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn combine_rows_avx2<W: Widen>(
    (coef, coef_row): (*const f32, usize),
    (m, len): (usize, usize),
    (w, w_row): (*const W, usize),
    width: usize,
    (out, out_row): (*mut f32, usize),
) {
    let mut packed = [0f32; COMBINE_BLOCK * 6];
    for first in (0..len).step_by(COMBINE_BLOCK) {
        let block = (len - first).min(COMBINE_BLOCK);
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(6);
            for l in 0..block {
                for r in 0..rows {
                    packed[l * rows + r] = *coef.add((i + r) * coef_row + first + l);
                }
            }
            let tile = |e: usize| CombineTile {
                coef: packed.as_ptr(),
                coef_step: rows,
                len: block,
                w: w.add(first * w_row + e),
                w_row,
                out: out.add(i * out_row + e),
                out_row,
                accumulate: true,
            };
            let mut e = 0;
            if rows == 1 {
                while e + 64 <= width {
                    tile(e).run::<1, 8>();
                    e += 64;
                }
            } else {
                while e + 16 <= width {
                    tile(e).run_rows(rows);
                    e += 16;
                }
            }
            while e + 8 <= width {
                match rows {
                    6 => tile(e).run::<6, 1>(),
                    5 => tile(e).run::<5, 1>(),
                    4 => tile(e).run::<4, 1>(),
                    3 => tile(e).run::<3, 1>(),
                    2 => tile(e).run::<2, 1>(),
                    _ => tile(e).run::<1, 1>(),
                }
                e += 8;
            }
            for r in 0..rows {
                for e in e..width {
                    let sum: f32 =
                        (0..block).map(|l| packed[l * rows + r] * (*w.add((first + l) * w_row + e)).widen()).sum();
                    *out.add((i + r) * out_row + e) += sum;
                }
            }
            i += rows;
        }
    }
}

/// One tile of [`combine_rows_avx2`], from its first row and column; the coefficients packed
/// [len, R].
#[cfg(target_arch = "x86_64")]
struct CombineTile<W> {
    coef: *const f32,
    /// Elements from one coefficient row (one `l`) to the next: R when packed.
    coef_step: usize,
    len: usize,
    w: *const W,
    w_row: usize,
    out: *mut f32,
    out_row: usize,
    /// Whether the products add to `out` or replace it.
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl<W: Widen> CombineTile<W> {
    /// [`Self::run`] for `rows` ≤ 6 rows × 16 columns.
    ///
    /// # Safety
    /// As [`Self::run`]'s.
    #[inline(always)]
    unsafe fn run_rows(&self, rows: usize) {
        match rows {
            6 => self.run::<6, 2>(),
            5 => self.run::<5, 2>(),
            4 => self.run::<4, 2>(),
            3 => self.run::<3, 2>(),
            2 => self.run::<2, 2>(),
            _ => self.run::<1, 2>(),
        }
    }

    /// R rows × V registers of 8 columns, accumulated onto `out` (or written over it, unless
    /// `self.accumulate`).
    ///
    /// # Safety
    /// As [`combine_rows`]', on a CPU with AVX2, FMA and F16C.
    #[inline(always)]
    unsafe fn run<const R: usize, const V: usize>(&self) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if self.accumulate {
            for (r, sums) in acc.iter_mut().enumerate() {
                for (v, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm256_loadu_ps(self.out.add(r * self.out_row + 8 * v));
                }
            }
        }
        let (mut coef, mut w) = (self.coef, self.w);
        for _ in 0..self.len {
            let mut weights = [_mm256_setzero_ps(); V];
            for (v, weight) in weights.iter_mut().enumerate() {
                *weight = W::widen8(w.add(8 * v));
            }
            for (r, sums) in acc.iter_mut().enumerate() {
                let c = _mm256_broadcast_ss(&*coef.add(r));
                for (sum, &weight) in sums.iter_mut().zip(&weights) {
                    *sum = _mm256_fmadd_ps(c, weight, *sum);
                }
            }
            coef = coef.add(self.coef_step);
            w = w.add(self.w_row);
        }
        for (r, sums) in acc.iter().enumerate() {
            for (v, &sum) in sums.iter().enumerate() {
                _mm256_storeu_ps(self.out.add(r * self.out_row + 8 * v), sum);
            }
        }
    }
}

/// The sizes of [`attend_encoder`]: queries [batch, queries, heads·head_dim], encoder states
/// [batch, keys, width].
#[derive(Clone, Copy)]
pub(crate) struct EncoderAttentionShape {
    pub batch: usize,
    pub queries: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub keys: usize,
    pub width: usize,
}

/// A projection `x·Wᵀ + b`: W [out, in] in its stored precision, b [out].
#[derive(Clone, Copy)]
pub(crate) struct Projection<'a, W> {
    pub weight: &'a [W],
    pub bias: &'a [f32],
}

/// Encoder states per block: 64 states of 768 are 192 KB, which stay in L2 between their two
/// uses (the scores, then the mixing).
const KEY_BLOCK: usize = 64;

/// Cross-attention straight from the encoder states E, without their keys and values:
/// softmax(q·kᵀ·scale + bias)·v with k = E·Wkᵀ + bk and v = E·Wvᵀ + bv is computed as
/// q·kᵀ = (q·Wk)·Eᵀ + q·bk and p·v = (p·E)·Wvᵀ + bv (each row of p sums to 1). The same
/// function, summed in another order. For a few queries it is far less work than the keys and
/// values of every encoder state (for 20 decoded tokens, 6 against 16 GFLOP per image). Each step
/// reads E in every layer (1.8 MB per image, from memory: the decoder's weights streamed between
/// two layers evict it) and Wk, Wv (shared by the batch), where cached keys and values would be
/// 3.5 MB per image and layer, computed first.
///
/// `q` [batch, queries, heads·head_dim] (projected, bias added), `states` [batch, keys, width],
/// `bias` [batch, keys] (additive, shared by heads and queries). Returns the context with heads
/// merged, [batch, queries, heads·head_dim].
pub(crate) fn attend_encoder<W: Widen + Sync>(
    q: &[f32],
    states: &[f32],
    (key, value): (Projection<W>, Projection<W>),
    bias: Option<&[f32]>,
    scale: f32,
    s: EncoderAttentionShape,
) -> Vec<f32> {
    let EncoderAttentionShape { batch, queries: t, heads, head_dim, keys: n, width } = s;
    let dim = heads * head_dim;
    assert!(q.len() == batch * t * dim && states.len() == batch * n * width);
    assert!(key.weight.len() == dim * width && value.weight.len() == dim * width);
    assert!(key.bias.len() == dim && value.bias.len() == dim && bias.is_none_or(|b| b.len() == batch * n));
    // Query rows: of the batch, image-major [batch, t]; of one image, head-major [heads, t].
    let (m, rows) = (batch * t, heads * t);

    // The queries in the encoder's space, q·Wk per head: [heads, batch·t, width]. One task per
    // head, which reads its rows of Wk once for the whole batch.
    let mut projected = vec![0f32; heads * m * width];
    projected.par_chunks_mut(m * width).enumerate().for_each(|(head, projected)| {
        // SAFETY: the head's columns of all rows of q [batch·t, dim], its rows of Wk
        // [head_dim, width], and this task's own [batch·t, width].
        unsafe {
            combine_rows(
                (q.as_ptr().add(head * head_dim), dim),
                (m, head_dim),
                (key.weight.as_ptr().add(head * head_dim * width), width),
                width,
                (projected.as_mut_ptr(), width),
            );
        }
    });

    // Each image's states are split in as many parts as keep all threads busy; each part's task
    // runs a softmax over its states block by block (rescaling what it has summed whenever the
    // running max grows), so that each block is read once (into cache) for its scores and again
    // for mixing them. Its result: per query row, the max, the sum of exponentials and the
    // states mixed by them (not yet divided by the sum).
    let parts_per_image = (2 * rayon::current_num_threads()).div_ceil(batch).min(n.div_ceil(KEY_BLOCK)).max(1);
    let part_len = n.div_ceil(parts_per_image);
    let mut parts = vec![(f32::NEG_INFINITY, 0f32); batch * parts_per_image * rows];
    let mut part_mixed = vec![0f32; batch * parts_per_image * rows * width];
    parts.par_chunks_mut(rows).zip(part_mixed.par_chunks_mut(rows * width)).enumerate().for_each(
        |(task, (parts, mixed))| {
            let (image, first) = (task / parts_per_image, task % parts_per_image * part_len);
            let end = (first + part_len).min(n);
            // this image's query rows in the encoder's space, [heads, t, width]
            let mut queries = Vec::with_capacity(rows * width);
            for head in 0..heads {
                queries.extend_from_slice(&projected[(head * m + image * t) * width..][..t * width]);
            }
            // The key bias' share q·bk, the same for every state: softmax would not see it, but
            // transformers adds it, and so it is added here.
            let shifts: Vec<f32> = (0..rows)
                .map(|row| {
                    let (head, i) = (row / t, row % t);
                    let query = &q[(image * t + i) * dim + head * head_dim..][..head_dim];
                    query.iter().zip(&key.bias[head * head_dim..][..head_dim]).map(|(a, b)| a * b).sum()
                })
                .collect();
            let mut scores = vec![0f32; KEY_BLOCK * rows];
            let mut probs = vec![0f32; rows * KEY_BLOCK];
            for block in (first..end).step_by(KEY_BLOCK) {
                let len = KEY_BLOCK.min(end - block);
                let block_states = &states[(image * n + block) * width..(image * n + block + len) * width];
                // scores [len, rows] (transposed), then probabilities [rows, len]
                let scores = &mut scores[..len * rows];
                scores.fill(0.0);
                rows_times_weights(&queries, rows, width, block_states, scores);
                for (row, p) in probs[..rows * len].chunks_mut(len).enumerate() {
                    for (j, p) in p.iter_mut().enumerate() {
                        let bias = bias.map_or(0.0, |bias| bias[image * n + block + j]);
                        *p = (scores[j * rows + row] + shifts[row]) * scale + bias;
                    }
                    let (max, sum) = &mut parts[row];
                    let new_max = p.iter().fold(*max, |m, &x| m.max(x));
                    let rescale = exp(*max - new_max);
                    *sum = *sum * rescale + exp_shifted(p, new_max);
                    if rescale != 1.0 {
                        mixed[row * width..(row + 1) * width].iter_mut().for_each(|x| *x *= rescale);
                    }
                    *max = new_max;
                }
                // SAFETY: probs [rows, len], the block's states [len, width] and this task's
                // own [rows, width].
                unsafe {
                    combine_rows(
                        (probs.as_ptr(), len),
                        (rows, len),
                        (block_states.as_ptr(), width),
                        width,
                        (mixed.as_mut_ptr(), width),
                    );
                }
            }
        },
    );

    // The parts merged, each weighted by its share of the whole softmax: the states mixed by the
    // probabilities, p·E, [batch, heads, t, width].
    let mut mixed = vec![0f32; batch * rows * width];
    mixed.par_chunks_mut(width).enumerate().for_each(|(row, mixed)| {
        let (image, r) = (row / rows, row % rows);
        let part = |index: usize| parts[(image * parts_per_image + index) * rows + r];
        let max = (0..parts_per_image).map(|index| part(index).0).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = (0..parts_per_image).map(|index| part(index).1 * exp(part(index).0 - max)).sum();
        for index in 0..parts_per_image {
            let weight = exp(part(index).0 - max) / total;
            let part_mixed = &part_mixed[((image * parts_per_image + index) * rows + r) * width..][..width];
            mixed.iter_mut().zip(part_mixed).for_each(|(m, x)| *m += weight * x);
        }
    });

    // Back to the model's width through each head's rows of Wv, bias added: [batch, t, dim].
    let mut out = vec![0f32; batch * t * dim];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..heads).into_par_iter().for_each(|head| {
        let mut xs = Vec::with_capacity(m * width);
        for image in 0..batch {
            xs.extend_from_slice(&mixed[(image * rows + head * t) * width..][..t * width]);
        }
        let mut outs = vec![0f32; head_dim * m];
        for (column, &b) in outs.chunks_mut(m).zip(&value.bias[head * head_dim..][..head_dim]) {
            column.fill(b);
        }
        rows_times_weights(&xs, m, width, &value.weight[head * head_dim * width..][..head_dim * width], &mut outs);
        for (o, column) in outs.chunks(m).enumerate() {
            for (row, &x) in column.iter().enumerate() {
                // SAFETY: this head's columns of out, which no other task writes.
                unsafe { *out_ptr.at(row * dim + head * head_dim + o) = x };
            }
        }
    });
    out
}

/// The sizes of an attention call: q [batch, heads, queries, head_dim], k and v
/// [batch, heads, keys, head_dim].
#[derive(Clone, Copy)]
pub(crate) struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

/// softmax(q·kᵀ·scale + bias)·v for a few queries (decoding steps), one task per batch row and
/// head: where a matrix product per head would cost a thread hand-off each, this is one.
/// `bias` is [batch, queries, keys] (shared by the heads). Returns [batch, heads, queries, head_dim].
pub(crate) fn attend(q: &[f32], k: &[f32], v: &[f32], bias: Option<&[f32]>, scale: f32, s: AttentionShape) -> Vec<f32> {
    let dot = dot_kernel::<f32>();
    let (tq, tk, d) = (s.queries, s.keys, s.head_dim);
    let mut out = vec![0f32; s.batch * s.heads * tq * d];
    out.par_chunks_mut(tq * d).enumerate().for_each(|(bh, out)| {
        let b = bh / s.heads;
        let (k, v) = (&k[bh * tk * d..(bh + 1) * tk * d], &v[bh * tk * d..(bh + 1) * tk * d]);
        let mut scores = vec![0f32; tk];
        for (i, context) in out.chunks_mut(d).enumerate() {
            let query = &q[(bh * tq + i) * d..(bh * tq + i + 1) * d];
            for (j, score) in scores.iter_mut().enumerate() {
                *score = dot(query, &k[j * d..(j + 1) * d]) * scale;
            }
            if let Some(bias) = bias {
                let row = &bias[(b * tq + i) * tk..(b * tq + i + 1) * tk];
                scores.iter_mut().zip(row).for_each(|(s, b)| *s += b);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            for (j, &p) in scores.iter().enumerate() {
                let p = p / sum;
                context.iter_mut().zip(&v[j * d..(j + 1) * d]).for_each(|(c, v)| *c += p * v);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way this project lays out a product's operands (each row- or column-major) and
    /// its destination, alone and split over threads (by rows, then by columns), with and
    /// without accumulating: the same as the product in f64.
    #[test]
    fn matmul_matches_the_product_in_every_layout() {
        for dims in [(150, 37, 70), (37, 150, 70)] {
            matmul_matches_the_product_in_every_layout_for(dims);
        }
    }

    fn matmul_matches_the_product_in_every_layout_for((m, n, k): (usize, usize, usize)) {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0).collect()
        };
        let (a, b, start) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
        // (row step, column step) of an [r, c] matrix stored row-major or column-major
        let strides = |r: usize, c: usize, row_major: bool| if row_major { (c as isize, 1) } else { (1, r as isize) };
        for layouts in 0..8 {
            let (a_rows, b_rows, dst_rows) = (layouts & 1 == 0, layouts & 2 == 0, layouts & 4 == 0);
            let at = |i: usize, j: usize| if a_rows { a[i * k + j] } else { a[j * m + i] };
            let bt = |i: usize, j: usize| if b_rows { b[i * n + j] } else { b[j * k + i] };
            let (dst_row, dst_col) = strides(m, n, dst_rows);
            for (accumulate, parallelism) in [(false, gemm::Parallelism::None), (true, gemm::Parallelism::Rayon(3))] {
                let mut dst = start.clone();
                let (a_row, a_col) = strides(m, k, a_rows);
                let (b_row, b_col) = strides(k, n, b_rows);
                let dst_view = Strided { ptr: dst.as_mut_ptr(), row: dst_row, col: dst_col };
                let a_view = Strided { ptr: a.as_ptr(), row: a_row, col: a_col };
                let b_view = Strided { ptr: b.as_ptr(), row: b_row, col: b_col };
                #[cfg(feature = "openblas")]
                assert!(blas::SgemmCall::new((m, n, k), &dst_view, &a_view, &b_view).is_some(), "layouts {layouts}");
                // SAFETY: each view covers exactly its buffer.
                unsafe { matmul((m, n, k), dst_view, accumulate, a_view, b_view, parallelism) }
                for i in 0..m {
                    for j in 0..n {
                        let at_dst = (i as isize * dst_row + j as isize * dst_col) as usize;
                        let product: f64 = (0..k).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
                        let expected = product + if accumulate { start[at_dst] as f64 } else { 0.0 };
                        let got = dst[at_dst] as f64;
                        assert!((got - expected).abs() < 1e-4, "layouts {layouts} ({i}, {j}): {got} vs {expected}");
                    }
                }
            }
        }
    }

    /// Every tile shape (1–4 input rows × 1–3 weight rows) and the k remainder, in each weight
    /// dtype, accumulating onto what `outs` held: the same as the product in f64.
    #[test]
    fn rows_times_weights_matches_the_product() {
        for (m, rows, k) in [(9, 7, 70), (1, 1, 5), (4, 3, 16), (3, 5, 64), (6, 2, 8)] {
            let xs: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let w: Vec<f32> = (0..rows * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0).collect();
            let start: Vec<f32> = (0..rows * m).map(|i| i as f32 * 0.5).collect();
            let check = |outs: &[f32], w: &[f32], what: &str| {
                for j in 0..rows {
                    for i in 0..m {
                        let product: f64 = (0..k).map(|l| xs[i * k + l] as f64 * w[j * k + l] as f64).sum();
                        let (got, expected) = (outs[j * m + i] as f64, product + start[j * m + i] as f64);
                        assert!(
                            (got - expected).abs() < 1e-4,
                            "{what} m={m} rows={rows} k={k} ({i}, {j}): {got} vs {expected}"
                        );
                    }
                }
            };
            let mut outs = start.clone();
            rows_times_weights(&xs, m, k, &w, &mut outs);
            check(&outs, &w, "f32");
            // bf16 and f16 weights: against the same rounded values in f64
            let bf16: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
            let mut outs = start.clone();
            rows_times_weights(&xs, m, k, &bf16, &mut outs);
            check(&outs, &bf16.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), "bf16");
            let f16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
            let mut outs = start.clone();
            rows_times_weights(&xs, m, k, &f16, &mut outs);
            check(&outs, &f16.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), "f16");
        }
    }

    #[test]
    fn gelu_is_within_pytorchs_erf_error_of_the_exact_one() {
        let input: Vec<f32> = (-200_000..200_000).map(|i| i as f32 * 5e-5).chain([-90.0, -20.0, 20.0, 90.0]).collect();
        let mut output = input.clone();
        gelu(&mut output);
        for (&x, &y) in input.iter().zip(&output) {
            let exact = (x as f64) * 0.5 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            // erf within 6e-7 (A&S's 1.5e-7 plus the f32 rounding of its evaluation), scaled by
            // x/2, plus the rounding of the result
            let bound = 6e-7 * 0.5 * (x.abs() as f64) + 2.5e-7 * exact.abs();
            assert!((y as f64 - exact).abs() <= bound, "gelu({x}) = {y}, exact {exact}");
        }
    }

    /// erf in f64 (std has none): Taylor series below 3, erfc's continued fraction above.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let value = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc by Lentz's continued fraction
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
        };
        value.copysign(x)
    }

    #[test]
    fn softmax_rows_sum_to_one_and_follow_exp() {
        let input: Vec<f32> = (0..3 * 577).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.7).collect();
        let mut output = input.clone();
        softmax(&mut output, 577, 0.125);
        for (row, probs) in input.chunks(577).zip(output.chunks(577)) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64 * 0.125));
            let sum: f64 = row.iter().map(|&x| (x as f64 * 0.125 - max).exp()).sum();
            for (&x, &p) in row.iter().zip(probs) {
                let exact = (x as f64 * 0.125 - max).exp() / sum;
                assert!((p as f64 - exact).abs() <= 1e-6 * exact + 1e-9, "{p} against {exact}");
            }
        }
    }

    /// The AVX2 exp and GELU against their scalar forms, over the whole range each sees.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_and_gelu_match_the_scalar_ones() {
        if !has_avx2_fma() {
            return;
        }
        let xs: Vec<f32> = (-90_000..88_000).map(|i| i as f32 * 1e-3 + 3.3e-4).collect();
        let (mut exps, mut gelus) = (vec![0f32; xs.len()], xs.clone());
        for (x, e) in xs.chunks_exact(8).zip(exps.chunks_exact_mut(8)) {
            // SAFETY: AVX2 and FMA are present; eight lanes each side.
            unsafe { _mm256_storeu_ps(e.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
        }
        // SAFETY: as above.
        unsafe { gelu_avx2(&mut gelus) };
        for ((&x, &e), &g) in xs.iter().zip(&exps).zip(&gelus) {
            let (scalar_exp, scalar_gelu) = (exp(x), x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)));
            assert!((e - scalar_exp).abs() <= 2.5e-7 * scalar_exp, "exp({x}): {e} against {scalar_exp}");
            assert!(
                (g - scalar_gelu).abs() <= 1e-6 * (1.0 + scalar_gelu.abs()),
                "gelu({x}): {g} against {scalar_gelu}"
            );
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 3.3e-4;
            let (ours, exact) = (exp(x) as f64, (x as f64).exp());
            assert!(((ours - exact) / exact).abs() < 2.5e-7, "exp({x}) = {ours}, exact {exact}");
        }
    }
}
