//! Hand-written CPU kernels over f32 slices, for the steps where candle's generic ops cost more
//! than the arithmetic: dot products, GELU, attention for a few queries. Each is compiled twice,
//! for AVX2+FMA (picked at run time) and for the baseline target; the loops are written in
//! independent lanes so that the compiler vectorizes both.

use rayon::prelude::*;

/// A weight element the dot products widen to f32 as they load it.
pub(crate) trait Widen: Copy {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    /// bf16 is the top half of an f32: a shift the compiler vectorizes.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// The fastest dot product of f32 values with `W` values this CPU runs.
pub(crate) fn dot_kernel<W: Widen>() -> fn(&[f32], &[W]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features dot_avx2 is compiled for are present.
        return |x, w| unsafe { dot_avx2(x, w) };
    }
    dot_lanes::<W, false>
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    dot_lanes::<W, true>(x, w)
}

/// x·w in 32 independent lanes (four AVX registers' worth), which the compiler vectorizes, summed
/// pairwise at the end (attention's 64-long dots make the final sum a large share).
#[inline(always)]
fn dot_lanes<W: Widen, const FMA: bool>(x: &[f32], w: &[W]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (x_chunks, w_chunks) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let tail: f32 = x_chunks.remainder().iter().zip(w_chunks.remainder()).map(|(a, b)| a * b.widen()).sum();
    for (a, b) in x_chunks.zip(w_chunks) {
        for lane in 0..LANES {
            let b = b[lane].widen();
            acc[lane] = if FMA { a[lane].mul_add(b, acc[lane]) } else { acc[lane] + a[lane] * b };
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
    gelu_lanes(data)
}

#[inline(always)]
fn gelu_lanes(data: &mut [f32]) {
    for x in data.iter_mut() {
        *x = *x * 0.5 * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Softmax of `scale`·x over each row of `row_len` values, in place, on all threads.
pub(crate) fn softmax(data: &mut [f32], row_len: usize, scale: f32) {
    let chunk = ((1 << 14) / row_len.max(1) + 1) * row_len;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        data.par_chunks_mut(chunk).for_each(|rows| {
            // SAFETY: the features softmax_avx2 is compiled for are present.
            rows.chunks_mut(row_len).for_each(|row| unsafe { softmax_avx2(row, scale) })
        });
        return;
    }
    data.par_chunks_mut(chunk).for_each(|rows| rows.chunks_mut(row_len).for_each(|row| softmax_row(row, scale)));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32], scale: f32) {
    softmax_row(row, scale)
}

#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    row.iter_mut().for_each(|x| *x = exp(*x * scale - max));
    // one division per row, as PyTorch's vectorized softmax does
    let inverse = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|x| *x *= inverse);
}

/// A matrix operand for [`matmul`]: where element (0, 0) is and the steps between rows and
/// between columns, in elements.
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row: isize,
    pub col: isize,
}

/// `dst = a·b`, or `dst += a·b` when `accumulate`, for a [m, k], b [k, n] and dst [m, n] with
/// any strides: the `gemm` crate's call with the arguments this project uses.
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
/// heads·head_dim]: one task per image and head, each with its own [tokens, tokens] scores
/// (1.3 MB at 577 tokens, cache-resident) and no copies of q, k and v.
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
        let mut scores = vec![0f32; n * n];
        let row = (3 * width) as isize;
        // SAFETY: q, k and v are read within qkv (the last row of v ends at its last element);
        // scores is [n, n]; each task writes only its own head's columns of its own image's rows
        // of out, which no other task touches.
        unsafe {
            let none = gemm::Parallelism::None;
            let key_t = Strided { ptr: k.as_ptr(), row: 1, col: row };
            let query = Strided { ptr: q.as_ptr(), row, col: 1 };
            matmul((n, n, d), Strided { ptr: scores.as_mut_ptr(), row: n as isize, col: 1 }, false, query, key_t, none);
            softmax_rows(&mut scores, n, scale);
            let context = Strided { ptr: out_ptr.at(b * n * width + h * d), row: width as isize, col: 1 };
            let probs = Strided { ptr: scores.as_ptr(), row: n as isize, col: 1 };
            matmul((n, d, n), context, false, probs, Strided { ptr: v.as_ptr(), row, col: 1 }, none);
        }
    });
    out
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
    let y = (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y
    }
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

    #[test]
    fn exp_is_within_two_ulp() {
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 3.3e-4;
            let (ours, exact) = (exp(x) as f64, (x as f64).exp());
            assert!(((ours - exact) / exact).abs() < 2.5e-7, "exp({x}) = {ours}, exact {exact}");
        }
    }
}
