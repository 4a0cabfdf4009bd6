//! The text model's cross-attention to image states in training, on the CPU, as one op of
//! candle's autograd: the reassociation of [`super::attention::attention_to_states`] (scores
//! `(q_h·W_k,h)·Sᵀ`, context `(P_h·S)·W_v,hᵀ`, no keys or values of the 577 states), with a
//! backward written by hand that keeps only the probabilities P [b, heads, t, n] (candle's
//! per-op graph of the same keeps every intermediate: the [b, heads·t, width] products, the
//! scores before and after the scale and the mask, the softmax).
//!
//! The key and value weights join the graph through carriers (see [`super::carrier`]).

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::carrier::{self, Gradients};
use super::tensor::{cpu_f32_slice, with_f32_values};
use crate::kernels::blas::{matmul, Strided};
use crate::kernels::elementwise;

/// `context` [b, t, heads·head_dim] of queries `q` [b, t, d] (projected, heads not split) over
/// `states` [b, n, width] through the key and value projections `[key_weight, key_bias,
/// value_weight, value_bias]` ([d, width], [d]), `bias` [b, 1, 1, n] additive; `None` where
/// the op does not take these tensors (not all f32 on the CPU, or no trained weight), for the
/// caller's differentiable ops.
pub(crate) fn forward(
    q: &Tensor,
    states: &Tensor,
    weights: [&Tensor; 4],
    heads: usize,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| super::on_cpu(t) && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(q) && f32_cpu(states) && weights.iter().all(|w| f32_cpu(w))) {
        return Ok(None);
    }
    let weights = weights.map(Tensor::clone);
    let (link, gradients) = carrier::link(&weights, "cross-attention")?;
    let Some(link) = link else { return Ok(None) };
    let (b, t, d) = q.dims3()?;
    let (states_b, n, width) = states.dims3()?;
    if [b, t, d, n, width].contains(&0) {
        return Ok(None);
    }
    let shapes_fit = [&[d, width][..], &[d], &[d, width], &[d]].iter().zip(&weights).all(|(s, w)| w.dims() == *s);
    if states_b != b || !shapes_fit || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "cross-attention: queries {:?}, states {:?}, {heads} heads, key and value weights {:?} and {:?}",
            q.dims(),
            states.dims(),
            weights[0].dims(),
            weights[2].dims()
        );
    }
    let mask = match bias {
        Some(bias) if bias.dims() != [b, 1, 1, n] => {
            candle_core::bail!("cross-attention: a mask of {:?} for {b} rows of {n} states", bias.dims())
        }
        Some(bias) => Some(bias.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = CrossAttentionOp { weights, heads, scale: scale as f32, mask, probabilities: Mutex::new(None), gradients };
    Ok(Some(q.contiguous()?.apply_op3(&states.contiguous()?, &link, op)?))
}

struct CrossAttentionOp {
    /// key weight [d, width], key bias [d], value weight [d, width], value bias [d].
    weights: [Tensor; 4],
    heads: usize,
    scale: f32,
    /// [b, n], added to the scaled scores.
    mask: Option<Vec<f32>>,
    /// The forward's probabilities [b, heads, t, n], for the backward pass.
    probabilities: Mutex<Option<Vec<f32>>>,
    gradients: Gradients,
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    d: usize,
    n: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
}

/// A row-major [rows, cols] view at `ptr` with rows `row` apart.
fn rows<P>(ptr: P, row: usize) -> Strided<P> {
    Strided { ptr, row: row as isize, col: 1 }
}

/// The transpose of a row-major matrix at `ptr` with rows `row` apart.
fn transposed<P>(ptr: P, row: usize) -> Strided<P> {
    Strided { ptr, row: 1, col: row as isize }
}

/// `dst (+)= a·b` on this thread, (m, n, k) the product's sizes.
///
/// # Safety
/// As [`matmul`]'s.
unsafe fn product(
    size: (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: Strided<*const f32>,
) {
    // SAFETY: the caller's contract.
    unsafe { matmul(size, dst, accumulate, a, b, gemm::Parallelism::None) }
}

impl CrossAttentionOp {
    fn dims(&self, q: &Layout, states: &Layout) -> Result<Dims> {
        let (b, t, d) = q.shape().dims3()?;
        let (_, n, width) = states.shape().dims3()?;
        Ok(Dims { b, t, d, n, width, heads: self.heads, head_dim: d / self.heads })
    }

    /// One image's `q_h·W_k,h` for every head, [heads·t, width] (head by head), and `q_h·b_k,h`
    /// [heads·t].
    ///
    /// # Safety
    /// `q` must hold the image's [t, d] rows.
    unsafe fn query_keys(
        &self,
        dims: Dims,
        q: *const f32,
        (key_weight, key_bias): (&[f32], &[f32]),
    ) -> (Vec<f32>, Vec<f32>) {
        let Dims { t, d, width, heads, head_dim, .. } = dims;
        let mut qk = vec![0f32; heads * t * width];
        let mut qb = vec![0f32; heads * t];
        for h in 0..heads {
            let q_h = q.wrapping_add(h * head_dim);
            // SAFETY: q_h [t, head_dim] with rows d apart within the image's rows, the head's
            // rows of the key weight [head_dim, width], the head's rows of qk.
            unsafe {
                product(
                    (t, width, head_dim),
                    rows(qk.as_mut_ptr().add(h * t * width), width),
                    false,
                    rows(q_h, d),
                    rows(key_weight.as_ptr().add(h * head_dim * width), width),
                );
            }
            let head_bias = &key_bias[h * head_dim..][..head_dim];
            for (i, qb) in qb[h * t..][..t].iter_mut().enumerate() {
                // SAFETY: as above.
                *qb = (0..head_dim).map(|c| unsafe { *q_h.add(i * d + c) } * head_bias[c]).sum();
            }
        }
        (qk, qb)
    }
}

/// One image's operands: its states [n, width], the rows of q, dq, context or dcontext [t, d].
fn image_rows(values: &[f32], image: usize, len: usize) -> &[f32] {
    &values[image * len..][..len]
}

impl CustomOp3 for CrossAttentionOp {
    fn name(&self) -> &'static str {
        "cross-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        states: &CpuStorage,
        states_layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(q_layout, states_layout)?;
        let Dims { b, t, d, n, width, heads, head_dim } = dims;
        let q = cpu_f32_slice(q, q_layout, "cross-attention")?;
        let states = cpu_f32_slice(states, states_layout, "cross-attention")?;
        let [kw, kb, vw, vb] = &self.weights;
        let mut context = vec![0f32; b * t * d];
        let mut probabilities = vec![0f32; b * heads * t * n];
        let rows_all = heads * t;
        with_f32_values([kw, kb, vw, vb], |[kw, kb, vw, vb]| {
            let images = probabilities.par_chunks_mut(rows_all * n).zip(context.par_chunks_mut(t * d));
            images.enumerate().for_each(|(image, (p, out))| {
                let s = image_rows(states, image, n * width);
                let mut mixed = vec![0f32; rows_all * width];
                // SAFETY: the image's rows of q [t, d] and of the output, this task's own; each
                // product's views within the buffers named.
                unsafe {
                    let (qk, qb) = self.query_keys(dims, image_rows(q, image, t * d).as_ptr(), (kw, kb));
                    // every head's scores in one product: [heads·t, width]·Sᵀ
                    product(
                        (rows_all, n, width),
                        rows(p.as_mut_ptr(), n),
                        false,
                        rows(qk.as_ptr(), width),
                        transposed(s.as_ptr(), width),
                    );
                    for (row, qb) in p.chunks_mut(n).zip(&qb) {
                        row.iter_mut().for_each(|x| *x = (*x + qb) * self.scale);
                        if let Some(mask) = &self.mask {
                            row.iter_mut().zip(&mask[image * n..]).for_each(|(x, m)| *x += m);
                        }
                    }
                    elementwise::softmax_rows(p, n, 1.0);
                    product(
                        (rows_all, width, n),
                        rows(mixed.as_mut_ptr(), width),
                        false,
                        rows(p.as_ptr(), n),
                        rows(s.as_ptr(), width),
                    );
                    for h in 0..heads {
                        let dst = out.as_mut_ptr().add(h * head_dim);
                        product(
                            (t, head_dim, width),
                            rows(dst, d),
                            false,
                            rows(mixed.as_ptr().add(h * t * width), width),
                            transposed(vw.as_ptr().add(h * head_dim * width), width),
                        );
                    }
                }
                for row in out.chunks_mut(d) {
                    row.iter_mut().zip(vb).for_each(|(x, bias)| *x += bias);
                }
            });
        })?;
        *self.probabilities.lock().unwrap_or_else(PoisonError::into_inner) = Some(probabilities);
        Ok((CpuStorage::F32(context), Shape::from((b, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        states: &Tensor,
        link: &Tensor,
        _context: &Tensor,
        dcontext: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probabilities) = self.probabilities.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            candle_core::bail!("cross-attention: backward before forward, or twice");
        };
        let dims = self.dims(q.layout(), states.layout())?;
        let Dims { b, t, d, n, width, heads, head_dim } = dims;
        let rows_all = heads * t;
        let [kw, kb, vw, _] = &self.weights;
        // the states' gradient is wanted where they are in the graph (a trained vision tower)
        let states_trained = super::in_graph(states);
        let mut dq = vec![0f32; b * t * d];
        let mut dstates = vec![0f32; if states_trained { b * n * width } else { 0 }];
        // per image, for the weights' gradients: M = P·S and dQK = dZ·S [heads·t, width], and
        // the rows' sums of dZ [heads·t]
        let mut mixed = vec![0f32; b * rows_all * width];
        let mut dqk = vec![0f32; b * rows_all * width];
        let mut dz_sums = vec![0f32; b * rows_all];
        let grads = with_f32_values([q, states, dcontext, kw, kb, vw], |[q, states, dc, kw, kb, vw]| {
            let per_image = dq.par_chunks_mut(t * d).zip(mixed.par_chunks_mut(rows_all * width));
            let per_image = per_image.zip(dqk.par_chunks_mut(rows_all * width).zip(dz_sums.par_chunks_mut(rows_all)));
            let mut ds_images: Vec<Option<&mut [f32]>> = if states_trained {
                dstates.chunks_mut(n * width).map(Some).collect()
            } else {
                (0..b).map(|_| None).collect()
            };
            let per_image = per_image.zip(ds_images.par_iter_mut());
            per_image.enumerate().for_each(|(image, (((dq, mixed), (dqk, dz_sums)), ds))| {
                let s = image_rows(states, image, n * width);
                let p = image_rows(&probabilities, image, rows_all * n);
                let (q, dc) = (image_rows(q, image, t * d), image_rows(dc, image, t * d));
                let mut dm = vec![0f32; rows_all * width];
                let mut dz = vec![0f32; rows_all * n];
                // SAFETY: every view lies within the buffer named: this image's rows of q, dc,
                // dq and its blocks of the others, all this task's own.
                unsafe {
                    // M = P·S; dM_h = dC_h·W_v,h
                    product(
                        (rows_all, width, n),
                        rows(mixed.as_mut_ptr(), width),
                        false,
                        rows(p.as_ptr(), n),
                        rows(s.as_ptr(), width),
                    );
                    for h in 0..heads {
                        product(
                            (t, width, head_dim),
                            rows(dm.as_mut_ptr().add(h * t * width), width),
                            false,
                            rows(dc.as_ptr().add(h * head_dim), d),
                            rows(vw.as_ptr().add(h * head_dim * width), width),
                        );
                    }
                    // dP = dM·Sᵀ; dZ = scale·P⊙(dP − Σ_j dP·P); dQK = dZ·S
                    product(
                        (rows_all, n, width),
                        rows(dz.as_mut_ptr(), n),
                        false,
                        rows(dm.as_ptr(), width),
                        transposed(s.as_ptr(), width),
                    );
                    for ((dz, p), sum) in dz.chunks_mut(n).zip(p.chunks(n)).zip(dz_sums.iter_mut()) {
                        let dot: f32 = dz.iter().zip(p).map(|(g, p)| g * p).sum();
                        dz.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot) * self.scale);
                        *sum = dz.iter().sum();
                    }
                    product(
                        (rows_all, width, n),
                        rows(dqk.as_mut_ptr(), width),
                        false,
                        rows(dz.as_ptr(), n),
                        rows(s.as_ptr(), width),
                    );
                    // dq_h = dQK_h·W_k,hᵀ + Σ_j dZ·b_k,h
                    for h in 0..heads {
                        product(
                            (t, head_dim, width),
                            rows(dq.as_mut_ptr().add(h * head_dim), d),
                            false,
                            rows(dqk.as_ptr().add(h * t * width), width),
                            transposed(kw.as_ptr().add(h * head_dim * width), width),
                        );
                        let bias = &kb[h * head_dim..][..head_dim];
                        for (row, sum) in dq.chunks_mut(d).zip(&dz_sums[h * t..][..t]) {
                            row[h * head_dim..][..head_dim].iter_mut().zip(bias).for_each(|(g, b)| *g += sum * b);
                        }
                    }
                    // dS = dZᵀ·(q·W_k) + Pᵀ·dM over every head's rows
                    if let Some(ds) = ds.as_deref_mut() {
                        let (qk, _) = self.query_keys(dims, q.as_ptr(), (kw, kb));
                        product(
                            (n, width, rows_all),
                            rows(ds.as_mut_ptr(), width),
                            false,
                            transposed(dz.as_ptr(), n),
                            rows(qk.as_ptr(), width),
                        );
                        product(
                            (n, width, rows_all),
                            rows(ds.as_mut_ptr(), width),
                            true,
                            transposed(p.as_ptr(), n),
                            rows(dm.as_ptr(), width),
                        );
                    }
                }
            });
            // the weights' gradients, head by head, summed over the images
            let mut grads = [d * width, d, d * width, d].map(|len| vec![0f32; len]);
            let [dkw, dkb, dvw, dvb] = &mut grads;
            let per_head = dkw.par_chunks_mut(head_dim * width).zip(dkb.par_chunks_mut(head_dim));
            let per_head = per_head.zip(dvw.par_chunks_mut(head_dim * width).zip(dvb.par_chunks_mut(head_dim)));
            per_head.enumerate().for_each(|(h, ((dkw, dkb), (dvw, dvb)))| {
                for image in 0..b {
                    let block = (image * heads + h) * t;
                    let q_h = &q[image * t * d + h * head_dim..];
                    let dc_h = &dc[image * t * d + h * head_dim..];
                    // SAFETY: q_h and dc_h [t, head_dim] with rows d apart within the image's
                    // rows; the (image, head) blocks [t, width] of mixed and dqk; this head's
                    // rows of the gradients, this task's own.
                    unsafe {
                        let accumulate = image > 0;
                        product(
                            (head_dim, width, t),
                            rows(dvw.as_mut_ptr(), width),
                            accumulate,
                            transposed(dc_h.as_ptr(), d),
                            rows(mixed.as_ptr().add(block * width), width),
                        );
                        product(
                            (head_dim, width, t),
                            rows(dkw.as_mut_ptr(), width),
                            accumulate,
                            transposed(q_h.as_ptr(), d),
                            rows(dqk.as_ptr().add(block * width), width),
                        );
                    }
                    for i in 0..t {
                        let sum = dz_sums[block + i];
                        dkb.iter_mut().zip(&q_h[i * d..][..head_dim]).for_each(|(g, q)| *g += q * sum);
                        dvb.iter_mut().zip(&dc_h[i * d..][..head_dim]).for_each(|(g, dc)| *g += dc);
                    }
                }
            });
            grads
        })?;
        carrier::leave(&self.gradients, &self.weights, grads.into())?;
        let dq = Tensor::from_vec(dq, (b, t, d), q.device())?;
        let dstates =
            if states_trained { Some(Tensor::from_vec(dstates, (b, n, width), states.device())?) } else { None };
        Ok((Some(dq), dstates, Some(link.zeros_like()?)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::super::attention::attention_to_states_per_op;
    use super::super::linear::Linear;

    fn max_relative(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        diff / scale
    }

    #[test]
    fn the_one_op_cross_attention_trains_as_the_per_op_graph() {
        let device = Device::Cpu;
        let (b, t, d, heads, n, width) = (2, 5, 8, 2, 7, 6);
        let var = |shape: &[usize], seed: f32| {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37 + seed).sin() * 0.8).collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &device).unwrap()).unwrap()
        };
        let (kw, kb, vw, vb) = (var(&[d, width], 1.0), var(&[d], 2.0), var(&[d, width], 3.0), var(&[d], 4.0));
        let key = Linear::new(kw.as_tensor().clone(), Some(kb.as_tensor().clone())).unwrap();
        let value = Linear::new(vw.as_tensor().clone(), Some(vb.as_tensor().clone())).unwrap();
        let q = var(&[b, t, d], 5.0);
        let weights_of_output = var(&[b, t, d], 6.0).as_tensor().detach();
        let mut mask = vec![0f32; b * n];
        mask[n + 5] = f32::MIN;
        mask[n + 6] = f32::MIN;
        let mask = Tensor::from_vec(mask, (b, 1, 1, n), &device).unwrap();
        for (states_trained, masked) in [(false, false), (false, true), (true, true)] {
            let states_var = var(&[b, n, width], 7.0);
            let states = match states_trained {
                true => states_var.as_tensor().clone(),
                false => states_var.as_tensor().detach(),
            };
            let bias = masked.then_some(&mask);
            let weights = [kw.as_tensor(), kb.as_tensor(), vw.as_tensor(), vb.as_tensor()];
            let ours = super::forward(q.as_tensor(), &states, weights, heads, 0.5, bias).unwrap().unwrap();
            let theirs = attention_to_states_per_op(q.as_tensor(), &states, (&key, &value), heads, 0.5, bias).unwrap();
            assert!(max_relative(&ours, &theirs) < 1e-5, "context: {}", max_relative(&ours, &theirs));
            let loss = |x: &Tensor| (x * &weights_of_output).unwrap().sum_all().unwrap().backward().unwrap();
            let (ours, theirs) = (loss(&ours), loss(&theirs));
            let mut checked = vec![q.as_tensor(), kw.as_tensor(), kb.as_tensor(), vw.as_tensor(), vb.as_tensor()];
            if states_trained {
                checked.push(states_var.as_tensor());
            }
            for (index, tensor) in checked.into_iter().enumerate() {
                let (a, b) = (ours.get(tensor).unwrap(), theirs.get(tensor).unwrap());
                // the key bias's gradient is zero up to float noise (softmax cancels a row's
                // constant): its absolute difference; every other gradient's relative to its scale
                let error = if index == 2 {
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
                } else {
                    max_relative(a, b)
                };
                assert!(error <= 1e-5, "gradient {index} (states trained {states_trained}, masked {masked}): {error}");
            }
            if !states_trained {
                assert!(ours.get(states_var.as_tensor()).is_none());
            }
        }
    }
}
