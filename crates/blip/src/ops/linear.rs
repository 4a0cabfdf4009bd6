//! `nn.Linear` over f32 activations with the weight kept in the dtype the model was loaded in
//! (f32, bf16 or f16): products always accumulate in f32, so bf16/f16 only round the weights,
//! and the weights take half the memory and half the bandwidth of f32.
//!
//! On the CPU three kernels serve it, by the number of input rows, all adding the bias in the
//! same pass:
//! - one row (a decoding step at batch 1, the LM head): each weight row is read once and dotted
//!   with the input, bf16/f16 widened in the dot itself; this is bound by reading the weights;
//! - a few rows (batched or beam decoding, short texts): each task multiplies all input rows with
//!   a block of weight rows in register tiles, each weight read once from where it is stored
//!   (no packed copy, which costs much of the time at these sizes);
//! - many rows (vision, long texts): one blocked product over the whole matrix on all threads,
//!   bf16/f16 weights widened to f32 first; or, for bf16 weights where the CPU multiplies bf16
//!   (see [`crate::kernels::dispatch::bf16_products`]), oneDNN's bf16 product of the input
//!   rounded to bf16, accumulated in f32; written in bf16 (and through the GELU) where the next
//!   layer takes it so (see [`Linear::forward_rounded`], [`Linear::forward_gelu_for`]).
//!
//! The products are OpenBLAS's sgemm with the `openblas` feature, else the `gemm` crate's
//! (see [`crate::kernels::blas::matmul`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::tensor::cpu_f32_slice;
use crate::kernels::amx::{self, Amx};
use crate::kernels::blas::{matmul, Strided};
use crate::kernels::dispatch::{bf16_products, Bf16Products};
use crate::kernels::few_rows::rows_times_weights;
use crate::kernels::onednn::{Activation, Element, OneDnn, Start, View};
use crate::kernels::widen::{narrow_bf16, widen_bf16};

/// Input rows up to which blocks of weight rows are multiplied in register tiles as they stream
/// in from memory (decoding); above, one blocked product over the whole matrix is fastest.
const STREAMED_ROWS: usize = 32;
/// Input rows from which a bf16 model's products run on oneDNN (where bf16 products are on).
const BF16_PRODUCT_ROWS: usize = STREAMED_ROWS + 1;
/// Weight rows per parallel task in the streamed product.
const STREAM_BLOCK: usize = 128;

/// `y = x·Wᵀ + b` with `W` [out, in] as checkpoints store it, or stored transposed (see
/// [`Linear::column_major`]).
#[derive(Clone)]
pub struct Linear {
    /// [out, in]; [in, out] where `column_major`.
    weight: Tensor,
    /// Whether `weight` holds Wᵀ [in, out] (W in column-major order).
    column_major: bool,
    /// f32 [out]; zeros for the bias-free projections (BlipModel's).
    bias: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, _) = weight.dims2()?;
        let bias = match bias {
            Some(bias) => bias.to_dtype(DType::F32)?,
            None => Tensor::zeros(out_dim, DType::F32, weight.device())?,
        };
        Ok(Self { weight, bias, column_major: false })
    }

    /// The weight as stored, in the dtype the model was loaded in: [out, in], or [in, out]
    /// where [`Self::column_major`] transposed it (never a trained weight's; see
    /// [`Self::is_column_major`]).
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Whether [`Self::weight`] is stored transposed, [in, out].
    pub(crate) fn is_column_major(&self) -> bool {
        self.column_major
    }

    /// The layer with its weight stored transposed, [in, out], where that makes its many-row
    /// products faster: f32 on the CPU, outside any autograd graph. The `gemm` crate's kernels
    /// read W in column-major order without packing it, so that the product of a few hundred
    /// rows (one image's vision tower) no longer repacks the whole weight at each call. Layers
    /// that decode (few rows, read row by row) keep the checkpoint's layout.
    pub(crate) fn column_major(self) -> Result<Self> {
        if self.column_major || !(super::on_cpu(&self.weight) && self.weight.dtype() == DType::F32) || self.in_graph() {
            return Ok(self);
        }
        let weight = super::tensor::transposed_f32(&self.weight)?;
        Ok(Self { weight, column_major: true, ..self })
    }

    /// (out, in).
    fn dims(&self) -> Result<(usize, usize)> {
        let (rows, cols) = self.weight.dims2()?;
        Ok(if self.column_major { (cols, rows) } else { (rows, cols) })
    }

    /// [out], f32.
    pub(crate) fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Whether the weight or bias is trained (in an autograd graph), so that products with it
    /// must go through candle's differentiable ops.
    pub(crate) fn in_graph(&self) -> bool {
        super::in_graph(&self.weight) || super::in_graph(&self.bias)
    }

    /// Whether the CPU kernels take the product of `xs` with this layer: f32 inputs, or bf16
    /// ones where [`Self::takes_bf16`].
    fn kernels_take(&self, xs: &Tensor) -> bool {
        let rows = xs.elem_count() / xs.dims().last().copied().unwrap_or(1).max(1);
        let rounded = super::on_cpu(xs) && xs.dtype() == DType::BF16 && !super::in_graph(xs) && self.takes_bf16(rows);
        (super::cpu_f32(xs) || rounded) && !self.in_graph()
    }

    /// Whether this layer's product of `rows` input rows multiplies in bf16 (on oneDNN), taking
    /// its input rounded to bf16: the layer that produces the input may then write it in bf16
    /// directly (the same values, without an f32 pass between them). It also takes bf16 inputs.
    pub(crate) fn takes_bf16(&self, rows: usize) -> bool {
        self.weight.dtype() == DType::BF16
            && rows >= BF16_PRODUCT_ROWS
            && super::on_cpu(&self.weight)
            && !self.in_graph()
            && matches!(bf16_products(), Bf16Products::OneDnn(_))
    }
}

