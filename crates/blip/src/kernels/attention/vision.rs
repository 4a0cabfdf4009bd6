//! The vision tower's self-attention, straight from its fused q/k/v projection.

use half::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::combine::CombineTile;
use super::SharedOut;
use crate::kernels::amx::{self, Amx};
use crate::kernels::blas::{matmul, Strided};
use crate::kernels::dispatch::{isa, Isa};
use crate::kernels::elementwise::{softmax_rows, softmax_rows_to_bf16};
#[cfg(target_arch = "x86_64")]
use crate::kernels::math::{exp16, exp8};
use crate::kernels::onednn::{OneDnn, Start, View};
use crate::kernels::widen::{narrow_bf16, RoundsToBf16};

/// Self-attention straight from a fused projection's output `qkv` [batch, tokens, 3, heads,
/// head_dim] (the vision tower's layout) to the context with heads merged [batch, tokens,
/// heads·head_dim], one task per image and head. With AVX2 (and head_dim a multiple of 16)
/// each head runs by blocks of queries in register tiles ([`attend_head_blocked`], or
/// [`attend_head_blocked_avx512`] with AVX-512), faster than sgemm on these k = 64 products and
/// [tokens, tokens] scores; otherwise as sgemm, softmax, sgemm ([`attend_head`]).
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
    let isa = isa();
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let base = b * n * 3 * width + h * d;
        let (q, k, v) = (&qkv[base..], &qkv[base + width..], &qkv[base + 2 * width..]);
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: q, k and v are read within qkv (the last row of v ends at its last element);
            // each task writes only its own head's columns of its own image's rows of out, which
            // no other task touches. Nothing here re-enters rayon, so no other task runs on this
            // thread while it holds its scratch buffer. Isa::Avx2Fma proves the features
            // attend_head_blocked is compiled for, its AVX-512 proof attend_head_blocked_avx512's.
            unsafe {
                let out = out_ptr.at(b * n * width + h * d);
                #[cfg(target_arch = "x86_64")]
                match isa {
                    Isa::Avx2Fma(proof) if proof.avx512().is_some() && d.is_multiple_of(QUERY_BLOCK) => {
                        return attend_head_blocked_avx512(q, k, v, (n, d, 3 * width), scale, scratch, (out, width));
                    }
                    Isa::Avx2Fma(_) if d.is_multiple_of(QUERY_BLOCK) => {
                        return attend_head_blocked(q, k, v, (n, d, 3 * width), scale, scratch, (out, width));
                    }
                    _ => {}
                }
                attend_head(q, k, v, (n, d, 3 * width), scale, scratch, (out, width))
            }
        })
    });
    out
}

/// [`attend_packed`] with bf16 products: q, k and v rounded to bf16, the scores accumulated in
/// f32, softmax in f32, the probabilities rounded to bf16 for the product with v (as PyTorch's
/// bf16 attention does), one single-threaded task per image and head: on AMX tiles by blocks of
/// 16 queries where the CPU has them (heads of 64), else two oneDNN products per head. The context
/// comes as f32, or (`T` = bf16) rounded as `narrow_bf16` rounds: the input of the bf16 product
/// that follows, without an f32 pass between them.
pub(crate) fn attend_packed_bf16<Q: RoundsToBf16, T: ContextOut>(
    onednn: &'static OneDnn,
    qkv: &[Q],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) -> Result<Vec<T>, String> {
    let mut out = vec![T::ZERO; batch * tokens * heads * head_dim];
    attend_packed_bf16_into(onednn, qkv, (batch, tokens, heads, head_dim), scale, &mut out)?;
    Ok(out)
}

/// Where [`attend_packed_bf16`] writes a head's context rows: f32 as they are, or rounded.
pub(crate) trait ContextOut: Send + Sync + Copy + 'static {
    const ZERO: Self;

    /// Writes `context` (d values) at `dst`.
    ///
    /// # Safety
    /// `dst` must hold `context.len()` elements that no other thread writes meanwhile.
    unsafe fn write(context: &[f32], dst: *mut Self);
}

impl ContextOut for f32 {
    const ZERO: Self = 0.0;

    unsafe fn write(context: &[f32], dst: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(context.as_ptr(), dst, context.len()) }
    }
}

impl ContextOut for bf16 {
    const ZERO: Self = bf16::ZERO;

