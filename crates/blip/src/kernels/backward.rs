//! The backward passes of the kernels a trained model's forward runs (a linear layer, LayerNorm,
//! the exact GELU, the vision tower's packed attention), over contiguous f32 slices on all
//! threads: what candle's autograd calls for the ops in [`crate::ops`] when it differentiates a
//! loss (see `training`). Each takes the forward's inputs and the output's gradient `dy`.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blas::{matmul, Strided};
use super::dispatch::{isa, Isa};
use super::math::{erf, exp};
#[cfg(target_arch = "x86_64")]
use super::math::{erf16, erf8, exp16, exp8};

/// Rows per parallel task in the row-wise kernels.
const ROWS: usize = 16;

/// `y = x·Wᵀ + b` with x [m, k], W [n, k]: `dx = dy·W` [m, k] and `dW = dyᵀ·x` [n, k] (each
/// when wanted: `(dx, dW)`), `db = Σ_rows dy` [n].
pub(crate) fn linear(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (m, n, k): (usize, usize, usize),
    (want_dx, want_dw): (bool, bool),
) -> (Option<Vec<f32>>, Option<Vec<f32>>, Vec<f32>) {
    let dx = want_dx.then(|| {
        let mut dx = vec![0f32; m * k];
        input_gradient(w, dy, (m, n, k), &mut dx, false);
        dx
    });
    let dw = want_dw.then(|| weight_gradient(x, dy, (m, n, k)));
    let db = column_sums(dy, n);
    (dx, dw, db)
}

/// A linear layer's `dx = dy·W` [m, k] (W [n, k], dy [m, n]) written into `dx`, or added to it
/// (`accumulate`).
pub(crate) fn input_gradient(
    w: &[f32],
    dy: &[f32],
    (m, n, k): (usize, usize, usize),
    dx: &mut [f32],
    accumulate: bool,
) {
    assert!(w.len() == n * k && dy.len() == m * n && dx.len() == m * k, "linear backward: shapes");
    // SAFETY: dy [m, n] and W [n, k] row-major, dx [m, k] row-major, all of those lengths.
    unsafe {
        let out = Strided { ptr: dx.as_mut_ptr(), row: k as isize, col: 1 };
        let a = Strided { ptr: dy.as_ptr(), row: n as isize, col: 1 };
        let b = Strided { ptr: w.as_ptr(), row: k as isize, col: 1 };
        matmul((m, k, n), out, accumulate, a, b, parallelism());
    }
}

/// A linear layer's `dW = dyᵀ·x` [n, k] (x [m, k], dy [m, n]).
pub(crate) fn weight_gradient(x: &[f32], dy: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    assert!(x.len() == m * k && dy.len() == m * n, "linear backward: shapes");
    if m == 0 {
        return vec![0f32; n * k];
    }
    let mut dw = Vec::with_capacity(n * k);
    // SAFETY: dyᵀ [n, m] read from dy [m, n] row-major, x [m, k] row-major, dW [n, k] row-major
    // in the vector's capacity; the product writes every element (no accumulation), so the
    // length may then be set.
    unsafe {
        let out = Strided { ptr: dw.as_mut_ptr(), row: k as isize, col: 1 };
        let a = Strided { ptr: dy.as_ptr(), row: 1, col: n as isize };
        let b = Strided { ptr: x.as_ptr(), row: k as isize, col: 1 };
        matmul((n, k, m), out, false, a, b, parallelism());
        dw.set_len(n * k);
    }
    dw
}

