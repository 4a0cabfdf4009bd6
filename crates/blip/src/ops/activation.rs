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
    } else {
        xs.gelu_erf()
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