impl Linear {
    /// `gelu(xs·Wᵀ + b)` as `consumer` takes it: where this layer and the consumer both multiply
    /// in bf16 ([`Self::takes_bf16`]), rounded to bf16 with the GELU applied by the product as it
    /// writes (oneDNN's erf GELU, in f32), sparing two passes over the output; else
    /// [`super::activation::gelu_for`] of [`Module::forward`].
    pub(crate) fn forward_gelu_for(&self, xs: &Tensor, consumer: &Linear) -> Result<Tensor> {
        let rows = xs.elem_count() / self.dims()?.1.max(1);
        if consumer.takes_bf16(rows) {
            if let Some(ys) = self.bf16_output(xs, Activation::Gelu)? {
                return Ok(ys);
            }
        }
        super::activation::gelu_for(self.forward(xs)?, consumer)
    }

    /// `xs·Wᵀ + b` rounded to bf16 where this layer multiplies in bf16 ([`Self::takes_bf16`]),
    /// for a consumer that rounds it anyway (a bf16 model's attention), else f32 as
    /// [`Module::forward`] gives it.
    pub(crate) fn forward_rounded(&self, xs: &Tensor) -> Result<Tensor> {
        match self.bf16_output(xs, Activation::Identity)? {
            Some(ys) => Ok(ys),
            None => self.forward(xs),
        }
    }

    /// `activation(xs·Wᵀ + b)` rounded to bf16, on oneDNN, where this layer multiplies in bf16;
    /// `None` where it does not.
    fn bf16_output(&self, xs: &Tensor, activation: Activation) -> Result<Option<Tensor>> {
        let (out_dim, in_dim) = self.dims()?;
        let rows = xs.elem_count() / in_dim.max(1);
        let Bf16Products::OneDnn(onednn) = bf16_products() else { return Ok(None) };
        if !(self.takes_bf16(rows) && self.kernels_take(xs)) || self.column_major || xs.dims().last() != Some(&in_dim) {
            return Ok(None);
        }
        let xs = xs.contiguous()?;
        let (storage, layout) = xs.storage_and_layout();
        let input = match xs.dtype() {
            DType::BF16 => Input::Rounded(super::tensor::bf16_values(&storage, layout)?),
            _ => Input::F32(super::tensor::f32_values(&storage, layout)?),
        };
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let w = super::tensor::bf16_values(&weight, weight_layout)?;
        let (bias, bias_layout) = self.bias.storage_and_layout();
        let bias = super::tensor::f32_values(&bias, bias_layout)?;
        let ys: Vec<bf16> = bf16_product(onednn, input, (rows, in_dim, out_dim), (w, bias), None, activation)
            .map_err(candle_core::Error::msg)?;
        let mut dims = xs.dims().to_vec();
        if let Some(features) = dims.last_mut() {
            *features = out_dim;
        }
        Ok(Some(Tensor::from_vec(ys, dims, &candle_core::Device::Cpu)?))
    }

    /// `residual + xs·Wᵀ + b`, the residual branch of a transformer layer in one pass: on the
    /// CPU the residual is where the product starts from, instead of an addition afterwards
    /// over the whole output.
    pub(crate) fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if !(self.kernels_take(xs) && super::cpu_f32(residual)) {
            return self.forward(xs)? + residual;
        }
        let mut output_dims = xs.dims().to_vec();
        if let Some(features) = output_dims.last_mut() {
            *features = self.dims()?.0;
        }
        if output_dims != residual.dims() {
            candle_core::bail!("linear: output {output_dims:?} and residual {:?} differ in shape", residual.dims());
        }
        self.apply(xs, &LinearOp { residual: Some(residual.contiguous()?), column_major: false })
    }

    /// The product on the CPU kernels (or candle's ops elsewhere), [..., in] → [..., out].
    fn apply(&self, xs: &Tensor, op: &LinearOp) -> Result<Tensor> {
        let (out_dim, in_dim) = self.dims()?;
        let mut dims = xs.dims().to_vec();
        match dims.last_mut() {
            Some(features) if *features == in_dim => *features = out_dim,
            _ => candle_core::bail!("linear: input {:?} does not end in the weight's {in_dim} features", xs.dims()),
        }
        let rows = xs.elem_count() / in_dim.max(1);
        let flat = xs.reshape((rows, in_dim))?;
        let trained = super::in_graph(xs) || self.in_graph();
        let ys = if super::on_cpu(xs) && !trained {
            let op = LinearOp { residual: op.residual.clone(), column_major: self.column_major };
            flat.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op)?
        } else if super::on_cpu(xs)
            && self.weight.dtype() == DType::F32
            && self.weight.is_contiguous()
            && !self.column_major
        {
            // in an autograd graph: the same kernels, with their backward pass
            flat.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                LinearOp { residual: op.residual.clone(), column_major: false },
            )?
        } else {
            let weight = self.weight.to_dtype(xs.dtype())?;
            let transposed = if self.column_major { weight } else { weight.t()? };
            let ys = flat.matmul(&transposed)?.broadcast_add(&self.bias)?;
            match &op.residual {
                Some(residual) => (ys + residual.reshape((rows, out_dim))?)?,
                None => ys,
            }
        };
        ys.reshape(dims)
    }
}