    unsafe fn write(context: &[f32], dst: *mut bf16) {
        // SAFETY: the caller's contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, context.len()) };
        narrow_bf16(context, dst);
    }
}

fn attend_packed_bf16_into<Q: RoundsToBf16, T: ContextOut>(
    onednn: &'static OneDnn,
    qkv: &[Q],
    (batch, tokens, heads, head_dim): (usize, usize, usize, usize),
    scale: f32,
    out: &mut [T],
) -> Result<(), String> {
    let (n, d, width) = (tokens, head_dim, heads * head_dim);
    let row = 3 * width;
    assert_eq!(out.len(), batch * n * width, "attention: the output's size");
    let out_ptr = SharedOut(out.as_mut_ptr());
    if let Some(amx) = Amx::detect().filter(|_| d == amx::HEAD_DIM) {
        // The tiles' kernel rounds q, k and v itself, as it packs them.
        (0..batch * heads).into_par_iter().for_each(|task| {
            let (b, h) = (task / heads, task % heads);
            let input = amx::HeadInput {
                qkv: &qkv[b * n * row..(b + 1) * n * row],
                row,
                columns: [h * d, width + h * d, 2 * width + h * d],
            };
            AMX_SCRATCH.with_borrow_mut(|scratch| {
                amx::attend_head(amx, input, n, scale, scratch, |t, context| {
                    // SAFETY: row t of image b, head h's d columns: within out, and written by
                    // this task alone.
                    unsafe { T::write(context, out_ptr.at((b * n + t) * width + h * d)) };
                })
            });
        });
        return Ok(());
    }
    // Rounded into one dense [n, d] block per image, part (q, k, v) and head: oneDNN's AMX
    // kernels take dense operands only.
    let mut blocks = vec![bf16::ZERO; qkv.len()];
    blocks.par_chunks_mut(n * d).enumerate().for_each(|(block, dst)| {
        let (b, column) = (block / (3 * heads), block % (3 * heads) * d);
        for (dst, src) in dst.chunks_mut(d).zip(qkv[b * n * row..].chunks(row)) {
            Q::round_into(&src[column..column + d], dst);
        }
    });
    let blocks = &blocks;
    (0..batch * heads).into_par_iter().try_for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let head_block = |part: usize| &blocks[((b * 3 + part) * heads + h) * n * d..][..n * d];
        let (q, k, v) = (head_block(0), head_block(1), head_block(2));
        BF16_SCRATCH.with_borrow_mut(|(scores, probabilities, context)| {
            scores.resize(n * n, 0.0);
            probabilities.resize(n * n, bf16::ZERO);
            context.resize(n * d, 0.0);
            onednn.matmul(
                (q, View::matrix(n, d, d)),
                (k, View::transposed(d, n, d)),
                (scores, View::matrix(n, n, n)),
                Start::Zero,
            )?;
            softmax_rows_to_bf16(scores, n, scale, probabilities);
            onednn.matmul(
                (probabilities, View::matrix(n, n, n)),
                (v, View::matrix(n, d, d)),
                (context, View::matrix(n, d, d)),
                Start::Zero,
            )?;
            for (t, context) in context.chunks(d).enumerate() {
                // SAFETY: row t of image b, head h's d columns: within out, and written by this
                // task alone.
                unsafe { T::write(context, out_ptr.at((b * n + t) * width + h * d)) };
            }
            Ok::<_, String>(())
        })
    })
}

