//! The general matrix product over strided f32 views: OpenBLAS's sgemm with the `openblas`
//! feature, split over rayon's threads by this crate, otherwise the `gemm` crate. Both keep their
//! own instruction-set dispatch.

/// A matrix operand for [`matmul`]: where element (0, 0) is and the steps between rows and
/// between columns, in elements.
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row: isize,
    pub col: isize,
}

/// `dst = a·b`, or `dst += a·b` when `accumulate`, for a [m, k], b [k, n] and dst [m, n] with
/// any strides, on this thread or over `parallelism`'s threads. With the `openblas` feature
/// OpenBLAS's sgemm computes it wherever the strides fit BLAS's layouts (all of this project's
/// calls), otherwise the `gemm` crate.
///
/// # Safety
/// Every element the three views address must lie within its buffer, and dst must not overlap
/// a or b.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    parallelism: gemm::Parallelism,
) {
    #[cfg(feature = "openblas")]
    if let Some(call) = openblas::SgemmCall::new((m, n, k), &dst, &a, &b).filter(|_| openblas::knows_this_cpu()) {
        // SAFETY: the views, by the caller's contract; `new` checked that BLAS can address them.
        return unsafe { call.run(dst.ptr, accumulate, a.ptr, b.ptr, parallelism) };
    }
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the views lie within their buffers and dst overlaps neither operand, by the
    // caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            accumulate,
            a.ptr,
            a.col,
            a.row,
            b.ptr,
            b.col,
            b.row,
            alpha,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
}

/// OpenBLAS's sgemm, always single-threaded in the calling thread: the parallel split is this
/// project's (rayon's pool), so OpenBLAS's own threads never spin against rayon's.
#[cfg(feature = "openblas")]
mod openblas {
    use std::os::raw::c_int;
    use std::sync::Once;

