//! The backward passes of the kernels a trained model's forward runs (a linear layer, LayerNorm,
//! the exact GELU, the vision tower's packed attention), over contiguous f32 slices on all
//! threads: what candle's autograd calls for the ops in [`crate::ops`] when it differentiates a
//! loss (see `training`). Each takes the forward's inputs and the output's gradient `dy`.

use rayon::prelude::*;

use super::blas::{matmul, Strided};
use super::math::{erf, exp};

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
    assert!(x.len() == m * k && w.len() == n * k && dy.len() == m * n, "linear backward: shapes");
    let parallelism = parallelism();
    let dx = want_dx.then(|| {
        let mut dx = vec![0f32; m * k];
        // SAFETY: dy [m, n] and W [n, k] row-major, dx [m, k] row-major, all of those lengths.
        unsafe {
            let out = Strided { ptr: dx.as_mut_ptr(), row: k as isize, col: 1 };
            let a = Strided { ptr: dy.as_ptr(), row: n as isize, col: 1 };
            let b = Strided { ptr: w.as_ptr(), row: k as isize, col: 1 };
            matmul((m, k, n), out, false, a, b, parallelism);
        }
        dx
    });
    let dw = want_dw.then(|| {
        let mut dw = vec![0f32; n * k];
        // SAFETY: dyᵀ [n, m] read from dy [m, n] row-major, x [m, k] row-major, dW [n, k]
        // row-major.
        unsafe {
            let out = Strided { ptr: dw.as_mut_ptr(), row: k as isize, col: 1 };
            let a = Strided { ptr: dy.as_ptr(), row: 1, col: n as isize };
            let b = Strided { ptr: x.as_ptr(), row: k as isize, col: 1 };
            matmul((n, k, m), out, false, a, b, parallelism);
        }
        dw
    });
    let db = column_sums(dy, n);
    (dx, dw, db)
}

/// The sum of the rows of `values` [rows, width].
fn column_sums(values: &[f32], width: usize) -> Vec<f32> {
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
    let d = weight.len();
    let mut dx = vec![0f32; x.len()];
    let (dweight, dbias) = dx
        .par_chunks_mut(d * ROWS)
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
                    dx[i] = (rstd * (g - mean_g - normed[i] as f64 * mean_gx)) as f32;
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
        );
    (dx, dweight, dbias)
}

/// The exact GELU's `dx = dy·(Φ(x) + x·φ(x))`.
pub(crate) fn gelu(x: &[f32], dy: &[f32]) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)).for_each(|((dx, x), dy)| {
        // as PyTorch's CPU kernel: in f32, the density as exp(-x²/2)·(1/√(2π))
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = exp(-0.5 * x * x) * INV_SQRT_2PI;
            *dx = dy * (cdf + x * pdf);
        }
    });
    dx
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
