//! Tensor-level operations over candle tensors: each runs on this crate's CPU kernels
//! ([`crate::kernels`]) where the tensors allow it, and on candle's own ops otherwise (other
//! devices, other dtypes, and tensors in an autograd graph, which the kernels would cut). The
//! choice of route is made here, by the predicates below.

pub(crate) mod activation;
pub(crate) mod attention;
mod carrier;
pub mod linear;
pub(crate) mod norm;
pub(crate) mod tensor;
pub(crate) mod trained_cross_attention;
pub(crate) mod trained_vision;

use candle_core::{DType, Tensor};

/// Whether `t` is on the CPU, where this crate's kernels (and the per-image attention split) run.
pub(crate) fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu()
}

/// Whether `t` takes part in an autograd graph (a trained weight, or computed from one): such
/// tensors go through candle's differentiable ops, since the kernels' outputs carry no graph.
pub(crate) fn in_graph(t: &Tensor) -> bool {
    t.track_op()
}

/// Whether the CPU kernels over f32 values take `t` (after a copy to contiguous memory if
/// needed): f32, on the CPU, outside any autograd graph.
pub(crate) fn cpu_f32(t: &Tensor) -> bool {
    on_cpu(t) && t.dtype() == DType::F32 && !in_graph(t)
}

/// Whether the in-place CPU kernels take `t` as it is: f32, on the CPU, contiguous.
pub(crate) fn cpu_f32_contiguous(t: &Tensor) -> bool {
    cpu_f32(t) && t.is_contiguous()
}