thread_local! {
    /// Each thread's buffers for the AMX attention, reused.
    static AMX_SCRATCH: std::cell::RefCell<amx::HeadScratch> = std::cell::RefCell::new(amx::HeadScratch::default());
    /// Each thread's [n, n] scores and probabilities and [n, d] context for
    /// [`attend_packed_bf16`], reused.
    static BF16_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<bf16>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Queries per block of [`attend_head_blocked`]: two AVX2 registers wide (one AVX-512 register).
const QUERY_BLOCK: usize = 16;

/// One head of [`attend_packed`] by blocks of 16 queries: `q`, `k`, `v` [n, d] with rows `row`
/// apart (d a multiple of 16), the context written to `out` [n, d] with rows `out_row` apart.
/// The block's scores are kept transposed, [n, 16] (37 KB at 577 tokens): q·kᵀ writes them in
/// register tiles of 6 keys × 16 queries, softmax's exponentials run down the columns in whole
/// registers, the mixing of v reads each key's 16 weights in order, and each mixed row is then
/// divided by its sum. The operands are contiguous copies: k by groups of 6 keys [d, 6], the
/// block's qᵀ [d, 16], v in panels [n, 16] of 16 columns.
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
    // SAFETY: the scratch slices are sized above; q, k and v rows and out rows lie within their
    // buffers by the caller's contract, and each tile addresses rows and columns within them; the
    // features, by the caller's contract.
    unsafe {
        const B: usize = QUERY_BLOCK;
        const { assert!(B == 16, "exp_columns16 takes blocks of 16 queries") };
        // Every element of the scratch is written before it is read.
        scratch.resize(2 * n * d + d * B + n * B, 0.0);
        let (key_groups, rest) = scratch.split_at_mut(n * d);
        let (value_panels, rest) = rest.split_at_mut(n * d);
        let (queries_t, scores_t) = rest.split_at_mut(d * B);
        pack_key_groups(k, (n, d, row), 6, key_groups);
        for (j, value) in v.chunks(row).take(n).enumerate() {
            for (c, columns) in value[..d].chunks_exact(B).enumerate() {
                value_panels[(c * n + j) * B..][..B].copy_from_slice(columns);
            }
        }
        for first in (0..n).step_by(B) {
            let rows = (n - first).min(B);
            transpose_queries(q, (first, rows, d, row), scale, queries_t);
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
            divide_rows(&inverses[..rows], d, (out.add(first * out_row), out_row));
        }
    }
}

/// The n keys of `k` ([n, d], rows `row` apart) by groups of `group_size` keys, each group
/// transposed to [d, size] (size `group_size`, less in the last group): the coefficients of
/// the score tiles, read in order.
#[cfg(target_arch = "x86_64")]
fn pack_key_groups(k: &[f32], (n, d, row): (usize, usize, usize), group_size: usize, key_groups: &mut [f32]) {
    for (j, key) in k.chunks(row).take(n).enumerate() {
        let group = j / group_size * group_size;
        let size = (n - group).min(group_size);
        for (c, &x) in key[..d].iter().enumerate() {
            key_groups[group * d + c * size + j - group] = x;
        }
    }
}

/// The block of `rows` queries from `first` (of `q`, rows `row` apart) transposed to
/// `queries_t` [d, QUERY_BLOCK], scaled, zeros past the last query. Scaled here rather than in
/// the scores: exact when the scale is a power of two (1/8 at head_dim 64), and one multiply per
/// query element instead of per score.
#[cfg(target_arch = "x86_64")]
fn transpose_queries(
    q: &[f32],
    (first, rows, d, row): (usize, usize, usize, usize),
    scale: f32,
    queries_t: &mut [f32],
) {
    const B: usize = QUERY_BLOCK;
    if rows < B {
        queries_t.fill(0.0);
    }
    for r in 0..rows {
        for (c, &x) in q[(first + r) * row..][..d].iter().enumerate() {
            queries_t[c * B + r] = x * scale;
        }
    }
}

/// Row r of `out` (its first d values; rows `out_row` apart) times `inverses[r]`: the mixed
/// rows divided by their probabilities' sums.
///
/// # Safety
/// The `inverses.len()` rows of d values must lie within `out`'s buffer, written by no other
/// thread meanwhile.
#[cfg(target_arch = "x86_64")]
unsafe fn divide_rows(inverses: &[f32], d: usize, (out, out_row): (*mut f32, usize)) {
    for (r, &inverse) in inverses.iter().enumerate() {
        // SAFETY: row r of d values, by the caller's contract.
        let mixed = unsafe { std::slice::from_raw_parts_mut(out.add(r * out_row), d) };
        mixed.iter_mut().for_each(|x| *x *= inverse);
    }
}

/// Keys per tile of the scores in [`attend_head_blocked_avx512`].
const KEY_GROUP_AVX512: usize = 12;

