//! `nn.LayerNorm` on tensors.

use candle_core::{Result, Tensor};

use super::tensor::f32_values;
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
            return self.differentiable(xs);
        }
        if !super::cpu_f32(xs) {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let dim = self.weight.elem_count();
        if xs.dims().last() != Some(&dim) {
            candle_core::bail!("layer norm: input {:?} does not end in the norm's {dim} features", xs.dims());
        }
        let xs_contiguous = xs.contiguous()?;
        let (storage, layout) = xs_contiguous.storage_and_layout();
        let (weight, bias) = (self.weight.storage_and_layout(), self.bias.storage_and_layout());
        let normed = kernels::elementwise::layer_norm(
            f32_values(&storage, layout)?,
            f32_values(&weight.0, weight.1)?,
            f32_values(&bias.0, bias.1)?,
            self.eps as f32,
        );
        Tensor::from_vec(normed, xs.shape(), &candle_core::Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

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