    use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE};
    use rayon::prelude::*;

    use super::Strided;

    extern "C" {
        fn openblas_set_num_threads(threads: c_int);
        fn openblas_get_corename() -> *const std::ffi::c_char;
    }

    /// OpenBLAS's kernels that use AVX2 and FMA (or AVX-512), by the core names it reports.
    const AVX2_CORES: [&str; 6] = ["haswell", "zen", "skylakex", "cooperlake", "sapphirerapids", "excavator"];

    /// Whether OpenBLAS runs kernels made for this CPU: a release older than the CPU runs its
    /// generic SSE3 kernel ("Prescott"), several times slower than the `gemm` crate, which is
    /// then used instead. Decided once.
    pub(super) fn knows_this_cpu() -> bool {
        static KNOWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *KNOWS.get_or_init(|| {
            // SAFETY: returns a pointer to a static NUL-terminated string.
            let core = unsafe { std::ffi::CStr::from_ptr(openblas_get_corename()) }.to_string_lossy().to_lowercase();
            let has_avx2 = matches!(crate::kernels::dispatch::detected(), crate::kernels::dispatch::Isa::Avx2Fma(_));
            let knows = !has_avx2 || AVX2_CORES.contains(&core.as_str());
            if !knows {
                tracing::debug!(
                    "OpenBLAS runs its {core} kernel on this CPU: matrix products on the gemm crate instead"
                );
            }
            knows
        })
    }

    /// "OpenBLAS (Haswell kernels)", or why it is not used.
    pub(crate) fn describe() -> String {
        // SAFETY: as in knows_this_cpu.
        let core = unsafe { std::ffi::CStr::from_ptr(openblas_get_corename()) }.to_string_lossy().into_owned();
        if knows_this_cpu() {
            format!("OpenBLAS ({core} kernels)")
        } else {
            format!("the gemm crate (OpenBLAS would run its generic {core} kernel on this CPU)")
        }
    }

    /// Fewest rows or columns of dst per thread worth a split.
    const MIN_PART: usize = 64;

    /// A product whose views BLAS can address: the layout dst is in, and how a and b are read.
    pub(super) struct SgemmCall {
        dims: (usize, usize, usize),
        layout: CBLAS_LAYOUT,
        ld_dst: usize,
        a: (CBLAS_TRANSPOSE, usize),
        b: (CBLAS_TRANSPOSE, usize),
        /// Elements between rows of dst and of a, to split the rows among threads.
        row_steps: (isize, isize),
        /// Elements between columns of dst and of b, to split the columns among threads.
        col_steps: (isize, isize),
    }

    impl SgemmCall {
        pub(super) fn new(
            (m, n, k): (usize, usize, usize),
            dst: &Strided<*mut f32>,
            a: &Strided<*const f32>,
            b: &Strided<*const f32>,
        ) -> Option<Self> {
            // BLAS takes sizes and strides as C ints.
            let fits = |x: usize| x > 0 && x <= c_int::MAX as usize;
            let strides = [dst.row, dst.col, a.row, a.col, b.row, b.col];
            if ![m, n, k].into_iter().all(fits) || !strides.into_iter().all(|x| fits(x.unsigned_abs())) {
                return None;
            }
            // In BLAS terms a view is (lead, unit): the step between its rows (row-major) or
            // columns (column-major), which must be at least their length, and 1.
            let (layout, ld_dst) = if dst.col == 1 && dst.row >= n as isize {
                (CBLAS_LAYOUT::CblasRowMajor, dst.row)
            } else if dst.row == 1 && dst.col >= m as isize {
                (CBLAS_LAYOUT::CblasColMajor, dst.col)
            } else {
                return None;
            };
            let operand = |view_row: isize, view_col: isize, rows: usize, cols: usize| {
                let (lead, unit, natural, transposed) = match layout {
                    CBLAS_LAYOUT::CblasRowMajor => (view_row, view_col, cols, rows),
                    CBLAS_LAYOUT::CblasColMajor => (view_col, view_row, rows, cols),
                };
                if unit == 1 && lead >= natural as isize {
                    Some((CBLAS_TRANSPOSE::CblasNoTrans, lead as usize))
                } else if lead == 1 && unit >= transposed as isize {
                    Some((CBLAS_TRANSPOSE::CblasTrans, unit as usize))
                } else {
                    None
                }
            };
            Some(Self {
                dims: (m, n, k),
                layout,
                ld_dst: ld_dst as usize,
                a: operand(a.row, a.col, m, k)?,
                b: operand(b.row, b.col, k, n)?,
                row_steps: (dst.row, a.row),
                col_steps: (dst.col, b.col),
            })
        }

        /// # Safety
        /// As [`super::matmul`]'s.
        pub(super) unsafe fn run(
            &self,
            dst: *mut f32,
            accumulate: bool,
            a: *const f32,
            b: *const f32,
            parallelism: gemm::Parallelism,
        ) {
            static SINGLE_THREADED: Once = Once::new();
            // SAFETY: sets a global of OpenBLAS's, before its first product.
            SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
            let (m, n, _) = self.dims;
            // Each thread packs its share of the split operand and all of the other: split the
            // larger of dst's rows (a) and columns (b).
            let split_rows = m >= n;
            let along = if split_rows { m } else { n };
            let threads = match parallelism {
                gemm::Parallelism::Rayon(threads) => threads.clamp(1, along.div_ceil(MIN_PART)),
                _ => 1,
            };
            if threads == 1 {
                // SAFETY: the whole product, as the caller's contract allows.
                return unsafe { self.sgemm((m, n), dst, accumulate, a, b) };
            }
            let per_part = along.div_ceil(threads);
            // Pointers cross threads as addresses; each part writes its own block of dst.
            let (dst, a, b) = (dst as usize, a as usize, b as usize);
            (0..threads).into_par_iter().for_each(|part| {
                let first = (part * per_part) as isize;
                let len = per_part.min(along - part * per_part);
                // SAFETY: rows (or columns) first..first + len of dst and a (or b), within the
                // caller's views.
                unsafe {
                    let (dst, a, b) = (dst as *mut f32, a as *const f32, b as *const f32);
                    if split_rows {
                        let dst = dst.offset(first * self.row_steps.0);
                        self.sgemm((len, n), dst, accumulate, a.offset(first * self.row_steps.1), b)
                    } else {
                        let dst = dst.offset(first * self.col_steps.0);
                        self.sgemm((m, len), dst, accumulate, a, b.offset(first * self.col_steps.1))
                    }
                }
            });
        }

        /// One sgemm call on this thread, of m × n of dst.
        ///
        /// # Safety
        /// As [`super::matmul`]'s, for the (m, n) block at `dst`, `a` and `b`.
        unsafe fn sgemm(&self, (m, n): (usize, usize), dst: *mut f32, accumulate: bool, a: *const f32, b: *const f32) {
            let k = self.dims.2;
            let beta = if accumulate { 1.0 } else { 0.0 };
            // SAFETY: sizes and leading dimensions that `new` checked against the views, which
            // lie within their buffers by the caller's contract.
            unsafe {
                cblas_sys::cblas_sgemm(
                    self.layout,
                    self.a.0,
                    self.b.0,
                    m as c_int,
                    n as c_int,
                    k as c_int,
                    1.0,
                    a,
                    self.a.1 as c_int,
                    b,
                    self.b.1 as c_int,
                    beta,
                    dst,
                    self.ld_dst as c_int,
                )
            };
        }
    }
}

