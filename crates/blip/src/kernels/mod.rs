//! Hand-written CPU kernels over f32 slices, for the steps where candle's generic ops cost more
//! than the arithmetic: products of a few rows, GELU, LayerNorm, softmax, attention.
//!
//! Each kernel with an AVX2 version also has a portable one, written in independent lanes so that
//! the compiler vectorizes it for the baseline target; [`dispatch`] picks one per process
//! (`BLIP_KERNELS=portable` forces the portable ones). The tensor-level ops that call these live
//! in `crate::ops`.

pub(crate) mod attention;
pub(crate) mod backward;
pub(crate) mod blas;
pub(crate) mod dispatch;
pub(crate) mod elementwise;
pub(crate) mod few_rows;
pub(crate) mod math;
pub(crate) mod widen;
