//! The exact (erf) GELU on tensors.

use candle_core::{Result, Tensor};

use crate::kernels;

/// The exact (erf) GELU that `hidden_act: "gelu"` means in transformers, of a fresh tensor (a
/// layer's output, which nothing else holds). On contiguous f32 CPU tensors it runs in place,
/// with PyTorch's own vectorized formula, on all threads (candle's runs libm's erf on one thread
/// into a new buffer).
pub(crate) fn gelu(xs: Tensor) -> Result<Tensor> {
    if super::cpu_f32_contiguous(&xs) {
        xs.inplace_op1(&Gelu)?;
        Ok(xs)
    } else if super::in_graph(&xs) && super::on_cpu(&xs) && xs.dtype() == candle_core::DType::F32 {
        // in an autograd graph: out of place, with its backward pass
        xs.contiguous()?.apply_op1(GeluOp)
    } else {
        xs.gelu_erf()
    }
}

/// [`gelu`] of `xs` as `consumer` takes it: rounded to bf16 by this kernel where the
/// consumer's product takes bf16 inputs (the same values it would round them to), f32 else.
pub(crate) fn gelu_for(xs: Tensor, consumer: &super::linear::Linear) -> Result<Tensor> {
    let rows = xs.elem_count() / xs.dims().last().copied().unwrap_or(1).max(1);
    if !(super::cpu_f32_contiguous(&xs) && consumer.takes_bf16(rows)) {
        return gelu(xs);
    }
    let (storage, layout) = xs.storage_and_layout();
    let values = super::tensor::f32_values(&storage, layout)?;
    let rounded = kernels::elementwise::gelu_to_bf16(values);
    Tensor::from_vec(rounded, xs.shape(), &candle_core::Device::Cpu)
}

/// The GELU as an op of candle's autograd.
struct GeluOp;

impl candle_core::CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let mut out = super::tensor::cpu_f32_slice(storage, layout, "gelu")?.to_vec();
        kernels::elementwise::gelu(&mut out);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, _ys: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = super::tensor::with_f32_values([xs, dy], |[x, g]| kernels::backward::gelu(x, g))?;
        Ok(Some(Tensor::from_vec(dx, xs.shape(), xs.device())?))
    }
}

struct Gelu;

impl candle_core::InplaceOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<()> {
        let (candle_core::CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("gelu: contiguous f32 only");
        };
        kernels::elementwise::gelu(&mut data[start..end]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{available, with_isa};

    /// The GELU's backward pass against candle's autograd of its exact GELU.
    #[test]
    fn gelu_backward_matches_candles_autograd() {
        let dev = candle_core::Device::Cpu;
        let xs = (Tensor::randn(0f32, 3.0, (5, 1001), &dev).unwrap() - 0.5).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (5, 1001), &dev).unwrap();
        let grad = |kernel: bool| {
            let x = candle_core::Var::from_tensor(&xs).unwrap();
            let ys = if kernel { gelu(x.as_tensor().clone()).unwrap() } else { x.as_tensor().gelu_erf().unwrap() };
            (ys * &upstream).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let diff = (grad(true) - grad(false)).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn gelu_tensor_matches_candles_exact_one() {
        let xs = (Tensor::randn(0f32, 3.0, (3, 577, 301), &candle_core::Device::Cpu).unwrap() - 0.5).unwrap();
        for isa in available() {
            let ours = with_isa(isa, || gelu(xs.copy().unwrap()).unwrap());
            let diff = (ours - xs.gelu_erf().unwrap()).unwrap().abs().unwrap();
            assert!(diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() < 2e-6, "{isa:?}");
        }
    }
}