/// Which library runs the f32 products here, e.g. "OpenBLAS (Haswell kernels)".
pub(crate) fn describe() -> String {
    #[cfg(feature = "openblas")]
    return openblas::describe();
    #[cfg(not(feature = "openblas"))]
    "the gemm crate".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way this project lays out a product's operands (each row- or column-major) and
    /// its destination, alone and split over threads (by rows, then by columns), with and
    /// without accumulating: the same as the product in f64.
    #[test]
    fn matmul_matches_the_product_in_every_layout() {
        for dims in [(150, 37, 70), (37, 150, 70)] {
            matmul_matches_the_product_in_every_layout_for(dims);
        }
    }

    fn matmul_matches_the_product_in_every_layout_for((m, n, k): (usize, usize, usize)) {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0).collect()
        };
        let (a, b, start) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
        // (row step, column step) of an [r, c] matrix stored row-major or column-major
        let strides = |r: usize, c: usize, row_major: bool| if row_major { (c as isize, 1) } else { (1, r as isize) };
        for layouts in 0..8 {
            let (a_rows, b_rows, dst_rows) = (layouts & 1 == 0, layouts & 2 == 0, layouts & 4 == 0);
            let at = |i: usize, j: usize| if a_rows { a[i * k + j] } else { a[j * m + i] };
            let bt = |i: usize, j: usize| if b_rows { b[i * n + j] } else { b[j * k + i] };
            let (dst_row, dst_col) = strides(m, n, dst_rows);
            for (accumulate, parallelism) in [(false, gemm::Parallelism::None), (true, gemm::Parallelism::Rayon(3))] {
                let mut dst = start.clone();
                let (a_row, a_col) = strides(m, k, a_rows);
                let (b_row, b_col) = strides(k, n, b_rows);
                let dst_view = Strided { ptr: dst.as_mut_ptr(), row: dst_row, col: dst_col };
                let a_view = Strided { ptr: a.as_ptr(), row: a_row, col: a_col };
                let b_view = Strided { ptr: b.as_ptr(), row: b_row, col: b_col };
                #[cfg(feature = "openblas")]
                assert!(
                    !openblas::knows_this_cpu()
                        || openblas::SgemmCall::new((m, n, k), &dst_view, &a_view, &b_view).is_some(),
                    "layouts {layouts}"
                );
                // SAFETY: each view covers exactly its buffer.
                unsafe { matmul((m, n, k), dst_view, accumulate, a_view, b_view, parallelism) }
                for i in 0..m {
                    for j in 0..n {
                        let at_dst = (i as isize * dst_row + j as isize * dst_col) as usize;
                        let product: f64 = (0..k).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
                        let expected = product + if accumulate { start[at_dst] as f64 } else { 0.0 };
                        let got = dst[at_dst] as f64;
                        assert!((got - expected).abs() < 1e-4, "layouts {layouts} ({i}, {j}): {got} vs {expected}");
                    }
                }
            }
        }
    }
}
