//! The networks, one struct per transformers module, each loading its weights by the names the
//! checkpoints use (`vision_model.encoder.layers.0.self_attn.qkv.weight`, ...).

pub mod cache;
pub mod captioning;
pub mod contrastive;
pub mod question_answering;
pub mod retrieval;
pub mod text;
pub mod vision;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// `nn.Linear` with bias, as every BLIP projection has.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

/// `nn.LayerNorm` with the config's eps.
pub(crate) fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<candle_nn::LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb)
}

/// The exact (erf) GELU that `hidden_act: "gelu"` means in transformers.
pub(crate) fn gelu(xs: &Tensor) -> Result<Tensor> {
    xs.gelu_erf()
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