impl Module for Linear {
    /// xs [..., in] (f32) → [..., out] (f32).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, &LinearOp { residual: None, column_major: false })
    }
}

/// The weight matrix [out, in] in its stored precision.
#[derive(Clone, Copy)]
enum Weights<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Weights<'a> {
    fn len(self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::BF16(w) => w.len(),
            Weights::F16(w) => w.len(),
        }
    }

    /// The values at `range` of the flattened matrix.
    fn slice(self, range: std::ops::Range<usize>) -> Self {
        match self {
            Weights::F32(w) => Weights::F32(&w[range]),
            Weights::BF16(w) => Weights::BF16(&w[range]),
            Weights::F16(w) => Weights::F16(&w[range]),
        }
    }

    /// Writes the values as f32 into `dst` (of the same length).
    fn widen_into(self, dst: &mut [f32]) {
        match self {
            Weights::F32(w) => dst.copy_from_slice(w),
            Weights::BF16(w) => widen_bf16(w, dst),
            Weights::F16(w) => w.convert_to_f32_slice(dst),
        }
    }

    /// The values as f32: borrowed when stored so, else widened on all threads.
    fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        const CHUNK: usize = 1 << 16;
        if let Weights::F32(w) = self {
            return std::borrow::Cow::Borrowed(w);
        }
        let mut dst = vec![0f32; self.len()];
        dst.par_chunks_mut(CHUNK).enumerate().for_each(|(chunk, d)| {
            self.slice(chunk * CHUNK..chunk * CHUNK + d.len()).widen_into(d);
        });
        std::borrow::Cow::Owned(dst)
    }
}

/// The product, starting from the bias rows, or from bias + `residual` [m, n] (contiguous f32).
struct LinearOp {
    residual: Option<Tensor>,
    /// Whether the weight is stored [in, out] (see [`Linear::column_major`]).
    column_major: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xs_layout.shape().dims2()?;
        let (n, weight_k) = match weight_layout.shape().dims2()? {
            (rows, cols) if self.column_major => (cols, rows),
            dims => dims,
        };
        if weight_k != k {
            candle_core::bail!("linear: input has {k} features, the weight takes {weight_k}");
        }
        let rounded_input = match (xs, xs_layout.contiguous_offsets()) {
            (CpuStorage::BF16(values), Some((start, end))) => Some(&values[start..end]),
            (CpuStorage::BF16(_), None) => candle_core::bail!("linear: a bf16 input must be contiguous"),
            _ => None,
        };
        let xs = match rounded_input {
            Some(_) => &[][..],
            None => cpu_f32_slice(xs, xs_layout, "linear input")?,
        };
        let bias = cpu_f32_slice(bias, bias_layout, "linear bias")?;
        if bias.len() != n {
            candle_core::bail!("linear: a bias of {} for {n} outputs", bias.len());
        }
        let Some((start, end)) = weight_layout.contiguous_offsets() else {
            candle_core::bail!("linear: the weight must be contiguous");
        };
        let weights = match weight {
            CpuStorage::F32(w) => Weights::F32(&w[start..end]),
            CpuStorage::BF16(w) => Weights::BF16(&w[start..end]),
            CpuStorage::F16(w) => Weights::F16(&w[start..end]),
            other => candle_core::bail!("linear: weights of dtype {:?} are not supported", other.dtype()),
        };
        let residual_storage = self.residual.as_ref().map(|residual| residual.storage_and_layout());
        let residual = match &residual_storage {
            Some((storage, layout)) => match (&**storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) if end - start == m * n => {
                    Some(&data[start..end])
                }
                _ => candle_core::bail!("linear: the residual must be contiguous f32 of the output's size"),
            },
            None => None,
        };
        if m == 0 || k == 0 {
            // no products: the bias rows (plus the residual's)
            return Ok((CpuStorage::F32(starting_rows(m, n, bias, residual)), Shape::from((m, n))));
        }
        let onednn = match (weights, bf16_products()) {
            (Weights::BF16(_), Bf16Products::OneDnn(onednn)) => Some(onednn),
            _ => None,
        };
        let shape = Shape::from((m, n));
        if self.column_major {
            let (Weights::F32(w), None) = (weights, rounded_input) else {
                candle_core::bail!("linear: a weight stored transposed takes f32 weights and inputs");
            };
            return Ok((CpuStorage::F32(column_major_product(xs, m, k, w, n, bias, residual)), shape));
        }
        let input = match rounded_input {
            Some(rounded) => Input::Rounded(rounded),
            None => Input::F32(xs),
        };
        match (weights, onednn) {
            (Weights::BF16(w), Some(onednn)) if m >= BF16_PRODUCT_ROWS => {
                let starting = residual.map(|residual| starting_rows(m, n, bias, Some(residual)));
                let ys = bf16_product(onednn, input, (m, k, n), (w, bias), starting, Activation::Identity)
                    .map_err(candle_core::Error::msg)?;
                return Ok((CpuStorage::F32(ys), shape));
            }
            _ if rounded_input.is_some() => {
                candle_core::bail!("linear: bf16 inputs are taken only by bf16 products (see Linear::takes_bf16)")
            }
            _ if m > STREAMED_ROWS => {
                return Ok((CpuStorage::F32(blocked_product(xs, m, k, weights, n, bias, residual)), shape));
            }
            _ => {}
        }
        // A few rows, multiplied as the weights stream in. bf16 products round every input a
        // bf16 model's products take, whatever the rows.
        let rounded;
        let xs = match onednn {
            Some(_) => {
                rounded = rounded_to_bf16(xs);
                &rounded[..]
            }
            None => xs,
        };
        let mut ys = streamed_product(xs, m, k, weights, n, bias, onednn.is_some());
        if let Some(residual) = residual {
            ys.iter_mut().zip(residual).for_each(|(y, r)| *y += r);
        }
        Ok((CpuStorage::F32(ys), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.residual.is_some() {
            candle_core::bail!("linear: the residual form has no backward pass (add the residual outside)");
        }
        LinearOp::backward(xs, weight, dy)
    }
}

