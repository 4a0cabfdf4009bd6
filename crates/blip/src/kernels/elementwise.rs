//! Element- and row-wise kernels over f32 slices, on all threads: the exact GELU, LayerNorm and
//! a scaled softmax, each as PyTorch's vectorized CPU kernels compute it.

use std::mem::MaybeUninit;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::dispatch::{isa, Isa};
use super::math::{erf, exp_and_sum, lane_sum};
#[cfg(target_arch = "x86_64")]
use super::math::{erf16, erf8, exp_and_sum_avx2, exp_and_sum_avx512};
use super::widen::{narrow_bf16, narrow_scaled_bf16};

/// The exact GELU, `x·½·(1 + erf(x/√2))`, as PyTorch's vectorized CPU kernel computes it: erf by
/// Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7, PyTorch's own choice), exp by a Cephes
/// polynomial. In place, on all threads.
pub(crate) fn gelu(data: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    data.par_chunks_mut(CHUNK).for_each(gelu_chunk);
}

/// [`gelu`] of a chunk, on this thread.
fn gelu_chunk(chunk: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 proof shows the features gelu_avx512 is compiled for.
        Isa::Avx2Fma(proof) if proof.avx512().is_some() => unsafe { gelu_avx512(chunk) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features gelu_avx2 is compiled for.
        Isa::Avx2Fma(_) => unsafe { gelu_avx2(chunk) },
        _ => gelu_lanes(chunk),
    }
}

/// [`gelu`] of one chunk, eight lanes at a time through [`gelu8`].
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(data: &mut [f32]) {
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // SAFETY: eight elements each way within the chunk; the features, by the caller's contract.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), gelu8(_mm256_loadu_ps(chunk.as_ptr()))) };
    }
    gelu_lanes(chunks.into_remainder())
}

/// [`gelu`] of one chunk, sixteen lanes at a time through [`gelu16`].
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn gelu_avx512(data: &mut [f32]) {
    let mut chunks = data.chunks_exact_mut(16);
    for chunk in &mut chunks {
        // SAFETY: sixteen elements each way within the chunk; the features, by the caller's
        // contract.
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), gelu16(_mm512_loadu_ps(chunk.as_ptr()))) };
    }
    // SAFETY: the features, by the caller's contract.
    unsafe { gelu_avx2(chunks.into_remainder()) }
}

/// [`gelu8`] on sixteen lanes: the same operations, so the same bits in every lane.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu16(x: __m512) -> __m512 {
    // SAFETY: register arithmetic only; the caller guarantees AVX-512 F.
    unsafe {
        let erf = erf16(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
        let half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
        _mm512_fmadd_ps(half_x, erf, half_x)
    }
}

/// [`gelu_lanes`]' formula on eight lanes, with fused multiply-adds (the compiler, bound to
/// Rust's separate rounding of `a * b + c`, cannot fuse them itself).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu8(x: __m256) -> __m256 {
    // SAFETY: register arithmetic only; the caller guarantees AVX2 and FMA.
    unsafe {
        let erf = erf8(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
        let half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5));
        _mm256_fmadd_ps(half_x, erf, half_x)
    }
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
        .for_each(|(out, xs)| layer_norm_some_rows(xs, weight, bias, eps, out));
    // SAFETY: every element was written above (the chunks cover xs.len() values).
    unsafe { out.set_len(xs.len()) };
    out
}

/// [`layer_norm_rows`] on the widest instruction set this process uses.
fn layer_norm_some_rows(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 proof shows the features layer_norm_avx512 is compiled for.
        Isa::Avx2Fma(proof) if proof.avx512().is_some() => unsafe { layer_norm_avx512(xs, weight, bias, eps, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features layer_norm_avx2 is compiled for.
        Isa::Avx2Fma(_) => unsafe { layer_norm_avx2(xs, weight, bias, eps, out) },
        _ => layer_norm_rows(xs, weight, bias, eps, out),
    }
}

/// [`layer_norm_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_avx2(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    layer_norm_rows(xs, weight, bias, eps, out)
}

/// [`layer_norm_rows`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn layer_norm_avx512(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
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