/// The sum of the rows of `values` [rows, width].
pub(crate) fn column_sums(values: &[f32], width: usize) -> Vec<f32> {
    values
        .par_chunks(width * ROWS * 8)
        .map(|block| {
            let mut sums = vec![0f32; width];
            for row in block.chunks_exact(width) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        })
        .reduce(
            || vec![0f32; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// LayerNorm over rows of `x` [rows, d] with `weight` [d]: `dx`, `dweight`, `dbias` from `dy`,
/// the mean and the reciprocal deviation recomputed per row:
/// `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = dy·weight`, `x̂ = (x − mean)·rstd`.
pub(crate) fn layer_norm(x: &[f32], weight: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let (dweight, dbias) = layer_norm_into(x, weight, dy, eps, &mut dx);
    (dx, dweight, dbias)
}

/// [`layer_norm`] with `dx` added to `into` (a residual stream's gradient): `(dweight, dbias)`.
pub(crate) fn layer_norm_into(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    eps: f32,
    into: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let d = weight.len();
    assert!(x.len() == dy.len() && x.len() == into.len() && x.len().is_multiple_of(d), "layer norm backward: shapes");
    into.par_chunks_mut(d * ROWS)
        .zip(x.par_chunks(d * ROWS))
        .zip(dy.par_chunks(d * ROWS))
        .map(|((dx, x), dy)| {
            let (mut dweight, mut dbias) = (vec![0f32; d], vec![0f32; d]);
            let mut normed = vec![0f32; d];
            for ((dx, x), dy) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(dy.chunks_exact(d)) {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let variance = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (variance + eps as f64).sqrt();
                let (mut mean_g, mut mean_gx) = (0f64, 0f64);
                for i in 0..d {
                    normed[i] = ((x[i] as f64 - mean) * rstd) as f32;
                    let g = (dy[i] * weight[i]) as f64;
                    mean_g += g;
                    mean_gx += g * normed[i] as f64;
                    dweight[i] += dy[i] * normed[i];
                    dbias[i] += dy[i];
                }
                let (mean_g, mean_gx) = (mean_g / d as f64, mean_gx / d as f64);
                for i in 0..d {
                    let g = (dy[i] * weight[i]) as f64;
                    dx[i] += (rstd * (g - mean_g - normed[i] as f64 * mean_gx)) as f32;
                }
            }
            (dweight, dbias)
        })
        .reduce(
            || (vec![0f32; d], vec![0f32; d]),
            |(mut w, mut b), (w2, b2)| {
                w.iter_mut().zip(&w2).for_each(|(x, y)| *x += y);
                b.iter_mut().zip(&b2).for_each(|(x, y)| *x += y);
                (w, b)
            },
        )
}

/// The exact GELU's `dx = dy·(Φ(x) + x·φ(x))`.
pub(crate) fn gelu(x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = dy.to_vec();
    gelu_in_place(x, &mut dx);
    dx
}

/// [`gelu`] in place: `dy` becomes `dx`; on the widest instruction set this process uses (the
/// vector versions fuse multiply-adds, so they differ from the portable one in the last bits).
pub(crate) fn gelu_in_place(x: &[f32], dy: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    assert_eq!(x.len(), dy.len(), "gelu backward: shapes");
    dy.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(dy, x)| match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 proof shows the features gelu_gradient_avx512 is compiled for.
        Isa::Avx2Fma(proof) if proof.avx512().is_some() => unsafe { gelu_gradient_avx512(x, dy) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma proves the features gelu_gradient_avx2 is compiled for.
        Isa::Avx2Fma(_) => unsafe { gelu_gradient_avx2(x, dy) },
        _ => gelu_gradient_lanes(x, dy),
    });
}

/// As PyTorch's CPU kernel computes it, in f32: `Φ(x) = ½(1 + erf(x/√2))`, the density as
/// `exp(-x²/2)·(1/√(2π))`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

fn gelu_gradient_lanes(x: &[f32], dy: &mut [f32]) {
    for (g, &x) in dy.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = exp(-0.5 * x * x) * INV_SQRT_2PI;
        *g *= cdf + x * pdf;
    }
}

/// [`gelu_gradient_lanes`] eight lanes at a time.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_gradient_avx2(x: &[f32], dy: &mut [f32]) {
    let mut chunks = dy.chunks_exact_mut(8);
    let mut xs = x.chunks_exact(8);
    for (g, x) in (&mut chunks).zip(&mut xs) {
        // SAFETY: eight elements each way within the chunks; the features, by the caller's
        // contract.
        unsafe {
            let set = _mm256_set1_ps;
            let x = _mm256_loadu_ps(x.as_ptr());
            let cdf = _mm256_fmadd_ps(set(0.5), erf8(_mm256_mul_ps(x, set(std::f32::consts::FRAC_1_SQRT_2))), set(0.5));
            let pdf = _mm256_mul_ps(exp8(_mm256_mul_ps(_mm256_mul_ps(set(-0.5), x), x)), set(INV_SQRT_2PI));
            let factor = _mm256_fmadd_ps(x, pdf, cdf);
            _mm256_storeu_ps(g.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(g.as_ptr()), factor));
        }
    }
    gelu_gradient_lanes(xs.remainder(), chunks.into_remainder());
}

/// [`gelu_gradient_avx2`]'s operations on sixteen lanes.
///
/// # Safety
/// The CPU must have AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn gelu_gradient_avx512(x: &[f32], dy: &mut [f32]) {
    let mut chunks = dy.chunks_exact_mut(16);
    let mut xs = x.chunks_exact(16);
    for (g, x) in (&mut chunks).zip(&mut xs) {
        // SAFETY: sixteen elements each way within the chunks; the features, by the caller's
        // contract.
        unsafe {
            let set = _mm512_set1_ps;
            let x = _mm512_loadu_ps(x.as_ptr());
            let cdf =
                _mm512_fmadd_ps(set(0.5), erf16(_mm512_mul_ps(x, set(std::f32::consts::FRAC_1_SQRT_2))), set(0.5));
            let pdf = _mm512_mul_ps(exp16(_mm512_mul_ps(_mm512_mul_ps(set(-0.5), x), x)), set(INV_SQRT_2PI));
            let factor = _mm512_fmadd_ps(x, pdf, cdf);
            _mm512_storeu_ps(g.as_mut_ptr(), _mm512_mul_ps(_mm512_loadu_ps(g.as_ptr()), factor));
        }
    }
    // SAFETY: the features, by the caller's contract.
    unsafe { gelu_gradient_avx2(xs.remainder(), chunks.into_remainder()) }
}

