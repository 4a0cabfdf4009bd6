//! The decoder's cross-attention straight from the encoder states, without their keys and values.

use rayon::prelude::*;

use half::bf16;

use super::combine::combine_rows;
use super::SharedOut;
use crate::kernels::amx::states::{block_mix, block_scores, PairedQueries, PairedStates, STATE_CHUNK};
use crate::kernels::amx::Amx;
use crate::kernels::few_rows::rows_times_weights;
use crate::kernels::math::{exp, exp_shifted};
use crate::kernels::widen::{narrow_bf16, Widen};

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
///
/// With `tiles` (a bf16 model's states paired for AMX, where `amx::states::takes` the rows), the
/// scores and the mixing are products of bf16 values on the tiles: the queries in the states'
/// space and the (unnormalized) probabilities rounded to bf16, the states read as their pairs.
pub(crate) fn attend_encoder<W: Widen + Sync>(
    q: &[f32],
    (states, tiles): (&[f32], Option<(Amx, &PairedStates)>),
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
    // (on the tiles, parts start at whole chunks of the pairs)
    let part_len = match tiles {
        Some(_) => n.div_ceil(parts_per_image).div_ceil(STATE_CHUNK) * STATE_CHUNK,
        None => n.div_ceil(parts_per_image),
    };
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
            let paired_queries = tiles.map(|_| PairedQueries::new(&queries, rows, width));
            let mut scores = vec![0f32; KEY_BLOCK * rows];
            let mut probs = vec![0f32; rows * KEY_BLOCK];
            let mut rounded_probs = vec![bf16::ZERO; if tiles.is_some() { rows * KEY_BLOCK } else { 0 }];
            for block in (first..end).step_by(KEY_BLOCK) {
                let len = KEY_BLOCK.min(end - block);
                let block_states = &states[(image * n + block) * width..(image * n + block + len) * width];
                // scores [len, rows] (transposed), then probabilities [rows, len]
                match (tiles, &paired_queries) {
                    (Some((proof, paired)), Some(queries)) => {
                        block_scores(proof, paired, (image, block, len), queries, &mut scores);
                    }
                    _ => {
                        scores[..len * rows].fill(0.0);
                        rows_times_weights(&queries, rows, width, block_states, &mut scores[..len * rows]);
                    }
                }
                let scores = &scores[..len * rows];
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
                if let Some((proof, paired)) = tiles {
                    // probabilities [rows, KEY_BLOCK] in bf16, zero past len
                    for (rounded, p) in
                        rounded_probs.chunks_exact_mut(KEY_BLOCK).zip(probs[..rows * len].chunks_exact(len))
                    {
                        narrow_bf16(p, &mut rounded[..len]);
                        rounded[len..].fill(bf16::ZERO);
                    }
                    block_mix(proof, paired, (image, block, len), (&rounded_probs, KEY_BLOCK), rows, mixed);
                    continue;
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