impl LinearOp {
    /// `dx` (when `x` is in the graph), `dW` and `db` from `dy` (the residual's gradient is
    /// `dy` itself, which candle's addition gives when the residual is added outside).
    fn backward(x: &Tensor, weight: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let n = weight.dim(0)?;
        let wanted = (super::in_graph(x), super::in_graph(weight));
        let (dx, dw, db) = super::tensor::with_f32_values([x, weight, dy], |[x, w, dy]| {
            crate::kernels::backward::linear(x, w, dy, (m, n, k), wanted)
        })?;
        let device = x.device();
        let dx = dx.map(|dx| Tensor::from_vec(dx, (m, k), device)).transpose()?;
        let dw = dw.map(|dw| Tensor::from_vec(dw, (n, k), device)).transpose()?;
        Ok((dx, dw, Some(Tensor::from_vec(db, n, device)?)))
    }
}

/// [rows, cols] row-major → [cols, rows] row-major.
fn transpose(xs: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut ys = vec![0f32; rows * cols];
    for (r, row) in xs.chunks(cols).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            ys[c * rows + r] = x;
        }
    }
    ys
}

/// A few input rows (decoding, one sequence or a batch): each task multiplies all input rows
/// with a block of weight rows, read once from where they are stored (widened in registers, or
/// as AMX tiles where `rounded`: the rows are bf16 values and the CPU has the tiles).
fn streamed_product(
    xs: &[f32],
    m: usize,
    k: usize,
    weights: Weights,
    n: usize,
    bias: &[f32],
    rounded: bool,
) -> Vec<f32> {
    let tiles = match weights {
        Weights::BF16(_) if rounded && amx::rows::takes(m, k) => Amx::detect(),
        _ => None,
    };
    let pairs = tiles.map(|_| amx::rows::pair_rows(xs, m, k));
    // Transposed [n, m], so that each task owns whole output rows; transposed back below.
    let mut transposed = vec![0f32; n * m];
    transposed.par_chunks_mut(STREAM_BLOCK * m).enumerate().for_each(|(block, outs)| {
        let (first, rows) = (block * STREAM_BLOCK, outs.len() / m);
        for (column, &b) in outs.chunks_mut(m).zip(&bias[first..first + rows]) {
            column.fill(b);
        }
        match (weights.slice(first * k..(first + rows) * k), tiles.zip(pairs.as_deref())) {
            (Weights::BF16(w), Some((proof, pairs))) => {
                amx::rows::rows_times_weights(proof, pairs, (m, k), w, outs, |w, outs| {
                    rows_times_weights(xs, m, k, w, outs)
                })
            }
            (Weights::F32(w), _) => rows_times_weights(xs, m, k, w, outs),
            (Weights::BF16(w), _) => rows_times_weights(xs, m, k, w, outs),
            (Weights::F16(w), _) => rows_times_weights(xs, m, k, w, outs),
        }
    });
    transpose(&transposed, n, m)
}

/// Many input rows: one blocked product, accumulating onto the bias rows (plus the residual's).
fn blocked_product(
    xs: &[f32],
    m: usize,
    k: usize,
    weights: Weights,
    n: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let w = weights.to_f32();
    let mut ys = starting_rows(m, n, bias, residual);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the strides describe xs [m, k] row-major, Wᵀ [k, n] read from W [n, k] row-major
    // and ys [m, n] row-major, all within the slices' lengths (checked by the callers' shapes).
    unsafe {
        let outs = Strided { ptr: ys.as_mut_ptr(), row: n as isize, col: 1 };
        let inputs = Strided { ptr: xs.as_ptr(), row: k as isize, col: 1 };
        matmul((m, n, k), outs, true, inputs, Strided { ptr: w.as_ptr(), row: 1, col: k as isize }, parallelism);
    }
    ys
}

