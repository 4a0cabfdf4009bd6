//! Weighted sums of rows, `out += coef·w`, in AVX2 or AVX-512 register tiles: the mixing step
//! of the attention kernels, with `w` in any stored precision.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use crate::kernels::dispatch::{isa, Isa};
use crate::kernels::widen::Widen;

/// `out[i][e] += Σ_l coef[i][l] · w[l][e]` for i < m, l < len, e < width: the rows of `w`
/// weighted by the rows of `coef`. Each matrix is given by its first element and the step
/// between its rows.
///
/// # Safety
/// Every element addressed must lie within its buffer, and `out` must not overlap the others.
pub(super) unsafe fn combine_rows<W: Widen>(
    (coef, coef_row): (*const f32, usize),
    (m, len): (usize, usize),
    (w, w_row): (*const W, usize),
    width: usize,
    (out, out_row): (*mut f32, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if let Isa::Avx2Fma(proof) = isa() {
        if proof.avx512().is_some() {
            // SAFETY: the AVX-512 proof shows the features; the matrices, by the caller's contract.
            return unsafe { combine_rows_avx512((coef, coef_row), (m, len), (w, w_row), width, (out, out_row)) };
        }
        // SAFETY: Isa::Avx2Fma proves the features; the matrices, by the caller's contract.
        return unsafe { combine_rows_avx2((coef, coef_row), (m, len), (w, w_row), width, (out, out_row)) };
    }
    for i in 0..m {
        for l in 0..len {
            // SAFETY: elements of the m × len, len × width and m × width matrices, within their
            // buffers by the caller's contract.
            unsafe {
                let c = *coef.add(i * coef_row + l);
                for e in 0..width {
                    *out.add(i * out_row + e) += c * (*w.add(l * w_row + e)).widen();
                }
            }
        }
    }
}

/// Rows of `w` per pass: a pass updates all of `out` from 32 rows of `w` (24 KB at 192 columns),
/// which stay in L1 while every tile of `out` reads them.
const COMBINE_BLOCK: usize = 32;

/// Tiles of up to 6 rows × 16 columns (12 sums; 2 loads and 6 broadcasts per 12 FMAs), or, for
/// a single row, 1 × 64 (8 sums), then 8 columns at a time.
///
/// # Safety
/// As [`combine_rows`]', on a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn combine_rows_avx2<W: Widen>(
    coef: (*const f32, usize),
    sizes: (usize, usize),
    w: (*const W, usize),
    width: usize,
    out: (*mut f32, usize),
) {
    // SAFETY: the tiles stay within the columns `by_blocks` hands over, the rest as the caller's
    // contract; the features, by the caller's contract.
    unsafe {
        by_blocks(coef, sizes, w, width, out, |tile, rows| {
            let mut e = 0;
            if rows == 1 {
                while e + 64 <= width {
                    tile.at(e).run::<1, 8>();
                    e += 64;
                }
            } else {
                while e + 16 <= width {
                    tile.at(e).run_rows(rows);
                    e += 16;
                }
            }
            while e + 8 <= width {
                match rows {
                    6 => tile.at(e).run::<6, 1>(),
                    5 => tile.at(e).run::<5, 1>(),
                    4 => tile.at(e).run::<4, 1>(),
                    3 => tile.at(e).run::<3, 1>(),
                    2 => tile.at(e).run::<2, 1>(),
                    _ => tile.at(e).run::<1, 1>(),
                }
                e += 8;
            }
            e
        })
    }
}

