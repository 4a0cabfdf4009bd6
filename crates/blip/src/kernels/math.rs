//! Scalar and AVX2 building blocks: exp and erf as PyTorch's vectorized CPU kernels compute them,
//! sums in independent lanes, horizontal sums of registers.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::dispatch::{isa, Isa};

/// erf by Abramowitz & Stegun 7.1.26, branch-free (PyTorch's `Vectorized<float>::erf`).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let r = (((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6;
    (1.0 - r * t * exp(-a * a)).copysign(x)
}

/// eˣ for x ≤ 88, branch-free: x = n·ln2 + r, e^r by Cephes' expf polynomial (≤ 1 ulp or so),
/// 2ⁿ from the exponent bits. Below −87 (where eˣ turns subnormal) it is 0, so that masked
/// attention scores get exactly zero weight.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
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

/// [`erf`] on eight lanes, its polynomials in fused multiply-adds.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn erf8(z: __m256) -> __m256 {
    // SAFETY: register arithmetic only; the caller guarantees AVX2 and FMA.
    unsafe {
        let set = _mm256_set1_ps;
        let sign = _mm256_and_ps(z, set(-0.0));
        let a = _mm256_andnot_ps(set(-0.0), z);
        let t = _mm256_div_ps(set(1.0), _mm256_fmadd_ps(set(0.327_591_1), a, set(1.0)));
        let mut r = _mm256_fmadd_ps(set(1.061_405_4), t, set(-1.453_152));
        r = _mm256_fmadd_ps(r, t, set(1.421_413_8));
        r = _mm256_fmadd_ps(r, t, set(-0.284_496_74));
        r = _mm256_fmadd_ps(r, t, set(0.254_829_6));
        let e = exp8(_mm256_mul_ps(_mm256_xor_ps(a, set(-0.0)), a));
        _mm256_or_ps(_mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, set(1.0)), sign)
    }
}

/// [`erf8`] on sixteen lanes: the same operations, so the same bits in every lane.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn erf16(z: __m512) -> __m512 {
    // SAFETY: register arithmetic only; the caller guarantees AVX-512 F.
    unsafe {
        let set = _mm512_set1_ps;
        let sign_bit = _mm512_set1_epi32(i32::MIN);
        let sign = _mm512_and_si512(_mm512_castps_si512(z), sign_bit);
        let a = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, _mm512_castps_si512(z)));
        let t = _mm512_div_ps(set(1.0), _mm512_fmadd_ps(set(0.327_591_1), a, set(1.0)));
        let mut r = _mm512_fmadd_ps(set(1.061_405_4), t, set(-1.453_152));
        r = _mm512_fmadd_ps(r, t, set(1.421_413_8));
        r = _mm512_fmadd_ps(r, t, set(-0.284_496_74));
        r = _mm512_fmadd_ps(r, t, set(0.254_829_6));
        let minus_a = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), sign_bit));
        let e = exp16(_mm512_mul_ps(minus_a, a));
        let erf = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, set(1.0));
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf), sign))
    }
}

/// [`exp`] on eight lanes, its polynomial in fused multiply-adds.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register arithmetic only; the caller guarantees AVX2 and FMA.
    unsafe {
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
}

/// [`exp8`] on sixteen lanes: the same operations, so the same bits in every lane.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: register arithmetic only; the caller guarantees AVX-512 F.
    unsafe {
        let set = _mm512_set1_ps;
        let clamped = _mm512_max_ps(x, set(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
            clamped,
            set(std::f32::consts::LOG2_E),
            set(0.5),
        ));
        let r = _mm512_fmadd_ps(n, set(2.121_944_4e-4), _mm512_fnmadd_ps(n, set(0.693_359_4), clamped));
        let mut p = _mm512_fmadd_ps(set(1.987_569_1e-4), r, set(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, set(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, set(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, set(0.166_666_65));
        p = _mm512_fmadd_ps(p, r, set(0.5));
        let y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, set(1.0)));
        let biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
        let scaled = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased)));
        // zero where x < -87, as exp8's mask
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, set(-87.0)), scaled)
    }
}