/// [`blocked_product`] with W stored transposed, `w_t` [k, n]: computed as `yᵀ = W·xᵀ`, every
/// operand in the `gemm` crate's native column-major order (yᵀ [n, m] is y row-major), so that
/// neither the weight nor the output is repacked.
fn column_major_product(
    xs: &[f32],
    m: usize,
    k: usize,
    w_t: &[f32],
    n: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
) -> Vec<f32> {
    assert!(xs.len() == m * k && w_t.len() == n * k, "linear: shapes");
    let mut ys = starting_rows(m, n, bias, residual);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: yᵀ [n, m] over ys [m, n] row-major, W [n, k] over w_t [k, n] row-major, xᵀ [k, m]
    // over xs [m, k] row-major, all within the slices' lengths (asserted above).
    unsafe {
        let outs = Strided { ptr: ys.as_mut_ptr(), row: 1, col: n as isize };
        let weights = Strided { ptr: w_t.as_ptr(), row: 1, col: n as isize };
        let inputs = Strided { ptr: xs.as_ptr(), row: 1, col: k as isize };
        matmul((n, m, k), outs, true, weights, inputs, parallelism);
    }
    ys
}

/// `residual + xs·Wᵀ + b` (or without the residual) over f32 slices, xs [m, k], W [n, k]: the
/// many-rows product of a trained layer's forward (see `ops::trained_vision`).
pub(crate) fn linear_f32(
    xs: &[f32],
    w: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
) -> Vec<f32> {
    assert!(xs.len() == m * k && w.len() == n * k, "linear: shapes");
    blocked_product(xs, m, k, Weights::F32(w), n, bias, residual)
}

/// Many input rows with bf16 weights, on oneDNN's bf16 products: the input rounded to bf16, the
/// product accumulated in f32 onto `starting` (bias + residual rows, [m, n]) or else plus the
/// bias, then `activation`, written as f32 or rounded to bf16 (`T`). The rows are split among
/// rayon's threads, each running oneDNN on its own share: one thread pool for the whole model
/// (oneDNN's own threads, woken for each product while rayon's wait, cost more than the
/// products gain).
fn bf16_product<T: Element + Send + Sync>(
    onednn: &'static OneDnn,
    input: Input,
    (m, k, n): (usize, usize, usize),
    (w, bias): (&[bf16], &[f32]),
    starting: Option<Vec<T>>,
    activation: Activation,
) -> std::result::Result<Vec<T>, String> {
    let parts = candle_core::utils::get_num_threads().clamp(1, m.div_ceil(BF16_PART_ROWS));
    let rows = m.div_ceil(parts);
    let weights = (w, View::transposed(k, n, k));
    // Without starting rows oneDNN writes every element itself (the bias its own), with no pass
    // over the output first.
    let (start, mut ys) = match starting {
        Some(ys) if ys.len() == m * n => (Start::Dst, ys),
        Some(ys) => return Err(format!("linear: {} starting values for {m}x{n}", ys.len())),
        None => (Start::Bias(bias), Vec::with_capacity(m * n)),
    };
    let outs = ys.as_mut_ptr() as usize;
    (0..m.div_ceil(rows)).into_par_iter().try_for_each(|part| {
        let part_rows = rows.min(m - part * rows);
        let out = (outs as *mut T).wrapping_add(part * rows * n);
        let multiply = |rounded: &[bf16]| {
            // SAFETY: this part's rows of the output (within its m·n capacity), written by this
            // task alone; the input is this part's rows, the weights the caller's [n, k].
            unsafe {
                onednn.matmul_at(
                    (rounded.as_ptr(), View::matrix(part_rows, k, k)),
                    (weights.0.as_ptr(), weights.1),
                    (out, View::matrix(part_rows, n, n)),
                    start,
                    activation,
                )
            }
        };
        let part_values = part * rows * k..(part * rows + part_rows) * k;
        match input {
            Input::Rounded(values) => multiply(&values[part_values]),
            Input::F32(xs) => ROUNDED.with_borrow_mut(|rounded| {
                rounded.resize(part_values.len(), bf16::ZERO);
                narrow_bf16(&xs[part_values], rounded);
                multiply(rounded)
            }),
        }
    })?;
    // SAFETY: the parts wrote (or the starting rows held) all m·n elements.
    unsafe { ys.set_len(m * n) };
    Ok(ys)
}

