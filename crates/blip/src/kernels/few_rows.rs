//! Products of a few f32 rows with weight rows stored in f32, bf16 or f16: dot products, and
//! register tiles that read each weight once from where it is stored (no packed copy).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::dispatch::{isa, Isa};
#[cfg(target_arch = "x86_64")]
use super::math::horizontal_sum;
use super::widen::Widen;

/// The fastest dot product of f32 values with `W` values this CPU runs (see [`isa`]).
pub(crate) fn dot_kernel<W: Widen>() -> fn(&[f32], &[W]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features dot_avx2 is compiled for.
        Isa::Avx2Fma(_) => |x, w| unsafe { dot_avx2(x, w) },
        _ => dot_lanes::<W>,
    }
}

/// x·w with four AVX registers of independent sums: the compiler's own vectorization of
/// [`dot_lanes`] used 2-wide registers, a quarter of the width.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    let len = x.len().min(w.len());
    let (xs, ws) = (x.as_ptr(), w.as_ptr());
    // SAFETY: every load reads eight elements below `len` of both slices; the features, by the
    // caller's contract.
    unsafe {
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
}

/// The portable x·w: 32 independent lanes, which the compiler vectorizes for the baseline target,
/// summed pairwise at the end (attention's 64-long dots make the final sum a large share).
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

/// `outs[j·m + i] += xs[i]·w[j]` for the m input rows `xs` [m, k] and each weight row `w[j]`
/// of `w` [rows, k]: the product of a few rows (decoding) with a block of weights,
/// which are read once, straight from where they are stored (no packed copy), widened in
/// registers. `outs` is [rows, m].
pub(crate) fn rows_times_weights<W: Widen>(xs: &[f32], m: usize, k: usize, w: &[W], outs: &mut [f32]) {
    if k == 0 {
        return; // an empty sum: outs keep what they hold
    }
    assert!(xs.len() == m * k && w.len().is_multiple_of(k) && outs.len() == w.len() / k * m);
    #[cfg(target_arch = "x86_64")]
    if let Isa::Avx2Fma(proof) = isa() {
        if proof.avx512().is_some() {
            // SAFETY: the AVX-512 proof shows the features; the sizes were checked above.
            return unsafe { rows_times_weights_avx512(xs, m, k, w, outs) };
        }
        // SAFETY: Isa::Avx2Fma proves the features; the sizes were checked above.
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
///
/// # Safety
/// The sizes of [`rows_times_weights`] (checked there), on a CPU with AVX2, FMA and F16C.
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
            // SAFETY: input rows i..i + tile < m and weight rows j..j + cols < rows, within the
            // caller's sizes; the features, by the caller's contract.
            unsafe {
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
            }
            i += tile;
        }
        j += cols;
    }
}

/// [`rows_times_weights_avx2`] on AVX-512: tiles of 4 input rows × 4 weight rows, 16 lanes.
///
/// # Safety
/// The sizes of [`rows_times_weights`] (checked there), on a CPU with AVX-512 F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn rows_times_weights_avx512<W: Widen>(xs: &[f32], m: usize, k: usize, w: &[W], outs: &mut [f32]) {
    let rows = w.len() / k;
    let (x, w, outs) = (xs.as_ptr(), w.as_ptr(), outs.as_mut_ptr());
    let mut j = 0;
    while j < rows {
        let mut i = 0;
        let cols = (rows - j).min(4);
        while i < m {
            let tile = (m - i).min(4);
            // SAFETY: input rows i..i + tile < m and weight rows j..j + cols < rows, within the
            // caller's sizes; the features, by the caller's contract.
            unsafe {
                match (tile, cols) {
                    (4, 4) => rows_tile16::<W, 4, 4>(x, w, outs, (m, k), (i, j)),
                    (3, 4) => rows_tile16::<W, 3, 4>(x, w, outs, (m, k), (i, j)),
                    (2, 4) => rows_tile16::<W, 2, 4>(x, w, outs, (m, k), (i, j)),
                    (1, 4) => rows_tile16::<W, 1, 4>(x, w, outs, (m, k), (i, j)),
                    (4, 3) => rows_tile16::<W, 4, 3>(x, w, outs, (m, k), (i, j)),
                    (3, 3) => rows_tile16::<W, 3, 3>(x, w, outs, (m, k), (i, j)),
                    (2, 3) => rows_tile16::<W, 2, 3>(x, w, outs, (m, k), (i, j)),
                    (1, 3) => rows_tile16::<W, 1, 3>(x, w, outs, (m, k), (i, j)),
                    (4, 2) => rows_tile16::<W, 4, 2>(x, w, outs, (m, k), (i, j)),
                    (3, 2) => rows_tile16::<W, 3, 2>(x, w, outs, (m, k), (i, j)),
                    (2, 2) => rows_tile16::<W, 2, 2>(x, w, outs, (m, k), (i, j)),
                    (1, 2) => rows_tile16::<W, 1, 2>(x, w, outs, (m, k), (i, j)),
                    (4, _) => rows_tile16::<W, 4, 1>(x, w, outs, (m, k), (i, j)),
                    (3, _) => rows_tile16::<W, 3, 1>(x, w, outs, (m, k), (i, j)),
                    (2, _) => rows_tile16::<W, 2, 1>(x, w, outs, (m, k), (i, j)),
                    _ => rows_tile16::<W, 1, 1>(x, w, outs, (m, k), (i, j)),
                }
            }
            i += tile;
        }
        j += cols;
    }
}