/// [`combine_rows_avx2`] in AVX-512 registers: tiles of up to 6 rows × 32 columns, or, for a
/// single row, 1 × 128, then 16 columns at a time.
///
/// # Safety
/// As [`combine_rows`]', on a CPU with AVX-512 F and BW, AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn combine_rows_avx512<W: Widen>(
    coef: (*const f32, usize),
    sizes: (usize, usize),
    w: (*const W, usize),
    width: usize,
    out: (*mut f32, usize),
) {
    // SAFETY: the tiles stay within the columns `by_blocks` hands over, the rest as the caller's
    // contract; the features, by the caller's contract.
    unsafe {
        by_blocks(coef, sizes, w, width, out, |tile, rows| {
            let mut e = 0;
            if rows == 1 {
                while e + 128 <= width {
                    tile.at(e).run16::<1, 8>();
                    e += 128;
                }
            } else {
                while e + 32 <= width {
                    match rows {
                        6 => tile.at(e).run16::<6, 2>(),
                        5 => tile.at(e).run16::<5, 2>(),
                        4 => tile.at(e).run16::<4, 2>(),
                        3 => tile.at(e).run16::<3, 2>(),
                        _ => tile.at(e).run16::<2, 2>(),
                    }
                    e += 32;
                }
            }
            while e + 16 <= width {
                match rows {
                    6 => tile.at(e).run16::<6, 1>(),
                    5 => tile.at(e).run16::<5, 1>(),
                    4 => tile.at(e).run16::<4, 1>(),
                    3 => tile.at(e).run16::<3, 1>(),
                    2 => tile.at(e).run16::<2, 1>(),
                    _ => tile.at(e).run16::<1, 1>(),
                }
                e += 16;
            }
            e
        })
    }
}

/// The loop both register-tile versions share: passes of [`COMBINE_BLOCK`] rows of `w`, each
/// updating all of `out` by groups of up to 6 rows. Each group first copies its coefficients,
/// interleaved by row, so that a tile's broadcasts read one pointer at fixed offsets (strided
/// rows had the compiler spill their addresses); `columns(tile, rows)` runs the group's tiles
/// from column 0 (`tile.at(e)` for column e) and returns the first column it left, which is
/// finished here one element at a time.
///
/// # Safety
/// As [`combine_rows`]'; `columns` must stay within `width` columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn by_blocks<W: Widen>(
    (coef, coef_row): (*const f32, usize),
    (m, len): (usize, usize),
    (w, w_row): (*const W, usize),
    width: usize,
    (out, out_row): (*mut f32, usize),
    columns: impl Fn(CombineTile<W>, usize) -> usize,
) {
    // SAFETY: the tiles address rows i..i + rows of coef and out, rows first..first + block of w
    // and the columns `columns` covers, the remainder below width: all within the matrices by
    // the caller's contract.
    unsafe {
        let mut packed = [0f32; COMBINE_BLOCK * 6];
        for first in (0..len).step_by(COMBINE_BLOCK) {
            let block = (len - first).min(COMBINE_BLOCK);
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(6);
                for l in 0..block {
                    for r in 0..rows {
                        packed[l * rows + r] = *coef.add((i + r) * coef_row + first + l);
                    }
                }
                let tile = CombineTile {
                    coef: packed.as_ptr(),
                    coef_step: rows,
                    len: block,
                    w: w.add(first * w_row),
                    w_row,
                    out: out.add(i * out_row),
                    out_row,
                    accumulate: true,
                };
                let done = columns(tile, rows);
                for r in 0..rows {
                    for e in done..width {
                        let sum: f32 =
                            (0..block).map(|l| packed[l * rows + r] * (*w.add((first + l) * w_row + e)).widen()).sum();
                        *out.add((i + r) * out_row + e) += sum;
                    }
                }
                i += rows;
            }
        }
    }
}

