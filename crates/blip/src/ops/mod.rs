//! Tensor-level operations over candle tensors: each runs on this crate's CPU kernels
//! ([`crate::kernels`]) where the tensors allow it, and on candle's own ops otherwise (other
//! devices, other dtypes). The choice of route is made here, by the predicates below.

pub(crate) mod activation;
pub(crate) mod attention;
pub mod linear;
pub(crate) mod norm;
pub(crate) mod tensor;

use candle_core::{DType, Tensor};

/// Whether `t` is on the CPU, where this crate's kernels (and the per-image attention split) run.
pub(crate) fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu()
}

/// Whether the CPU kernels over f32 values take `t` (after a copy to contiguous memory if needed).
pub(crate) fn cpu_f32(t: &Tensor) -> bool {
    on_cpu(t) && t.dtype() == DType::F32
}

/// Whether the in-place CPU kernels take `t` as it is: f32, on the CPU, contiguous.
pub(crate) fn cpu_f32_contiguous(t: &Tensor) -> bool {
    cpu_f32(t) && t.is_contiguous()
}
