//! Products of a few rows (decoding) for bf16 models multiplying in bf16: inputs rounded to bf16
//! against bf16 weight rows, on AVX512-BF16's dot-product instruction (32 products per
//! instruction, summed in f32), each weight row read once from where it is stored. Decoding is
//! bound by reading the weights; widening them to f32 first costs more instructions than the
//! memory allows on these CPUs.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

#[cfg(target_arch = "x86_64")]
use super::dispatch::{isa, Isa};

/// Proof that this CPU has AVX-512 (F, BW) and AVX512-BF16: only [`Avx512Bf16::detect`] makes
/// one, so code holding it may call this module's `#[target_feature]` kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Bf16(());

impl Avx512Bf16 {
    /// The proof, where the CPU has the features and the portable kernels are not forced.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if matches!(isa(), Isa::Avx2Fma(_))
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
        {
            return Some(Self(()));
        }
        None
    }
}

/// Input rows per register tile of [`rows_times_weights`].
const ROW_TILE: usize = 8;

/// `outs[j·m + i] += xs[i]·w[j]` for every input row i of `xs` [m, k] and weight row j of `w`
/// [rows, k] (`outs` is [rows, m], the transposed layout of the linear layer's few-row kernels).
pub(crate) fn rows_times_weights(proof: Avx512Bf16, xs: &[bf16], m: usize, k: usize, w: &[bf16], outs: &mut [f32]) {
    let _ = proof;
    assert!(xs.len() >= m * k && outs.len() >= w.len() / k.max(1) * m, "bf16 few rows: shapes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the proof shows the CPU has the features; the lengths are checked above.
    unsafe {
        rows_times_weights_avx512(xs, m, k, w, outs)
    }
}

/// # Safety
/// The CPU must have AVX512F, AVX512BW and AVX512-BF16; `xs` holds m·k values and `outs`
/// m per weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn rows_times_weights_avx512(xs: &[bf16], m: usize, k: usize, w: &[bf16], outs: &mut [f32]) {
    for (weights, out) in w.chunks_exact(k).zip(outs.chunks_mut(m)) {
        for first in (0..m).step_by(ROW_TILE) {
            let (x, out) = (&xs[first * k..], &mut out[first..]);
            // SAFETY: rows first.. of xs and out, within their lengths; the features, by the
            // caller's contract. A tile of a constant number of rows keeps its sums in registers.
            unsafe {
                match m - first {
                    1 => tile::<1>(x, k, weights, out),
                    2 => tile::<2>(x, k, weights, out),
                    3 => tile::<3>(x, k, weights, out),
                    4 => tile::<4>(x, k, weights, out),
                    5 => tile::<5>(x, k, weights, out),
                    6 => tile::<6>(x, k, weights, out),
                    7 => tile::<7>(x, k, weights, out),
                    _ => tile::<ROW_TILE>(x, k, weights, out),
                }
            }
        }
    }
}

/// `out[r] += x[r]·weights` for R input rows of k values.
///
/// # Safety
/// As [`rows_times_weights_avx512`]'s, for R rows of `x` and of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const R: usize>(x: &[bf16], k: usize, weights: &[bf16], out: &mut [f32]) {
    let (full, rest) = (k / 32, k % 32);
    let tail_mask: __mmask32 = if rest == 0 { 0 } else { (1u32 << rest) - 1 };
    let (xp, wp) = (x.as_ptr(), weights.as_ptr());
    // SAFETY: every load reads 32 values (or the masked tail) within a row of k values; the
    // caller's contract covers R rows; the features, by the caller's contract.
    unsafe {
        let load = |at: *const bf16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(at.cast())) };
        let mut acc = [_mm512_setzero_ps(); R];
        for chunk in 0..full {
            let wv = load(wp.add(chunk * 32));
            for (r, sum) in acc.iter_mut().enumerate() {
                *sum = _mm512_dpbf16_ps(*sum, load(xp.add(r * k + chunk * 32)), wv);
            }
        }
        if rest > 0 {
            let load_tail = |at: *const bf16| -> __m512bh {
                std::mem::transmute(_mm512_maskz_loadu_epi16(tail_mask, at.add(full * 32).cast()))
            };
            let wv = load_tail(wp);
            for (r, sum) in acc.iter_mut().enumerate() {
                *sum = _mm512_dpbf16_ps(*sum, load_tail(xp.add(r * k)), wv);
            }
        }
        for (r, sum) in acc.iter().enumerate() {
            out[r] += _mm512_reduce_add_ps(*sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_rows_equal_the_exact_products_of_the_bf16_values() {
        let Some(proof) = Avx512Bf16::detect() else {
            eprintln!("no AVX512-BF16 here: skipped");
            return;
        };
        // k with a masked tail and without; m across a tile boundary
        for (m, k) in [(1, 70), (11, 64), (3, 768 + 5)] {
            let values = |len: usize, seed: usize| -> Vec<bf16> {
                (0..len).map(|i| bf16::from_f32((((i * 7919 + seed) % 1000) as f32 - 500.0) / 250.0)).collect()
            };
            let (xs, w) = (values(m * k, 3), values(5 * k, 11));
            let mut outs = vec![1f32; 5 * m];
            rows_times_weights(proof, &xs, m, k, &w, &mut outs);
            for j in 0..5 {
                for i in 0..m {
                    let exact: f64 = (0..k).map(|p| xs[i * k + p].to_f64() * w[j * k + p].to_f64()).sum();
                    let got = outs[j * m + i] as f64;
                    assert!((got - 1.0 - exact).abs() < 1e-3, "{m}x{k}: ({i}, {j}) {got} vs 1 + {exact}");
                }
            }
        }
    }
}
