//! `nn.LayerNorm` on tensors.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};

use super::tensor::{cpu_f32_slice, f32_values, with_f32_values};
use crate::kernels;

/// `nn.LayerNorm` over the last dimension. On f32 CPU tensors it runs in one vectorized kernel
/// on all threads, into memory written once (candle's runs on one thread).
#[derive(Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// From the f32 weight and bias [dim] and the config's eps.
    pub(crate) fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// The weight and the bias [dim].
    pub(crate) fn parameters(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }
}

impl LayerNorm {
    /// The same in candle's differentiable ops, as PyTorch computes it: the mean, the biased
    /// variance of the centred values, then the affine map.
    fn differentiable(&self, xs: &Tensor) -> Result<Tensor> {
        let centred = xs.broadcast_sub(&xs.mean_keepdim(candle_core::D::Minus1)?)?;
        let variance = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = centred.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if super::in_graph(xs) || super::in_graph(&self.weight) || super::in_graph(&self.bias) {
            if super::on_cpu(xs) && xs.dtype() == DType::F32 {
                let op = LayerNormOp { eps: self.eps as f32 };
                return xs.contiguous()?.apply_op3(&self.weight, &self.bias, op);
            }
            return self.differentiable(xs);
        }
        if !super::cpu_f32(xs) {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let dim = self.weight.elem_count();
        if xs.dims().last() != Some(&dim) {
            candle_core::bail!("layer norm: input {:?} does not end in the norm's {dim} features", xs.dims());
        }
        self.run_kernel(xs, kernels::elementwise::layer_norm)
    }
}

impl LayerNorm {
    /// `kernel` (xs, weight, bias, eps) on a contiguous f32 CPU input, into a tensor of its shape.
    fn run_kernel<T: candle_core::WithDType>(
        &self,
        xs: &Tensor,
        kernel: fn(&[f32], &[f32], &[f32], f32) -> Vec<T>,
    ) -> Result<Tensor> {
        let xs_contiguous = xs.contiguous()?;
        let (storage, layout) = xs_contiguous.storage_and_layout();
        let (weight, bias) = (self.weight.storage_and_layout(), self.bias.storage_and_layout());
        let normed = kernel(
            f32_values(&storage, layout)?,
            f32_values(&weight.0, weight.1)?,
            f32_values(&bias.0, bias.1)?,
            self.eps as f32,
        );
        Tensor::from_vec(normed, xs.shape(), &candle_core::Device::Cpu)
    }
}

impl LayerNorm {
    /// The normalized `xs` as `consumer` takes them: rounded to bf16 by this kernel where the
    /// consumer's product takes bf16 inputs (the same values it would round them to), f32 else.
    pub(crate) fn forward_for(&self, xs: &Tensor, consumer: &super::linear::Linear) -> Result<Tensor> {
        let dim = self.weight.elem_count();
        let rows = xs.elem_count() / dim.max(1);
        let plain = super::in_graph(xs) || super::in_graph(&self.weight) || super::in_graph(&self.bias);
        if plain || !super::cpu_f32(xs) || xs.dims().last() != Some(&dim) || !consumer.takes_bf16(rows) {
            return candle_core::Module::forward(self, xs);
        }
        self.run_kernel(xs, kernels::elementwise::layer_norm_to_bf16)
    }
}

/// LayerNorm as an op of candle's autograd: the forward kernel, and its backward pass.
struct LayerNormOp {
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let (weight, bias) =
            (cpu_f32_slice(weight, weight_layout, "layer norm")?, cpu_f32_slice(bias, bias_layout, "layer norm")?);
        let normed =
            kernels::elementwise::layer_norm(cpu_f32_slice(xs, xs_layout, "layer norm")?, weight, bias, self.eps);
        Ok((CpuStorage::F32(normed), xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dweight, dbias) =
            with_f32_values([xs, weight, dy], |[x, w, g]| kernels::backward::layer_norm(x, w, g, self.eps))?;
        let device = xs.device();
        let d = weight.elem_count();
        Ok((
            Some(Tensor::from_vec(dx, xs.shape(), device)?),
            Some(Tensor::from_vec(dweight, d, device)?),
            Some(Tensor::from_vec(dbias, d, device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

    /// LayerNorm's backward pass against candle's autograd through the plain formula.
    #[test]
    fn layer_norm_backward_matches_candles_autograd() {
        let dev = candle_core::Device::Cpu;
        let xs = (Tensor::randn(0f32, 3.0, (3, 7, 301), &dev).unwrap() + 2.0).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (3, 7, 301), &dev).unwrap();
        let weight = Tensor::randn(1f32, 0.3, 301, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.2, 301, &dev).unwrap();
        let grads = |kernel: bool| {
            let x = candle_core::Var::from_tensor(&xs).unwrap();
            let w = candle_core::Var::from_tensor(&weight).unwrap();
            let b = candle_core::Var::from_tensor(&bias).unwrap();
            let norm = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
            let ys = if kernel {
                candle_core::Module::forward(&norm, x.as_tensor()).unwrap()
            } else {
                norm.differentiable(x.as_tensor()).unwrap()
            };
            let store = (ys * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            [x, w, b].map(|v| store.get(v.as_tensor()).unwrap().clone())
        };
        let (ours, expected) = (grads(true), grads(false));
        let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        for (name, (a, b)) in ["x", "weight", "bias"].iter().zip(ours.iter().zip(&expected)) {
            let diff = max(&(a - b).unwrap());
            assert!(diff < 1e-4 * max(b), "{name}: {diff} of {}", max(b));
        }
    }

    #[test]
    fn layer_norm_matches_the_f64_formula() {
        let dev = candle_core::Device::Cpu;
        // rows far from zero mean (the variance must come from centred values), 301 features
        // leave a remainder lane
        let xs = (Tensor::randn(0f32, 3.0, (2, 5, 301), &dev).unwrap() + 40.0).unwrap();
        let weight = Tensor::randn(1f32, 0.5, 301, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 301, &dev).unwrap();
        let norm = LayerNorm { weight: weight.clone(), bias: bias.clone(), eps: 1e-5 };
        let x = xs.to_dtype(DType::F64).unwrap();
        let centred = x.broadcast_sub(&x.mean_keepdim(2).unwrap()).unwrap();
        let variance = centred.sqr().unwrap().mean_keepdim(2).unwrap();
        let expected = centred
            .broadcast_div(&(variance + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&weight.to_dtype(DType::F64).unwrap())
            .unwrap()
            .broadcast_add(&bias.to_dtype(DType::F64).unwrap())
            .unwrap();
        for isa in available() {
            let ours = with_isa(isa, || candle_core::Module::forward(&norm, &xs).unwrap());
            assert_eq!(ours.dims(), xs.dims());
            let diff = (ours.to_dtype(DType::F64).unwrap() - &expected).unwrap().abs().unwrap();
            let max = diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(max < 2e-5, "{isa:?}: {max}");
        }
    }
}
