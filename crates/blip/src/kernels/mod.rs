//! Hand-written CPU kernels over f32 slices, for the steps where candle's generic ops cost more
//! than the arithmetic: products of a few rows, GELU, LayerNorm, softmax, attention.
//!
//! Each kernel with an AVX2 version also has a portable one, written in independent lanes so that
//! the compiler vectorizes it for the baseline target; [`dispatch`] picks one per process
//! (`BLIP_KERNELS=portable` forces the portable ones). The tensor-level ops that call these live
//! in `crate::ops`.

pub(crate) mod amx;
pub(crate) mod attention;
pub(crate) mod backward;
pub(crate) mod blas;
pub(crate) mod dispatch;
pub(crate) mod elementwise;
pub(crate) mod few_rows;
pub(crate) mod math;
pub(crate) mod onednn;
pub(crate) mod widen;

/// Which code runs the computations on this CPU, one line each (what `blip --version` prints):
/// the hand-written kernels' instruction set, the f32 products' library, and how models loaded
/// in bf16 multiply.
pub fn compute_paths() -> String {
    let kernels = match dispatch::isa() {
        dispatch::Isa::Avx2Fma(proof) if proof.avx512().is_some() => {
            "AVX2 + FMA, AVX-512 (elementwise, f32 vision attention, decoding's products and cross-attention)"
        }
        dispatch::Isa::Avx2Fma(_) => "AVX2 + FMA",
        dispatch::Isa::Portable => "portable",
    };
    let (products, bf16) = dispatch::bf16_choice();
    let tiles = match (products, amx::Amx::detect()) {
        (dispatch::Bf16Products::OneDnn(_), Some(_)) => {
            "; AMX tiles (bf16 vision attention, decoding's bf16 products and cross-attention)"
        }
        _ => "",
    };
    format!("kernels: {kernels}{tiles}\nf32 products: {}\nbf16 models: {bf16}", blas::describe())
}

/// Whether models loaded in bf16 multiply in bf16 in this process (oneDNN's products, where the
/// CPU has bf16 instructions or `BLIP_BF16=onednn`), rather than widening the weights to f32.
pub fn bf16_products_in_bf16() -> bool {
    matches!(dispatch::bf16_choice().0, dispatch::Bf16Products::OneDnn(_))
}