/// [`layer_norm`] rounded to bf16 as [`narrow_bf16`] rounds: the input a bf16 product takes,
/// without writing the f32 values out first (each task's rows pass through a buffer in cache).
pub(crate) fn layer_norm_to_bf16(xs: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<half::bf16> {
    let dim = weight.len();
    assert!(bias.len() == dim && dim > 0 && xs.len().is_multiple_of(dim));
    let rows_per_task = (1 << 14) / dim + 1;
    let mut out = vec![half::bf16::ZERO; xs.len()];
    out.par_chunks_mut(rows_per_task * dim).zip(xs.par_chunks(rows_per_task * dim)).for_each(|(out, xs)| {
        let mut normed: Vec<f32> = Vec::with_capacity(xs.len());
        layer_norm_some_rows(xs, weight, bias, eps, &mut normed.spare_capacity_mut()[..xs.len()]);
        // SAFETY: the rows above wrote all xs.len() values.
        unsafe { normed.set_len(xs.len()) };
        narrow_bf16(&normed, out);
    });
    out
}

/// [`gelu`] of `xs` rounded to bf16 as [`narrow_bf16`] rounds, into a new buffer: the input a
/// bf16 product takes, without writing the f32 values out first.
pub(crate) fn gelu_to_bf16(xs: &[f32]) -> Vec<half::bf16> {
    const CHUNK: usize = 1 << 14;
    let mut out = vec![half::bf16::ZERO; xs.len()];
    out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(out, xs)| {
        let mut values = xs.to_vec();
        gelu_chunk(&mut values);
        narrow_bf16(&values, out);
    });
    out
}

/// Softmax of `scale`·x over each row of `row_len` values, in place, on all threads.
pub(crate) fn softmax(data: &mut [f32], row_len: usize, scale: f32) {
    let chunk = ((1 << 14) / row_len.max(1) + 1) * row_len;
    data.par_chunks_mut(chunk).for_each(|rows| softmax_rows(rows, row_len, scale));
}

/// Softmax of `scale`·x over each row of `row_len` values, in place, on this thread.
pub(crate) fn softmax_rows(data: &mut [f32], row_len: usize, scale: f32) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 proof shows the features softmax_avx512 is compiled for.
        Isa::Avx2Fma(proof) if proof.avx512().is_some() => {
            data.chunks_mut(row_len).for_each(|row| unsafe { softmax_avx512(row, scale) })
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features softmax_avx2 is compiled for.
        Isa::Avx2Fma(_) => data.chunks_mut(row_len).for_each(|row| unsafe { softmax_avx2(row, scale) }),
        _ => data.chunks_mut(row_len).for_each(|row| softmax_row(row, scale)),
    }
}

/// Softmax of `scale`·x over each row of `row_len` values, on this thread, written rounded to
/// bf16 into `out` (as long as `data`, whose values are left as the unnormalized exponentials):
/// the probabilities a bf16 product takes, without a second pass over them.
pub(crate) fn softmax_rows_to_bf16(data: &mut [f32], row_len: usize, scale: f32, out: &mut [half::bf16]) {
    let rows = data.chunks_mut(row_len).zip(out.chunks_mut(row_len));
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 proof shows the features the two kernels are compiled for.
        Isa::Avx2Fma(proof) if proof.avx512().is_some() => rows.for_each(|(row, out)| unsafe {
            let inverse = softmax_exponentials_avx512(row, scale);
            scaled_to_bf16_avx512(row, inverse, out)
        }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features the two kernels are compiled for.
        Isa::Avx2Fma(_) => rows.for_each(|(row, out)| unsafe {
            let inverse = softmax_exponentials_avx2(row, scale);
            scaled_to_bf16_avx2(row, inverse, out)
        }),
        _ => rows.for_each(|(row, out)| {
            let inverse = softmax_exponentials(row, scale);
            narrow_scaled_bf16(row, inverse, out)
        }),
    }
}

/// [`narrow_scaled_bf16`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_to_bf16_avx2(row: &[f32], factor: f32, out: &mut [half::bf16]) {
    narrow_scaled_bf16(row, factor, out)
}

/// [`narrow_scaled_bf16`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn scaled_to_bf16_avx512(row: &[f32], factor: f32, out: &mut [half::bf16]) {
    narrow_scaled_bf16(row, factor, out)
}