/// One tile of [`rows_times_weights_avx512`]: input rows i..i+R against weight rows j..j+C.
///
/// # Safety
/// Within the sizes of `rows_times_weights`, on a CPU with AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_tile16<W: Widen, const R: usize, const C: usize>(
    x: *const f32,
    w: *const W,
    outs: *mut f32,
    (m, k): (usize, usize),
    (i, j): (usize, usize),
) {
    // SAFETY: the loads and stores address rows i..i+R of x, j..j+C of w and their outputs,
    // within the sizes by the caller's contract; the prefetch is a hint that may point anywhere.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut l = 0;
        while l + 16 <= k {
            let mut weights = [_mm512_setzero_ps(); C];
            for (c, weight) in weights.iter_mut().enumerate() {
                *weight = W::widen16(w.add((j + c) * k + l));
                if i == 0 {
                    // the next tile's weight rows, as in rows_tile
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + C + c) * k + l).cast());
                }
            }
            for (r, sums) in acc.iter_mut().enumerate() {
                let input = _mm512_loadu_ps(x.add((i + r) * k + l));
                for (sum, &weight) in sums.iter_mut().zip(&weights) {
                    *sum = _mm512_fmadd_ps(input, weight, *sum);
                }
            }
            l += 16;
        }
        for (r, sums) in acc.iter().enumerate() {
            for (c, &sum) in sums.iter().enumerate() {
                let tail: f32 = (l..k).map(|l| *x.add((i + r) * k + l) * (*w.add((j + c) * k + l)).widen()).sum();
                *outs.add((j + c) * m + i + r) += _mm512_reduce_add_ps(sum) + tail;
            }
        }
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
    // SAFETY: the loads and stores address rows i..i+R of x, j..j+C of w and their outputs,
    // within the sizes by the caller's contract; the prefetch is a hint that may point anywhere.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut l = 0;
        while l + 8 <= k {
            let mut weights = [_mm256_setzero_ps(); C];
            for (c, weight) in weights.iter_mut().enumerate() {
                *weight = W::widen8(w.add((j + c) * k + l));
                if i == 0 {
                    // The next tile's weight rows, a whole tile ahead of their use: the hardware
                    // prefetcher alone left the loads waiting on memory. (A hint only: the
                    // address may lie past the block, where it does nothing.)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

    /// Every tile shape (1–4 input rows × 1–4 weight rows, with whole tiles before them) and k
    /// with and without a remainder, in each weight dtype, accumulating onto what `outs` held, on
    /// each path: the same as the product in f64.
    #[test]
    fn rows_times_weights_matches_the_product() {
        for isa in available() {
            with_isa(isa, || rows_times_weights_matches_the_product_on(isa));
        }
    }

    fn rows_times_weights_matches_the_product_on(isa: Isa) {
        let shapes = (1..=5)
            .flat_map(|m| (1..=9).map(move |rows| (m, rows)))
            .flat_map(|(m, rows)| [(m, rows, 70), (m, rows, 16)]);
        for (m, rows, k) in shapes.chain([(1, 1, 5), (8, 9, 40)]) {
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
                            "{isa:?} {what} m={m} rows={rows} k={k} ({i}, {j}): {got} vs {expected}"
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

    /// The dot product on each path, long enough for every loop and with a remainder.
    #[test]
    fn dot_matches_the_product() {
        let x: Vec<f32> = (0..77).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w: Vec<f32> = (0..77).map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0).collect();
        let exact: f64 = x.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
        for isa in available() {
            let got = with_isa(isa, || dot_kernel::<f32>()(&x, &w));
            assert!((got as f64 - exact).abs() < 1e-4, "{isa:?}: {got} vs {exact}");
        }
    }
}
