//! Weight elements (f32, f16, bf16) widened to f32 as the kernels load them, and activations
//! rounded to bf16 where a bf16 product consumes them.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::dispatch::{isa, Isa};

/// A weight element the dot products widen to f32 as they load it.
pub(crate) trait Widen: Copy {
    fn widen(self) -> f32;

    /// Eight elements from `src`, widened; for kernels compiled with AVX2 (and F16C).
    ///
    /// # Safety
    /// Eight elements must be readable at `src`, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen8(src: *const Self) -> __m256;

    /// Sixteen elements from `src`, widened; for kernels compiled with AVX-512 (F, BW).
    ///
    /// # Safety
    /// Sixteen elements must be readable at `src`, and the CPU must have AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen16(src: *const Self) -> __m512;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    /// # Safety
    /// As [`Widen::widen8`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(src: *const Self) -> __m256 {
        // SAFETY: eight readable elements and AVX, by the caller's contract.
        unsafe { _mm256_loadu_ps(src) }
    }

    /// # Safety
    /// As [`Widen::widen16`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(src: *const Self) -> __m512 {
        // SAFETY: sixteen readable elements and AVX-512 F, by the caller's contract.
        unsafe { _mm512_loadu_ps(src) }
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    /// # Safety
    /// As [`Widen::widen8`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(src: *const Self) -> __m256 {
        // SAFETY: eight readable elements (16 bytes) and F16C, by the caller's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src.cast())) }
    }

    /// # Safety
    /// As [`Widen::widen16`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(src: *const Self) -> __m512 {
        // SAFETY: sixteen readable elements (32 bytes) and AVX-512 F, by the caller's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(src.cast())) }
    }
}

impl Widen for half::bf16 {
    /// bf16 is the top half of an f32: a shift the compiler vectorizes.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    /// # Safety
    /// As [`Widen::widen8`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(src: *const Self) -> __m256 {
        // SAFETY: eight readable elements (16 bytes) and AVX2, by the caller's contract.
        unsafe {
            let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(src.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
        }
    }

    /// # Safety
    /// As [`Widen::widen16`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(src: *const Self) -> __m512 {
        // SAFETY: sixteen readable elements (32 bytes) and AVX-512 F, by the caller's contract.
        unsafe {
            let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(src.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
        }
    }
}

/// Widens bf16 values to f32 (`dst` as long as `src`).
pub(crate) fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features widen_bf16_avx2 is compiled for.
        Isa::Avx2Fma(_) => unsafe { widen_bf16_avx2(src, dst) },
        _ => widen_lanes(src, dst),
    }
}

/// [`widen_lanes`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_bf16_avx2(src: &[half::bf16], dst: &mut [f32]) {
    widen_lanes(src, dst)
}

#[inline(always)]
fn widen_lanes<W: Widen>(src: &[W], dst: &mut [f32]) {
    dst.iter_mut().zip(src).for_each(|(f, w)| *f = w.widen());
}

/// Rounds f32 values to bf16 to nearest, ties to even, as `half::bf16::from_f32` does, and
/// PyTorch for numbers (`dst` as long as `src`); NaNs stay NaNs, with their sign and top payload
/// (PyTorch makes every NaN 0x7fc0).
pub(crate) fn narrow_bf16(src: &[f32], dst: &mut [half::bf16]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 proof shows the features narrow_bf16_avx512 is compiled for.
        Isa::Avx2Fma(proof) if proof.avx512().is_some() => unsafe { narrow_bf16_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features narrow_bf16_avx2 is compiled for.
        Isa::Avx2Fma(_) => unsafe { narrow_bf16_avx2(src, dst) },
        _ => narrow_lanes(src, dst),
    }
}

/// Values a bf16 product takes rounded: f32 ones are rounded as [`narrow_bf16`] rounds, bf16 ones
/// (rounded so by the product that wrote them) are copied.
pub(crate) trait RoundsToBf16: Copy + Send + Sync + 'static {
    /// Writes `src` rounded to bf16 into `dst` (as long as `src`).
    fn round_into(src: &[Self], dst: &mut [half::bf16]);
}

impl RoundsToBf16 for f32 {
    fn round_into(src: &[f32], dst: &mut [half::bf16]) {
        narrow_bf16(src, dst)
    }
}

impl RoundsToBf16 for half::bf16 {
    fn round_into(src: &[half::bf16], dst: &mut [half::bf16]) {
        dst.copy_from_slice(src)
    }
}

/// [`narrow_lanes`] compiled for AVX-512 (the same integer arithmetic, sixteen lanes).
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn narrow_bf16_avx512(src: &[f32], dst: &mut [half::bf16]) {
    narrow_lanes(src, dst)
}

/// [`narrow_lanes`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn narrow_bf16_avx2(src: &[f32], dst: &mut [half::bf16]) {
    narrow_lanes(src, dst)
}

/// Integer arithmetic on the bits, branch-free, so that the compiler vectorizes it.
#[inline(always)]
fn narrow_lanes(src: &[f32], dst: &mut [half::bf16]) {
    dst.iter_mut().zip(src).for_each(|(d, &x)| *d = round_to_bf16(x));
}

/// `src`·`factor` rounded to bf16 as [`narrow_bf16`] rounds, in one pass (inlined into the
/// caller's instruction set).
#[inline(always)]
pub(crate) fn narrow_scaled_bf16(src: &[f32], factor: f32, dst: &mut [half::bf16]) {
    dst.iter_mut().zip(src).for_each(|(d, &x)| *d = round_to_bf16(x * factor));
}

/// One value to nearest, ties to even.
#[inline(always)]
fn round_to_bf16(x: f32) -> half::bf16 {
    {
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        // a NaN keeps its sign and top payload bits, made quiet so that rounding cannot carry
        // it into an infinity
        let nan = (bits >> 16) | 0x40;
        half::bf16::from_bits(if x.is_nan() { nan } else { rounded } as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

    #[test]
    fn bf16_widens_exactly() {
        let src: Vec<half::bf16> = (0..37).map(|i| half::bf16::from_f32(i as f32 * -1.37 + 0.5)).collect();
        for isa in available() {
            let mut dst = vec![0f32; src.len()];
            with_isa(isa, || widen_bf16(&src, &mut dst));
            assert!(dst.iter().zip(&src).all(|(&d, s)| d == s.to_f32()), "{isa:?}");
        }
    }

    #[test]
    fn f32_narrows_to_nearest_even_as_half_does() {
        let mut src: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.7312).sin() * 10f32.powi(i % 9 - 4)).collect();
        // ties both ways, the largest finite values, infinities, zeros, subnormals, NaN
        src.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::MAX, -f32::MAX, f32::INFINITY, f32::NEG_INFINITY]);
        src.extend([0.0, -0.0, 1e-40, -3e-39, f32::MIN_POSITIVE]);
        for isa in available() {
            let mut dst = vec![half::bf16::ZERO; src.len()];
            with_isa(isa, || narrow_bf16(&src, &mut dst));
            for (d, &s) in dst.iter().zip(&src) {
                assert_eq!(d.to_bits(), half::bf16::from_f32(s).to_bits(), "{isa:?}: {s:e}");
            }
            let mut nan = [half::bf16::ZERO];
            narrow_bf16(&[f32::NAN], &mut nan);
            assert!(nan[0].is_nan());
        }
    }
}
