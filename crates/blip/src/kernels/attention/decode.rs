//! Fused attention for a few queries (decoding steps): one task per batch row and head.

use rayon::prelude::*;

use crate::kernels::few_rows::dot_kernel;

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