/// [`exp_and_sum_avx2`] on sixteen lanes through [`exp16`]: the same exponentials, their sum
/// added in another order.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_and_sum_avx512(row: &mut [f32], scale: f32, max: f32) -> f32 {
    // SAFETY: the features, by the caller's contract; every load and store is within a
    // 32-element chunk of the row.
    unsafe {
        let (scale16, max16) = (_mm512_set1_ps(scale), _mm512_set1_ps(max));
        let mut sums = [_mm512_setzero_ps(); 2];
        let mut chunks = row.chunks_exact_mut(32);
        for chunk in &mut chunks {
            for (half, sum) in sums.iter_mut().enumerate() {
                let at = chunk.as_mut_ptr().add(16 * half);
                let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(at), scale16, max16));
                _mm512_storeu_ps(at, e);
                *sum = _mm512_add_ps(*sum, e);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1])) + exp_and_sum_avx2(chunks.into_remainder(), scale, max)
    }
}

/// The sum of a register's eight lanes.
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn horizontal_sum(v: __m256) -> f32 {
    // SAFETY: register arithmetic only; the caller guarantees AVX.
    unsafe {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
    }
}

/// Σ f(x) over `row` in 8 independent lanes, which the compiler vectorizes.
#[inline(always)]
pub(crate) fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
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

/// x ← exp(x − `max`) over the row, in place; returns the sum.
pub(crate) fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features exp_shifted_avx2 is compiled for.
        Isa::Avx2Fma(_) => unsafe { exp_shifted_avx2(row, max) },
        _ => exp_and_sum(row, 1.0, max),
    }
}

/// [`exp_shifted`] through [`exp8`].
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) -> f32 {
    // SAFETY: the features, by the caller's contract.
    unsafe { exp_and_sum_avx2(row, 1.0, max) }
}

/// [`exp_and_sum`] through [`exp8`].
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_and_sum_avx2(row: &mut [f32], scale: f32, max: f32) -> f32 {
    // SAFETY: the features, by the caller's contract; every load and store is within a
    // 16-element chunk of the row.
    unsafe {
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
}

/// x ← exp(`scale`·x − `max`) over the row, in place; returns the sum, in 8 lanes.
#[inline(always)]
pub(crate) fn exp_and_sum(row: &mut [f32], scale: f32, max: f32) -> f32 {
    const LANES: usize = 8;
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            chunk[lane] = exp(chunk[lane] * scale - max);
            sums[lane] += chunk[lane];
        }
    }
    let mut tail_sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x * scale - max);
        tail_sum += *x;
    }
    sums.iter().sum::<f32>() + tail_sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

    #[test]
    fn exp_is_within_two_ulp() {
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 3.3e-4;
            let (ours, exact) = (exp(x) as f64, (x as f64).exp());
            assert!(((ours - exact) / exact).abs() < 2.5e-7, "exp({x}) = {ours}, exact {exact}");
        }
    }

    /// The shifted exponentials and their sum on each path, against f64.
    #[test]
    fn exp_shifted_matches_the_exact_sum() {
        let row: Vec<f32> = (0..77).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // from the f32 differences, as the kernel takes them
        let exact: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
        for isa in available() {
            let mut out = row.clone();
            let sum = with_isa(isa, || exp_shifted(&mut out, max));
            assert!(((sum as f64 - exact) / exact).abs() < 1e-6, "{isa:?}: {sum} against {exact}");
            for (&x, &e) in row.iter().zip(&out) {
                let expected = ((x - max) as f64).exp();
                assert!((e as f64 - expected).abs() <= 2.5e-7 * expected, "{isa:?}: exp({x} - {max})");
            }
        }
    }
}