/// [`softmax_row`] with the max and the exponentials in AVX-512 registers.
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn softmax_avx512(row: &mut [f32], scale: f32) {
    // SAFETY: the features, by the caller's contract.
    let inverse = unsafe { softmax_exponentials_avx512(row, scale) };
    row.iter_mut().for_each(|x| *x *= inverse);
}

/// [`softmax_exponentials_avx2`] on sixteen lanes.
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn softmax_exponentials_avx512(row: &mut [f32], scale: f32) -> f32 {
    // SAFETY: the loads read sixteen elements within a chunk of the row; the features, by the
    // caller's contract.
    unsafe {
        let (mut maxes, scale16) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(scale));
        let mut chunks = row.chunks_exact(16);
        for chunk in &mut chunks {
            maxes = _mm512_max_ps(maxes, _mm512_mul_ps(_mm512_loadu_ps(chunk.as_ptr()), scale16));
        }
        let tail = chunks.remainder().iter().map(|&x| x * scale);
        let max = tail.fold(_mm512_reduce_max_ps(maxes), f32::max);
        1.0 / exp_and_sum_avx512(row, scale, max)
    }
}

/// [`softmax_row`] with the max and the exponentials in AVX2 registers.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32], scale: f32) {
    // SAFETY: the features, by the caller's contract.
    let inverse = unsafe { softmax_exponentials_avx2(row, scale) };
    row.iter_mut().for_each(|x| *x *= inverse);
}

/// The exponentials of `scale`·x less the row's max, in place; returns 1 / their sum.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_exponentials_avx2(row: &mut [f32], scale: f32) -> f32 {
    // SAFETY: the loads read eight elements within a chunk of the row, the store writes eight
    // lanes to an array of eight; the features, by the caller's contract.
    unsafe {
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
        1.0 / exp_and_sum_avx2(row, scale, max)
    }
}

/// The max and the sum run in 8 independent lanes, as PyTorch's vectorized softmax does (a
/// single running sum would be a chain of dependent additions the compiler cannot vectorize).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    let inverse = softmax_exponentials(row, scale);
    row.iter_mut().for_each(|x| *x *= inverse);
}