/// One tile of [`combine_rows_avx2`] or [`combine_rows_avx512`], from its first row and column;
/// the coefficients packed [len, R].
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct CombineTile<W> {
    pub coef: *const f32,
    /// Elements from one coefficient row (one `l`) to the next: R when packed.
    pub coef_step: usize,
    pub len: usize,
    pub w: *const W,
    pub w_row: usize,
    pub out: *mut f32,
    pub out_row: usize,
    /// Whether the products add to `out` or replace it.
    pub accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl<W: Widen> CombineTile<W> {
    /// The same tile from `e` columns further on.
    #[inline(always)]
    fn at(self, e: usize) -> Self {
        Self { w: self.w.wrapping_add(e), out: self.out.wrapping_add(e), ..self }
    }

    /// [`Self::run`] for `rows` ≤ 6 rows × 16 columns.
    ///
    /// # Safety
    /// As [`Self::run`]'s.
    #[inline(always)]
    pub(super) unsafe fn run_rows(&self, rows: usize) {
        // SAFETY: as the caller's contract.
        unsafe {
            match rows {
                6 => self.run::<6, 2>(),
                5 => self.run::<5, 2>(),
                4 => self.run::<4, 2>(),
                3 => self.run::<3, 2>(),
                2 => self.run::<2, 2>(),
                _ => self.run::<1, 2>(),
            }
        }
    }

    /// R rows × V registers of 8 columns, accumulated onto `out` (or written over it, unless
    /// `self.accumulate`).
    ///
    /// # Safety
    /// As [`combine_rows`]', on a CPU with AVX2, FMA and F16C.
    #[inline(always)]
    unsafe fn run<const R: usize, const V: usize>(&self) {
        // SAFETY: R rows and 8·V columns from the tile's first, within its matrices, by the caller's
        // contract; the features likewise.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            if self.accumulate {
                for (r, sums) in acc.iter_mut().enumerate() {
                    for (v, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm256_loadu_ps(self.out.add(r * self.out_row + 8 * v));
                    }
                }
            }
            let (mut coef, mut w) = (self.coef, self.w);
            for _ in 0..self.len {
                let mut weights = [_mm256_setzero_ps(); V];
                for (v, weight) in weights.iter_mut().enumerate() {
                    *weight = W::widen8(w.add(8 * v));
                }
                for (r, sums) in acc.iter_mut().enumerate() {
                    let c = _mm256_broadcast_ss(&*coef.add(r));
                    for (sum, &weight) in sums.iter_mut().zip(&weights) {
                        *sum = _mm256_fmadd_ps(c, weight, *sum);
                    }
                }
                coef = coef.add(self.coef_step);
                w = w.add(self.w_row);
            }
            for (r, sums) in acc.iter().enumerate() {
                for (v, &sum) in sums.iter().enumerate() {
                    _mm256_storeu_ps(self.out.add(r * self.out_row + 8 * v), sum);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<W: Widen> CombineTile<W> {
    /// [`Self::run`] in AVX-512 registers: R rows × V registers of 16 columns.
    ///
    /// # Safety
    /// As [`combine_rows`]', on a CPU with AVX-512 F and BW.
    #[inline(always)]
    pub(super) unsafe fn run16<const R: usize, const V: usize>(&self) {
        // SAFETY: R rows and 16·V columns from the tile's first, within its matrices, by the
        // caller's contract; the features likewise.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            if self.accumulate {
                for (r, sums) in acc.iter_mut().enumerate() {
                    for (v, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm512_loadu_ps(self.out.add(r * self.out_row + 16 * v));
                    }
                }
            }
            let (mut coef, mut w) = (self.coef, self.w);
            for _ in 0..self.len {
                let mut weights = [_mm512_setzero_ps(); V];
                for (v, weight) in weights.iter_mut().enumerate() {
                    *weight = W::widen16(w.add(16 * v));
                }
                for (r, sums) in acc.iter_mut().enumerate() {
                    let c = _mm512_set1_ps(*coef.add(r));
                    for (sum, &weight) in sums.iter_mut().zip(&weights) {
                        *sum = _mm512_fmadd_ps(c, weight, *sum);
                    }
                }
                coef = coef.add(self.coef_step);
                w = w.add(self.w_row);
            }
            for (r, sums) in acc.iter().enumerate() {
                for (v, &sum) in sums.iter().enumerate() {
                    _mm512_storeu_ps(self.out.add(r * self.out_row + 16 * v), sum);
                }
            }
        }
    }
}
