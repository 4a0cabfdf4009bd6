//! The vision tower trained on the CPU as one op of candle's autograd: a forward that keeps the
//! activations its backward needs, and a backward written layer by layer over slices that forms
//! each weight's gradient in one product (candle's autograd of the per-op graph zero-fills and
//! adds a gradient for every intermediate tensor, and keeps every one alive until the backward
//! pass; here only each weight's gradient passes through its sum, once).
//!
//! The trained weights join the graph through carriers (see [`super::carrier`]): `loss.backward()`
//! gives the same gradients as through the per-op graph.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::carrier::{self, Gradients};
use super::linear::linear_f32;
use super::tensor::{cpu_f32_slice, f32_values, with_f32_values};
use crate::kernels::attention::vision::attend_packed;
use crate::kernels::{backward, elementwise};

/// The weights before the layers' (patch kernel [hidden, channels·patch²], patch bias, class
/// embedding, position embedding), each layer's, and the post LayerNorm's after them.
const EMBEDDING_WEIGHTS: usize = 4;
/// Per layer: layer_norm1 (weight, bias), qkv (weight, bias), projection (weight, bias),
/// layer_norm2 (weight, bias), fc1 (weight, bias), fc2 (weight, bias).
const LAYER_WEIGHTS: usize = 12;

/// What the weights' shapes do not tell of the tower.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TowerShape {
    pub heads: usize,
    pub patch: usize,
    /// Patches per side of the checkpoint's grid (its position embeddings').
    pub side: usize,
    pub eps: f32,
}

/// `post_layernorm(layers(embeddings(pixel_values)))` [b, 1 + patches, hidden] in candle's
/// autograd, from `weights` in the order above (trained ones in the graph), f32 on the CPU.
pub(crate) fn forward(pixel_values: &Tensor, weights: Vec<Tensor>, shape: TowerShape) -> Result<Tensor> {
    if weights.len() < EMBEDDING_WEIGHTS + 2 || !(weights.len() - EMBEDDING_WEIGHTS - 2).is_multiple_of(LAYER_WEIGHTS) {
        candle_core::bail!("vision tower: {} weights do not make whole layers", weights.len());
    }
    let (link, gradients) = carrier::link(&weights, "vision tower")?;
    let Some(link) = link else { candle_core::bail!("vision tower: no trained weight") };
    let op = TowerOp { weights, shape, saved: Mutex::new(None), gradients };
    pixel_values.contiguous()?.apply_op2(&link, op)
}

/// One layer's activations, as the backward pass reads them; the LayerNorms' outputs and the
/// GELU's are recomputed instead (cheap next to the products, and a third of the memory).
struct LayerActivations {
    input: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    middle: Vec<f32>,
    hidden: Vec<f32>,
}

struct Saved {
    /// (images, tokens, grid rows, grid columns)
    dims: (usize, usize, usize, usize),
    layers: Vec<LayerActivations>,
    /// The input of the post LayerNorm.
    last: Vec<f32>,
}

struct TowerOp {
    weights: Vec<Tensor>,
    shape: TowerShape,
    saved: Mutex<Option<Saved>>,
    gradients: Gradients,
}

impl TowerOp {
    fn layers(&self) -> usize {
        (self.weights.len() - EMBEDDING_WEIGHTS - 2) / LAYER_WEIGHTS
    }

    /// The position embeddings of a gh × gw grid [1 + gh·gw, hidden]: the learned ones, or
    /// interpolated as `interpolate_pos_encoding` does (see `models::vision`).
    fn positions(&self, learned: &[f32], (gh, gw): (usize, usize), d: usize) -> Vec<f32> {
        let side = self.shape.side;
        if (gh, gw) == (side, side) {
            return learned.to_vec();
        }
        let interpolation = crate::models::vision::bicubic_weights((side, side), (gh, gw));
        let mut positions = learned[..d].to_vec();
        positions.extend(linear_f32(
            &interpolation,
            &transpose(&learned[d..], d),
            &vec![0.0; d],
            None,
            (gh * gw, d, side * side),
        ));
        positions
    }
}

/// [rows, columns] → [columns, rows].
fn transpose(values: &[f32], columns: usize) -> Vec<f32> {
    let rows = values.len() / columns;
    let mut out = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(columns).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            out[c * rows + r] = x;
        }
    }
    out
}