/// The exponentials of `scale`·x less the row's max, in place; returns 1 / their sum.
#[inline(always)]
fn softmax_exponentials(row: &mut [f32], scale: f32) -> f32 {
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
    // one division per row, as PyTorch's vectorized softmax does
    1.0 / exp_and_sum(row, scale, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, with_isa};
    use crate::kernels::math::exp;
    #[cfg(target_arch = "x86_64")]
    use crate::kernels::math::{exp16, exp8};

    #[test]
    fn softmax_to_bf16_is_the_softmax_rounded() {
        let row_len = 37;
        let data: Vec<f32> = (0..row_len * 3).map(|i| ((i * 7919) % 101) as f32 * 0.13 - 6.0).collect();
        for isa in available() {
            let mut expected = data.clone();
            let mut scratch = data.clone();
            let mut out = vec![half::bf16::ZERO; data.len()];
            with_isa(isa, || {
                softmax_rows(&mut expected, row_len, 0.7);
                softmax_rows_to_bf16(&mut scratch, row_len, 0.7, &mut out);
            });
            for (o, e) in out.iter().zip(&expected) {
                // the same f32 softmax (one product fewer: exp·(1/sum) rounded once), then rounded
                assert!((o.to_f32() - e).abs() <= e.abs() / 128.0, "{isa:?}: {o} vs {e}");
            }
        }
    }

    #[test]
    fn gelu_is_within_pytorchs_erf_error_of_the_exact_one() {
        let input: Vec<f32> = (-200_000..200_000).map(|i| i as f32 * 5e-5).chain([-90.0, -20.0, 20.0, 90.0]).collect();
        for isa in available() {
            let mut output = input.clone();
            with_isa(isa, || gelu(&mut output));
            for (&x, &y) in input.iter().zip(&output) {
                let exact = (x as f64) * 0.5 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
                // erf within 6e-7 (A&S's 1.5e-7 plus the f32 rounding of its evaluation), scaled by
                // x/2, plus the rounding of the result
                let bound = 6e-7 * 0.5 * (x.abs() as f64) + 2.5e-7 * exact.abs();
                assert!((y as f64 - exact).abs() <= bound, "{isa:?}: gelu({x}) = {y}, exact {exact}");
            }
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
        for isa in available() {
            // a negative scale too: the max is that of the scaled values
            for scale in [0.125f32, -0.3] {
                let mut output = input.clone();
                with_isa(isa, || softmax(&mut output, 577, scale));
                for (row, probs) in input.chunks(577).zip(output.chunks(577)) {
                    let scaled = |x: f32| x as f64 * scale as f64;
                    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(scaled(x)));
                    let sum: f64 = row.iter().map(|&x| (scaled(x) - max).exp()).sum();
                    for (&x, &p) in row.iter().zip(probs) {
                        let exact = (scaled(x) - max).exp() / sum;
                        assert!((p as f64 - exact).abs() <= 1e-6 * exact + 1e-9, "{isa:?}: {p} against {exact}");
                    }
                }
            }
        }
    }

    /// LayerNorm of rows far from zero mean (the variance must come from centred values), with a
    /// remainder lane, against the formula in f64.
    #[test]
    fn layer_norm_matches_the_f64_formula() {
        let dim = 301;
        let xs: Vec<f32> = (0..7 * dim).map(|i| 40.0 + ((i * 37 % 101) as f32 - 50.0) * 0.06).collect();
        let weight: Vec<f32> = (0..dim).map(|i| 1.0 + ((i * 13 % 29) as f32 - 14.0) * 0.03).collect();
        let bias: Vec<f32> = (0..dim).map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.05).collect();
        for isa in available() {
            let ours = with_isa(isa, || layer_norm(&xs, &weight, &bias, 1e-5));
            for (row, out) in xs.chunks(dim).zip(ours.chunks(dim)) {
                let mean = row.iter().map(|&x| x as f64).sum::<f64>() / dim as f64;
                let variance = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                for (i, (&x, &y)) in row.iter().zip(out).enumerate() {
                    let expected = (x as f64 - mean) / (variance + 1e-5).sqrt() * weight[i] as f64 + bias[i] as f64;
                    assert!((y as f64 - expected).abs() < 2e-5, "{isa:?}: {y} against {expected}");
                }
            }
        }
    }

    /// The AVX2 exp and GELU against their scalar forms, over the whole range each sees.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_and_gelu_match_the_scalar_ones() {
        if !matches!(crate::kernels::dispatch::available().last(), Some(Isa::Avx2Fma(_))) {
            return;
        }
        let xs: Vec<f32> = (-90_000..88_000).map(|i| i as f32 * 1e-3 + 3.3e-4).collect();
        let (mut exps, mut gelus) = (vec![0f32; xs.len()], xs.clone());
        for (x, e) in xs.chunks_exact(8).zip(exps.chunks_exact_mut(8)) {
            // SAFETY: AVX2 and FMA are present (checked above); eight lanes each side.
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
        // AVX-512: the same operations on sixteen lanes, so the same bits as AVX2
        let Some(Isa::Avx2Fma(proof)) = crate::kernels::dispatch::available().last().copied() else { return };
        if proof.avx512().is_none() {
            return;
        }
        let (mut exps16, mut gelus16) = (vec![0f32; xs.len()], xs.clone());
        for (x, e) in xs.chunks_exact(16).zip(exps16.chunks_exact_mut(16)) {
            // SAFETY: AVX-512 F is present (the proof); sixteen lanes each side.
            unsafe { _mm512_storeu_ps(e.as_mut_ptr(), exp16(_mm512_loadu_ps(x.as_ptr()))) };
        }
        // SAFETY: as above.
        unsafe { gelu_avx512(&mut gelus16) };
        let n = xs.len() / 16 * 16;
        assert!(exps16[..n].iter().zip(&exps[..n]).all(|(a, b)| a.to_bits() == b.to_bits()), "exp16 against exp8");
        assert!(gelus16.iter().zip(&gelus).all(|(a, b)| a.to_bits() == b.to_bits()), "gelu_avx512 against gelu_avx2");
    }
}