/// [`attend_head_blocked`] in AVX-512 registers, with the same sums in the same order (so the
/// same bits): the scores in tiles of 12 keys × 16 queries (a register per key), the mixing in
/// tiles of 6 queries × 64 columns of v (four registers per query), read from a contiguous copy
/// of v.
///
/// # Safety
/// As [`attend_head_blocked`]'s, on a CPU with AVX-512 F and BW, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn attend_head_blocked_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (n, d, row): (usize, usize, usize),
    scale: f32,
    scratch: &mut Vec<f32>,
    (out, out_row): (*mut f32, usize),
) {
    // SAFETY: as in attend_head_blocked; the features, by the caller's contract.
    unsafe {
        const B: usize = QUERY_BLOCK;
        const G: usize = KEY_GROUP_AVX512;
        // Every element of the scratch is written before it is read.
        scratch.resize(2 * n * d + d * B + n * B, 0.0);
        let (key_groups, rest) = scratch.split_at_mut(n * d);
        let (values, rest) = rest.split_at_mut(n * d);
        let (queries_t, scores_t) = rest.split_at_mut(d * B);
        pack_key_groups(k, (n, d, row), G, key_groups);
        for (j, value) in v.chunks(row).take(n).enumerate() {
            values[j * d..][..d].copy_from_slice(&value[..d]);
        }
        for first in (0..n).step_by(B) {
            let rows = (n - first).min(B);
            transpose_queries(q, (first, rows, d, row), scale, queries_t);
            for group in (0..n).step_by(G) {
                let size = (n - group).min(G);
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
                run16_rows::<1>(&tile, size);
            }
            let inverses = exp_columns16_avx512(scores_t);
            for group in (0..rows).step_by(6) {
                let queries = (rows - group).min(6);
                let mut e = 0;
                while e < d {
                    let tile = CombineTile {
                        coef: scores_t.as_ptr().add(group),
                        coef_step: B,
                        len: n,
                        w: values.as_ptr().add(e),
                        w_row: d,
                        out: out.add((first + group) * out_row + e),
                        out_row,
                        accumulate: false,
                    };
                    if e + 64 <= d {
                        run16_rows::<4>(&tile, queries);
                        e += 64;
                    } else {
                        run16_rows::<1>(&tile, queries);
                        e += 16;
                    }
                }
            }
            divide_rows(&inverses[..rows], d, (out.add(first * out_row), out_row));
        }
    }
}

/// `tile.run16::<rows, V>()` for 1 ≤ rows ≤ 12 (V + rows·V registers: at V = 4 only up to 6
/// rows are called).
///
/// # Safety
/// As [`CombineTile::run16`]'s.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run16_rows<const V: usize>(tile: &CombineTile<f32>, rows: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        match rows {
            12 => tile.run16::<12, V>(),
            11 => tile.run16::<11, V>(),
            10 => tile.run16::<10, V>(),
            9 => tile.run16::<9, V>(),
            8 => tile.run16::<8, V>(),
            7 => tile.run16::<7, V>(),
            6 => tile.run16::<6, V>(),
            5 => tile.run16::<5, V>(),
            4 => tile.run16::<4, V>(),
            3 => tile.run16::<3, V>(),
            2 => tile.run16::<2, V>(),
            _ => tile.run16::<1, V>(),
        }
    }
}

/// [`exp_columns16`] with the 16 columns in one AVX-512 register (the same bits: exp16 is
/// exp8's operations).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_columns16_avx512(data: &mut [f32]) -> [f32; 16] {
    // SAFETY: every load and store addresses a row of 16, or `inverses`; the features, by the
    // caller's contract.
    unsafe {
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for row in data.chunks_exact(16) {
            max = _mm512_max_ps(max, _mm512_loadu_ps(row.as_ptr()));
        }
        let mut sum = _mm512_setzero_ps();
        for row in data.chunks_exact_mut(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.as_ptr()), max));
            _mm512_storeu_ps(row.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
        let mut inverses = [0f32; 16];
        _mm512_storeu_ps(inverses.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), sum));
        inverses
    }
}

/// The exponentials of softmax down each of the 16 columns of `data` [rows, 16], in place:
/// exp(x − the column's max), two registers a row. Returns each column's 1 / sum, which the
/// caller applies to the 16 mixed rows instead of to every probability.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_columns16(data: &mut [f32]) -> [f32; 16] {
    // SAFETY: every load and store addresses 8 values within a row of 16, or of `inverses`; the
    // features, by the caller's contract.
    unsafe {
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
    // SAFETY: the views of q, kᵀ, the scores, v and out lie within their buffers by the caller's
    // contract ([n, n] scores sized here), and out overlaps none of the others.
    unsafe {
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
}

thread_local! {
    /// [`attend_packed`]'s scratch (scores, and the copies of k and v), per thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}