/// The patches of `pixels` [b, c, h, w] as rows [b·(h/p)·(w/p), c·p·p], each in the conv
/// kernel's (channel, row, column) order.
fn patches(pixels: &[f32], (b, c, h, w): (usize, usize, usize, usize), p: usize) -> Vec<f32> {
    let (gh, gw) = (h / p, w / p);
    let width = c * p * p;
    let mut rows = vec![0f32; b * gh * gw * width];
    rows.par_chunks_mut(width).enumerate().for_each(|(index, row)| {
        let (image, cell) = (index / (gh * gw), index % (gh * gw));
        let (y, x) = (cell / gw * p, cell % gw * p);
        for channel in 0..c {
            for dy in 0..p {
                let src = &pixels[((image * c + channel) * h + y + dy) * w + x..][..p];
                row[(channel * p + dy) * p..][..p].copy_from_slice(src);
            }
        }
    });
    rows
}

/// Calls `f` with every weight's values (contiguous f32 on the CPU, checked by the caller).
fn with_weights<R>(weights: &[Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = weights.iter().map(Tensor::storage_and_layout).collect();
    let values: Vec<&[f32]> = guards.iter().map(|(s, l)| f32_values(s, l)).collect::<Result<_>>()?;
    f(&values)
}

impl CustomOp2 for TowerOp {
    fn name(&self) -> &'static str {
        "vision-tower"
    }

    fn cpu_fwd(&self, pixels: &CpuStorage, layout: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let p = self.shape.patch;
        if h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "the model takes images whose sides are multiples of its {p}-pixel patches, got {h}x{w}"
            );
        }
        let pixels = cpu_f32_slice(pixels, layout, "vision tower")?;
        let (gh, gw) = (h / p, w / p);
        let tokens = 1 + gh * gw;
        with_weights(&self.weights, |weights| {
            let d = weights[1].len();
            if weights[0].len() != d * c * p * p {
                candle_core::bail!(
                    "the model takes {}-channel images, got {c} channels",
                    weights[0].len() / d / (p * p)
                );
            }
            let (n, eps) = (b * tokens, self.shape.eps);
            let embedded = linear_f32(
                &patches(pixels, (b, c, h, w), p),
                weights[0],
                weights[1],
                None,
                (b * gh * gw, d, c * p * p),
            );
            let positions = self.positions(weights[3], (gh, gw), d);
            let mut x = vec![0f32; n * d];
            x.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
                let (image, token) = (row / tokens, row % tokens);
                let source = match token {
                    0 => weights[2],
                    _ => &embedded[(image * gh * gw + token - 1) * d..][..d],
                };
                out.iter_mut().zip(source).zip(&positions[token * d..]).for_each(|((o, &s), &q)| *o = s + q);
            });
            let mut layers = Vec::with_capacity(self.layers());
            for layer in weights[EMBEDDING_WEIGHTS..].chunks_exact(LAYER_WEIGHTS).take(self.layers()) {
                let [ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b] =
                    layer.try_into().expect("chunks of LAYER_WEIGHTS");
                let i = fc1_b.len();
                let hd = d / self.shape.heads;
                let qkv =
                    linear_f32(&elementwise::layer_norm(&x, ln1_w, ln1_b, eps), qkv_w, qkv_b, None, (n, 3 * d, d));
                let context = attend_packed(&qkv, b, tokens, self.shape.heads, hd, scale(hd));
                let middle = linear_f32(&context, proj_w, proj_b, Some(&x), (n, d, d));
                let hidden =
                    linear_f32(&elementwise::layer_norm(&middle, ln2_w, ln2_b, eps), fc1_w, fc1_b, None, (n, i, d));
                let mut activated = hidden.clone();
                elementwise::gelu(&mut activated);
                let out = linear_f32(&activated, fc2_w, fc2_b, Some(&middle), (n, d, i));
                layers.push(LayerActivations { input: std::mem::replace(&mut x, out), qkv, context, middle, hidden });
            }
            let [post_w, post_b] = weights[weights.len() - 2..].try_into().expect("two post weights");
            let normed = elementwise::layer_norm(&x, post_w, post_b, eps);
            *self.saved.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Saved { dims: (b, tokens, gh, gw), layers, last: x });
            Ok((CpuStorage::F32(normed), Shape::from((b, tokens, d))))
        })
    }

    fn bwd(
        &self,
        pixel_values: &Tensor,
        link: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(saved) = saved.as_ref() else { candle_core::bail!("vision tower: backward before forward") };
        let grads = with_f32_values([pixel_values, dout], |[pixels, dout]| {
            with_weights(&self.weights, |weights| Ok(self.gradients(saved, weights, pixels, pixel_values.dims(), dout)))
        })??;
        carrier::leave(&self.gradients, &self.weights, grads)?;
        Ok((None, Some(link.zeros_like()?)))
    }
}