/// The input of [`bf16_product`]: f32 values, rounded to bf16 on the way, or values its
/// producer rounded already.
#[derive(Clone, Copy)]
enum Input<'a> {
    F32(&'a [f32]),
    Rounded(&'a [bf16]),
}

/// Fewest input rows per thread of [`bf16_product`].
const BF16_PART_ROWS: usize = 64;

thread_local! {
    /// Each thread's share of the input rounded to bf16, reused.
    static ROUNDED: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The values rounded to bf16 and back: what a bf16 product takes of them.
fn rounded_to_bf16(xs: &[f32]) -> Vec<f32> {
    let mut rounded = vec![bf16::ZERO; xs.len()];
    narrow_bf16(xs, &mut rounded);
    let mut widened = vec![0f32; xs.len()];
    widen_bf16(&rounded, &mut widened);
    widened
}

/// [m, n] rows of the bias (plus the residual's rows), where a product accumulates.
fn starting_rows(m: usize, n: usize, bias: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
    assert!(bias.len() == n && residual.is_none_or(|r| r.len() >= m * n), "linear: starting rows of {m}x{n}");
    // Written straight into fresh memory (no zeroing pass first).
    let mut ys = Vec::with_capacity(m * n);
    ys.spare_capacity_mut()[..m * n].par_chunks_mut(n).enumerate().for_each(|(i, row)| match residual {
        Some(residual) => row.iter_mut().zip(bias).zip(&residual[i * n..]).for_each(|((y, &b), &r)| {
            y.write(b + r);
        }),
        None => row.iter_mut().zip(bias).for_each(|(y, &b)| {
            y.write(b);
        }),
    });
    // SAFETY: the m·n elements were all written just above.
    unsafe { ys.set_len(m * n) };
    ys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, available_bf16, with_bf16, with_isa};
    use candle_core::Device;

    /// The same product in f64 from the f32 values, as the reference.
    fn reference(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let w = weight.to_dtype(DType::F64).unwrap();
        let x = xs.to_dtype(DType::F64).unwrap();
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias.to_dtype(DType::F64).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn both_kernels_match_the_product_in_every_weight_dtype() {
        let dev = Device::Cpu;
        // 5·13 = 65 rows (blocked, split over threads), 3·7 = 21 and 2·3 = 6 rows (streamed),
        // 1 row (streamed); 70 features leave a remainder lane.
        for rows in [(5, 13), (3, 7), (2, 3), (1, 1)] {
            let xs = Tensor::randn(0f32, 1.0, (rows.0, rows.1, 70), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (130, 70), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 130, &dev).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let stored = weight.to_dtype(dtype).unwrap();
                let linear = Linear::new(stored.clone(), Some(bias.clone())).unwrap();
                // the reference uses the same rounded weights: only the f32 summation differs
                let expected = reference(&xs, &stored.to_dtype(DType::F32).unwrap(), &bias);
                for isa in available() {
                    // (oneDNN's bf16 products, which round the input too: the test below)
                    let ours = with_bf16(Bf16Products::Widened, || with_isa(isa, || linear.forward(&xs).unwrap()));
                    assert_eq!(ours.dims(), &[rows.0, rows.1, 130]);
                    let diff = max_diff(&ours, &expected);
                    assert!(diff < 1e-4, "{isa:?}: {rows:?} {dtype:?}: {diff}");
                }
            }
        }
    }

    /// A bf16 model with bf16 products on (oneDNN, where installed) multiplies the input rounded
    /// to bf16, whatever the rows (oneDNN's product for many, the project's kernels for few):
    /// the sum of the exact products of those values in f32.
    /// Producers that write a bf16 product's input rounded (LayerNorm, GELU) give the same
    /// values as rounding their f32 output, and the product of those bf16 inputs is the
    /// product of the f32 inputs, bit for bit, on every instruction set.
    #[test]
    fn inputs_rounded_by_their_producer_give_the_same_products() {
        use crate::ops::activation::{gelu, gelu_for};
        use crate::ops::norm::LayerNorm;
        let dev = Device::Cpu;
        let Some(onednn) = available_bf16().into_iter().find(|p| matches!(p, Bf16Products::OneDnn(_))) else {
            return; // no oneDNN here: nothing takes bf16 inputs
        };
        let weight = Tensor::randn(0f32, 1.0, (96, 70), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let linear = Linear::new(weight, Some(Tensor::randn(0f32, 1.0, 96, &dev).unwrap())).unwrap();
        let norm = LayerNorm::new(
            Tensor::randn(0f32, 1.0, 70, &dev).unwrap(),
            Tensor::randn(0f32, 1.0, 70, &dev).unwrap(),
            1e-6,
        );
        let xs = Tensor::randn(0f32, 2.0, (3, 40, 70), &dev).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        for isa in available() {
            with_isa(isa, || {
                with_bf16(onednn, || {
                    assert!(linear.takes_bf16(120) && !linear.takes_bf16(BF16_PRODUCT_ROWS - 1));
                    let normed = candle_core::Module::forward(&norm, &xs).unwrap();
                    let rounded = norm.forward_for(&xs, &linear).unwrap();
                    assert_eq!(rounded.dtype(), DType::BF16);
                    assert_eq!(bits(&rounded), bits(&normed.to_dtype(DType::BF16).unwrap()), "{isa:?}: layer norm");
                    let activated = gelu(xs.copy().unwrap()).unwrap();
                    let rounded_gelu = gelu_for(xs.copy().unwrap(), &linear).unwrap();
                    assert_eq!(bits(&rounded_gelu), bits(&activated.to_dtype(DType::BF16).unwrap()), "{isa:?}: gelu");
                    let from_f32 = linear.forward(&normed).unwrap();
                    let from_bf16 = linear.forward(&rounded).unwrap();
                    assert_eq!(bits(&from_bf16), bits(&from_f32), "{isa:?}: products");
                    let residual = Tensor::randn(0f32, 1.0, (3, 40, 96), &dev).unwrap();
                    let with_residual = linear.forward_residual(&rounded, &residual).unwrap();
                    assert_eq!(bits(&with_residual), bits(&linear.forward_residual(&normed, &residual).unwrap()));
                })
            });
        }
        // Elsewhere the producers write f32, and the layer refuses nothing it is given.
        with_bf16(Bf16Products::Widened, || {
            assert!(!linear.takes_bf16(120));
            assert_eq!(norm.forward_for(&xs, &linear).unwrap().dtype(), DType::F32);
        });
    }

    /// With 96 inputs per row, the streamed rows run on AMX tiles where the CPU has them; the
    /// same check without the tiles covers the AVX-512 widening kernels there.
    #[test]
    fn bf16_products_multiply_the_input_rounded_to_bf16() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (130, 96), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 130, &dev).unwrap();
        let linear = Linear::new(weight.clone(), Some(bias.clone())).unwrap();
        let widened = weight.to_dtype(DType::F32).unwrap();
        // 80 rows (oneDNN), 24, 16, 6 and 1 (streamed)
        for rows in [80, 24, 16, 6, 1] {
            let xs = Tensor::randn(0f32, 1.0, (rows, 96), &dev).unwrap();
            let residual = Tensor::randn(0f32, 1.0, (rows, 130), &dev).unwrap();
            let rounded = xs.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            for (products, tiles) in available_bf16().into_iter().flat_map(|p| [(p, true), (p, false)]) {
                let expected_input = match products {
                    Bf16Products::OneDnn(_) => &rounded,
                    Bf16Products::Widened => &xs,
                };
                let expected = reference(expected_input, &widened, &bias);
                let run = || (linear.forward(&xs).unwrap(), linear.forward_residual(&xs, &residual).unwrap());
                let (plain, with_residual) = if tiles {
                    // (the locks in the order every test takes them: the tiles' first)
                    amx::with_amx(|| with_bf16(products, run))
                } else {
                    amx::without_amx(|| with_bf16(products, run))
                };
                let diff = max_diff(&plain, &expected);
                assert!(diff < 1e-4, "{products:?}, {rows} rows, tiles {tiles}: {diff}");
                let diff = max_diff(&with_residual, &(expected + &residual).unwrap());
                assert!(diff < 1e-4, "{products:?}, {rows} rows, tiles {tiles}, with the residual: {diff}");
            }
        }
    }

    /// Outputs for a bf16 product that follows: with bf16 products on oneDNN and enough rows,
    /// rounded to bf16 by the product itself, the same bits as the f32 output rounded; the
    /// GELU applied by oneDNN (its own erf) within one bf16 step of ours then rounded (or 1e-6
    /// near 0, as oneDNN's own test says). Else the same tensors as the separate steps give.
    #[test]
    fn outputs_for_a_bf16_product_are_rounded_by_the_product() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.2, (130, 70), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let linear = Linear::new(weight, Some(Tensor::randn(0f32, 1.0, 130, &dev).unwrap())).unwrap();
        let consumer =
            Linear::new(Tensor::randn(0f32, 1.0, (9, 130), &dev).unwrap().to_dtype(DType::BF16).unwrap(), None)
                .unwrap();
        // 80 rows (oneDNN), 6 (streamed)
        for rows in [80, 6] {
            let xs = Tensor::randn(0f32, 1.0, (2, rows / 2, 70), &dev).unwrap();
            for products in available_bf16() {
                // one instruction set for every call (other tests may force another meanwhile)
                let isa = *available().last().unwrap();
                let (rounded, plain, fused, separate, takes_bf16) = with_bf16(products, || {
                    with_isa(isa, || {
                        (
                            linear.forward_rounded(&xs).unwrap(),
                            linear.forward(&xs).unwrap(),
                            linear.forward_gelu_for(&xs, &consumer).unwrap(),
                            super::super::activation::gelu_for(linear.forward(&xs).unwrap(), &consumer).unwrap(),
                            consumer.takes_bf16(rows),
                        )
                    })
                });
                let on_onednn = takes_bf16 && matches!(products, Bf16Products::OneDnn(_));
                assert_eq!(rounded.dims(), plain.dims());
                assert_eq!(fused.dtype(), separate.dtype(), "{products:?}, {rows} rows");
                if !on_onednn {
                    assert!(super::super::tensor::same_bits(&rounded, &plain).unwrap(), "{products:?}, {rows} rows");
                    assert!(super::super::tensor::same_bits(&fused, &separate).unwrap(), "{products:?}, {rows} rows");
                    continue;
                }
                let expected = plain.to_dtype(DType::BF16).unwrap();
                assert!(super::super::tensor::same_bits(&rounded, &expected).unwrap(), "{products:?}: rounded output");
                let values =
                    |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (ours, theirs) in values(&fused).iter().zip(values(&separate)) {
                    let step = (theirs.abs() / 128.0).max(1e-6);
                    assert!((ours - theirs).abs() <= step, "{products:?}: GELU {ours} vs {theirs}");
                }
            }
        }
    }

    /// Without OpenBLAS the blocked kernel is candle's own product (the `gemm` crate).
    #[cfg(not(feature = "openblas"))]
    #[test]
    fn the_blocked_kernel_equals_candles_matmul_then_bias_bit_for_bit() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 40, 96), &dev).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (64, 96), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 64, &dev).unwrap();
        let ours = Linear::new(weight.clone(), Some(bias.clone())).unwrap().forward(&xs).unwrap();
        let candle = candle_nn::Linear::new(weight, Some(bias)).forward(&xs).unwrap();
        assert_eq!(max_diff(&ours, &candle), 0.0);
    }

    #[test]
    fn the_residual_is_added_by_every_kernel() {
        let dev = Device::Cpu;
        // 65 rows (blocked), 6 and 1 (streamed)
        for rows in [65, 6, 1] {
            let xs = Tensor::randn(0f32, 1.0, (rows, 70), &dev).unwrap();
            let residual = Tensor::randn(0f32, 1.0, (rows, 130), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (130, 70), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 130, &dev).unwrap();
            let linear = Linear::new(weight.clone(), Some(bias.clone())).unwrap();
            let expected = (reference(&xs, &weight, &bias) + &residual).unwrap();
            for isa in available() {
                let ours = with_isa(isa, || linear.forward_residual(&xs, &residual).unwrap());
                assert!(max_diff(&ours, &expected) < 1e-4, "{isa:?}: {rows} rows: {}", max_diff(&ours, &expected));
            }
        }
        let linear = Linear::new(Tensor::zeros((8, 32), DType::F32, &dev).unwrap(), None).unwrap();
        let xs = Tensor::zeros((3, 32), DType::F32, &dev).unwrap();
        assert!(linear.forward_residual(&xs, &Tensor::zeros((3, 9), DType::F32, &dev).unwrap()).is_err());
    }

    /// A layer whose weight is stored transposed gives the product (and the residual form) for
    /// every number of rows; a bf16 layer and a trained one keep the checkpoint's layout.
    #[test]
    fn column_major_weights_give_the_same_products() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (130, 70), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 130, &dev).unwrap();
        let linear = Linear::new(weight.clone(), Some(bias.clone())).unwrap().column_major().unwrap();
        assert!(linear.column_major && linear.weight().dims() == [70, 130]);
        for rows in [600, 65, 6, 1] {
            let xs = Tensor::randn(0f32, 1.0, (rows, 70), &dev).unwrap();
            let residual = Tensor::randn(0f32, 1.0, (rows, 130), &dev).unwrap();
            let expected = reference(&xs, &weight, &bias);
            for isa in available() {
                let ours = with_isa(isa, || linear.forward(&xs).unwrap());
                assert!(max_diff(&ours, &expected) < 1e-4, "{isa:?}: {rows} rows: {}", max_diff(&ours, &expected));
                let ours = with_isa(isa, || linear.forward_residual(&xs, &residual).unwrap());
                let expected = (&expected + &residual).unwrap();
                assert!(max_diff(&ours, &expected) < 1e-4, "{isa:?}: {rows} rows: {}", max_diff(&ours, &expected));
            }
        }
        let bf16_input = Tensor::randn(0f32, 1.0, (40, 70), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        assert!(linear.forward(&bf16_input).is_err());
        let bf16 = Linear::new(weight.to_dtype(DType::BF16).unwrap(), None).unwrap().column_major().unwrap();
        assert!(!bf16.column_major);
        let var = candle_core::Var::from_tensor(&weight).unwrap();
        let trained = Linear::new(var.as_tensor().clone(), None).unwrap().column_major().unwrap();
        assert!(!trained.column_major);
    }

    /// The linear layer's backward pass (dx, dW, db) against candle's autograd of
    /// `x·Wᵀ + b`, for as many rows as each forward kernel takes.
    #[test]
    fn linear_backward_matches_candles_autograd() {
        let dev = Device::Cpu;
        for rows in [65, 6, 1] {
            let xs = Tensor::randn(0f32, 1.0, (rows, 70), &dev).unwrap();
            let upstream = Tensor::randn(0f32, 1.0, (rows, 130), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (130, 70), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 130, &dev).unwrap();
            let grads = |kernel: bool| {
                let (x, w, b) = (
                    candle_core::Var::from_tensor(&xs).unwrap(),
                    candle_core::Var::from_tensor(&weight).unwrap(),
                    candle_core::Var::from_tensor(&bias).unwrap(),
                );
                let ys = if kernel {
                    Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
                        .unwrap()
                        .forward(x.as_tensor())
                        .unwrap()
                } else {
                    x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap()
                };
                let store = (ys * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
                [x, w, b].map(|v| store.get(v.as_tensor()).unwrap().clone())
            };
            let (ours, expected) = (grads(true), grads(false));
            for (name, (a, b)) in ["x", "weight", "bias"].iter().zip(ours.iter().zip(&expected)) {
                assert!(max_diff(a, b) < 1e-4, "{rows} rows, {name}: {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn inputs_of_the_wrong_width_are_an_error() {
        let weight = Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap();
        let linear = Linear::new(weight, None).unwrap();
        for xs in [Tensor::zeros((2, 31), DType::F32, &Device::Cpu), Tensor::new(1f32, &Device::Cpu)] {
            assert!(linear.forward(&xs.unwrap()).is_err());
        }
    }

    /// A bias of the wrong length is an error on every kernel, never unwritten output.
    #[test]
    fn a_bias_of_the_wrong_length_is_an_error() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let weight = Tensor::zeros((8, 32), dtype, &dev).unwrap();
            let linear = Linear::new(weight, Some(Tensor::zeros(5, DType::F32, &dev).unwrap())).unwrap();
            for rows in [1, 6, 65] {
                let xs = Tensor::zeros((rows, 32), DType::F32, &dev).unwrap();
                assert!(linear.forward(&xs).is_err(), "{dtype:?}, {rows} rows");
                let residual = Tensor::zeros((rows, 8), DType::F32, &dev).unwrap();
                assert!(linear.forward_residual(&xs, &residual).is_err(), "{dtype:?}, {rows} rows");
            }
        }
    }

    #[test]
    fn no_bias_is_zero_bias() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (1, 32), &dev).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (8, 32), &dev).unwrap();
        let ours = Linear::new(weight.clone(), None).unwrap().forward(&xs).unwrap();
        let expected = reference(&xs, &weight, &Tensor::zeros(8, DType::F32, &dev).unwrap());
        assert!(max_diff(&ours, &expected) < 1e-5);
    }
}
