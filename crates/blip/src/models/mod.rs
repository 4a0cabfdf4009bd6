//! The networks, one struct per transformers module, each loading its weights by the names the
//! checkpoints use (`vision_model.encoder.layers.0.self_attn.qkv.weight`, ...).

pub mod cache;
pub mod captioning;
pub mod contrastive;
pub mod linear;
pub mod question_answering;
pub mod retrieval;
pub mod text;
pub mod vision;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use linear::Linear;

/// `nn.Linear` with bias, as every BLIP projection has. The weight is read in the builder's
/// dtype (the model's load dtype), the bias in f32.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.to_dtype(DType::F32).get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// `nn.LayerNorm` with the config's eps, in f32 whatever the load dtype.
pub(crate) fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<candle_nn::LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb.to_dtype(DType::F32))
}

/// The exact (erf) GELU that `hidden_act: "gelu"` means in transformers. On contiguous f32 CPU
/// tensors it runs on all threads (candle's element-wise ops run on one), with candle's own
/// per-element formula, so the results are bit-identical.
pub(crate) fn gelu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 && xs.is_contiguous() {
        xs.apply_op1_no_bwd(&ParallelGeluErf)
    } else {
        xs.gelu_erf()
    }
}

struct ParallelGeluErf;

impl candle_core::CustomOp1 for ParallelGeluErf {
    fn name(&self) -> &'static str {
        "parallel-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::op::{GeluErf, UnaryOpT};
        use rayon::prelude::*;
        let (candle_core::CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("parallel gelu: contiguous f32 only");
        };
        let input = &data[start..end];
        let mut output = vec![0f32; input.len()];
        let chunk = input.len().div_ceil(candle_core::utils::get_num_threads()).max(1 << 14);
        output.par_chunks_mut(chunk).zip(input.par_chunks(chunk)).for_each(|(out, inp)| {
            for (o, &v) in out.iter_mut().zip(inp) {
                *o = GeluErf::f32(v);
            }
        });
        Ok((candle_core::CpuStorage::F32(output), layout.shape().clone()))
    }
}

/// Multi-head split: [b, t, h*d] → [b, h, t, d].
pub(crate) fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = xs.dims3()?;
    xs.reshape((b, t, heads, width / heads))?.transpose(1, 2)?.contiguous()
}

/// Inverse of [`split_heads`]: [b, h, t, d] → [b, t, h*d].
pub(crate) fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, t, h * d))
}

/// softmax(q·kᵀ·scale + bias)·v over heads; `bias` is additive and broadcast to the scores.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_gelu_is_bit_identical_to_candles() {
        let xs = (Tensor::randn(0f32, 3.0, (3, 577, 301), &candle_core::Device::Cpu).unwrap() - 0.5).unwrap();
        let ours = gelu(&xs).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = xs.gelu_erf().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(ours.iter().zip(&theirs).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