impl TowerOp {
    /// Every weight's gradient, in the weights' order, from the output's `dout`.
    fn gradients(
        &self,
        saved: &Saved,
        weights: &[&[f32]],
        pixels: &[f32],
        pixel_dims: &[usize],
        dout: &[f32],
    ) -> Vec<Vec<f32>> {
        let (b, tokens, gh, gw) = saved.dims;
        let (d, eps, heads) = (weights[1].len(), self.shape.eps, self.shape.heads);
        let (n, hd) = (b * tokens, d / heads);
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); weights.len()];
        let post = weights.len() - 2;
        let mut dx = vec![0f32; n * d];
        (grads[post], grads[post + 1]) = backward::layer_norm_into(&saved.last, weights[post], dout, eps, &mut dx);
        for (l, activations) in saved.layers.iter().enumerate().rev() {
            let base = EMBEDDING_WEIGHTS + l * LAYER_WEIGHTS;
            let layer = &weights[base..base + LAYER_WEIGHTS];
            let grads = &mut grads[base..base + LAYER_WEIGHTS];
            let [ln1_w, ln1_b, qkv_w, _, proj_w, _, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, _] =
                layer.try_into().expect("a layer's weights");
            let i = fc1_b.len();
            let LayerActivations { input, qkv, context, middle, hidden } = activations;
            // out = middle + gelu(hidden)·W2ᵀ + b2
            let mut activated = hidden.clone();
            elementwise::gelu(&mut activated);
            grads[10] = backward::weight_gradient(&activated, &dx, (n, d, i));
            grads[11] = backward::column_sums(&dx, d);
            let mut dhidden = activated;
            backward::input_gradient(fc2_w, &dx, (n, d, i), &mut dhidden, false);
            backward::gelu_in_place(hidden, &mut dhidden);
            // hidden = layer_norm2(middle)·W1ᵀ + b1
            let normed = elementwise::layer_norm(middle, ln2_w, ln2_b, eps);
            grads[8] = backward::weight_gradient(&normed, &dhidden, (n, i, d));
            grads[9] = backward::column_sums(&dhidden, i);
            let mut dnormed = normed;
            backward::input_gradient(fc1_w, &dhidden, (n, i, d), &mut dnormed, false);
            drop(dhidden);
            (grads[6], grads[7]) = backward::layer_norm_into(middle, ln2_w, &dnormed, eps, &mut dx);
            // middle = input + context·Wpᵀ + bp
            grads[4] = backward::weight_gradient(context, &dx, (n, d, d));
            grads[5] = backward::column_sums(&dx, d);
            backward::input_gradient(proj_w, &dx, (n, d, d), &mut dnormed, false);
            let dqkv = backward::attention_packed(qkv, &dnormed, (b, tokens, heads, hd), scale(hd));
            // qkv = layer_norm1(input)·Wqkvᵀ + bqkv
            let normed = elementwise::layer_norm(input, ln1_w, ln1_b, eps);
            grads[2] = backward::weight_gradient(&normed, &dqkv, (n, 3 * d, d));
            grads[3] = backward::column_sums(&dqkv, 3 * d);
            let mut dnormed = normed;
            backward::input_gradient(qkv_w, &dqkv, (n, 3 * d, d), &mut dnormed, false);
            (grads[0], grads[1]) = backward::layer_norm_into(input, ln1_w, &dnormed, eps, &mut dx);
        }
        // x = [class; patches·Wᵀ + b] + positions, per image
        let dpositions = backward::column_sums(&dx, tokens * d);
        grads[2] = dpositions[..d].to_vec();
        let p = self.shape.patch;
        let grid = gh * gw;
        let mut dembedded = vec![0f32; b * grid * d];
        dembedded.par_chunks_mut(grid * d).zip(dx.par_chunks(tokens * d)).for_each(|(out, image)| {
            out.copy_from_slice(&image[d..]);
        });
        let (c, h, w) = (pixel_dims[1], pixel_dims[2], pixel_dims[3]);
        let rows = patches(pixels, (b, c, h, w), p);
        grads[0] = backward::weight_gradient(&rows, &dembedded, (b * grid, d, c * p * p));
        grads[1] = backward::column_sums(&dembedded, d);
        let side = self.shape.side;
        grads[3] = if (gh, gw) == (side, side) {
            dpositions
        } else {
            // through the interpolation: the learned grid's gradient is Bᵀ·(the grid's)
            let interpolation = crate::models::vision::bicubic_weights((side, side), (gh, gw));
            let mut learned = dpositions[..d].to_vec();
            learned.extend(backward::weight_gradient(&dpositions[d..], &interpolation, (grid, side * side, d)));
            learned
        };
        grads
    }
}

/// The attention's scale, as `models::vision` computes it.
fn scale(head_dim: usize) -> f32 {
    (head_dim as f64).powf(-0.5) as f32
}
