//! The networks, one struct per transformers module, each loading its weights by the names the
//! checkpoints use (`vision_model.encoder.layers.0.self_attn.qkv.weight`, ...).

mod cache;
pub mod captioning;
pub mod contrastive;
pub mod question_answering;
pub mod retrieval;
pub mod text;
pub mod text_decoder;
pub mod vision;

use candle_core::{DType, Result};
use candle_nn::VarBuilder;

pub use crate::ops::linear::Linear;
pub use cache::DecoderCache;

use crate::ops::norm::LayerNorm;

/// `nn.Linear` with bias, as every BLIP projection has. The weight is read in the builder's
/// dtype (the model's load dtype), the bias in f32.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.to_dtype(DType::F32).get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// `nn.LayerNorm` with the config's eps, in f32 whatever the load dtype.
pub(crate) fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let vb = vb.to_dtype(DType::F32);
    Ok(LayerNorm::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
}