/// The vision tower's self-attention over packed `qkv` [b, t, 3, heads, hd]: from the context's
/// gradient `dy` [b, t, heads, hd], the gradient of `qkv`, each (image, head) on its own, the
/// probabilities recomputed (flash-attention's trade: no [t, t] matrix kept between passes):
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dP∘P))·scale`, `dQ = dS·K`, `dK = dSᵀ·Q`.
pub(crate) fn attention_packed(
    qkv: &[f32],
    dy: &[f32],
    (b, t, heads, hd): (usize, usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let width = heads * hd;
    assert!(qkv.len() == b * t * 3 * width && dy.len() == b * t * width, "attention backward: shapes");
    let mut dqkv = vec![0f32; qkv.len()];
    let pairs: Vec<(usize, usize)> = (0..b).flat_map(|i| (0..heads).map(move |h| (i, h))).collect();
    // each task writes the disjoint columns of one (image, head): shared as an address
    let out = dqkv.as_mut_ptr() as usize;
    pairs.par_iter().for_each(|&(image, head)| {
        let row = (3 * width) as isize;
        let base = image * t * 3 * width + head * hd;
        let (q, k, v) = (base, base + width, base + 2 * width);
        let o = image * t * width + head * hd;
        let mut probs = vec![0f32; t * t];
        let mut dprobs = vec![0f32; t * t];
        let none = gemm::Parallelism::None;
        // SAFETY: every view lies within qkv [b, t, 3·width], dy [b, t, width] or the task's own
        // [t, t] buffers; the writes go to the columns of this (image, head) in dqkv, which no
        // other task touches.
        unsafe {
            let out = out as *mut f32;
            let at = |offset: usize| qkv.as_ptr().add(offset);
            // S = Q·Kᵀ, then P = softmax(scale·S) row by row
            matmul(
                (t, t, hd),
                Strided { ptr: probs.as_mut_ptr(), row: t as isize, col: 1 },
                false,
                Strided { ptr: at(q), row, col: 1 },
                Strided { ptr: at(k), row: 1, col: row },
                none,
            );
            super::elementwise::softmax_rows(&mut probs, t, scale);
            // dV = Pᵀ·dO
            matmul(
                (t, hd, t),
                Strided { ptr: out.add(v), row, col: 1 },
                false,
                Strided { ptr: probs.as_ptr(), row: 1, col: t as isize },
                Strided { ptr: dy.as_ptr().add(o), row: width as isize, col: 1 },
                none,
            );
            // dP = dO·Vᵀ
            matmul(
                (t, t, hd),
                Strided { ptr: dprobs.as_mut_ptr(), row: t as isize, col: 1 },
                false,
                Strided { ptr: dy.as_ptr().add(o), row: width as isize, col: 1 },
                Strided { ptr: at(v), row: 1, col: row },
                none,
            );
            // dS = P∘(dP − rowsum(dP∘P))·scale, in place of dP
            for (dp, p) in dprobs.chunks_exact_mut(t).zip(probs.chunks_exact(t)) {
                let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
                dp.iter_mut().zip(p).for_each(|(g, &p)| *g = p * (*g - dot) * scale);
            }
            // dQ = dS·K, dK = dSᵀ·Q
            matmul(
                (t, hd, t),
                Strided { ptr: out.add(q), row, col: 1 },
                false,
                Strided { ptr: dprobs.as_ptr(), row: t as isize, col: 1 },
                Strided { ptr: at(k), row, col: 1 },
                none,
            );
            matmul(
                (t, hd, t),
                Strided { ptr: out.add(k), row, col: 1 },
                false,
                Strided { ptr: dprobs.as_ptr(), row: 1, col: t as isize },
                Strided { ptr: at(q), row, col: 1 },
                none,
            );
        }
    });
    dqkv
}

fn parallelism() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

    /// The GELU's gradient on every instruction set this CPU has, against the f64 formula:
    /// within the erf approximation's error (PyTorch's), relative to the upstream gradient.
    #[test]
    fn gelu_gradient_matches_the_formula_on_every_instruction_set() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) / 50.0).collect();
        let dy: Vec<f32> = (0..1003).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for isa in available() {
            let ours = with_isa(isa, || gelu(&x, &dy));
            for ((&x, &g), &got) in x.iter().zip(&dy).zip(&ours) {
                let x64 = x as f64;
                let cdf = 0.5 * (1.0 + libm_erf(x64 / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let exact = g as f64 * (cdf + x64 * pdf);
                assert!((got as f64 - exact).abs() <= 1e-6 * g as f64, "{isa:?} at {x}: {got} vs {exact}");
            }
        }
    }

    /// erf in f64 (Abramowitz & Stegun 7.1.28's refinement is not needed: a series to 1e-15).
    fn libm_erf(x: f64) -> f64 {
        // erf(x) = 2/√π · Σ (-1)ⁿ x^(2n+1) / (n!(2n+1)) for |x| ≤ 3, 1 − erfc's continued
        // fraction beyond
        if x.abs() > 3.0 {
            let (a, mut f) = (x.abs(), 0.0);
            for n in (1..60).rev() {
                f = (n as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            return (1.0 - erfc).copysign(x);
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
