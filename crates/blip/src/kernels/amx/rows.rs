//! Products of a few rows (decoding) with bf16 weights on AMX tiles. The weights, as stored
//! ([n, k] row-major), are the A tiles, read once straight from memory as the AVX-512 widening
//! kernels read them; the input rows, paired, are the B tiles; the sums land as [n, m], the
//! layout the streamed products write.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;

use half::bf16;

use super::Amx;
#[cfg(target_arch = "x86_64")]
use super::{TileConfig, Tiles};
use crate::kernels::widen::narrow_bf16;

/// The most input rows one product takes (two B tiles of 16 columns).
pub(crate) const MAX_ROWS: usize = 32;

/// Whether [`rows_times_weights`] takes m rows of k values.
pub(crate) fn takes(m: usize, k: usize) -> bool {
    (1..=MAX_ROWS).contains(&m) && k.is_multiple_of(32)
}

/// xs [m, k] (f32 values that are bf16 already) as B tiles: [k / 2, m] u32, each the pair
/// (xs[i][2p], xs[i][2p + 1]), the first in the low half.
pub(crate) fn pair_rows(xs: &[f32], m: usize, k: usize) -> Vec<u32> {
    assert!(xs.len() == m * k && k.is_multiple_of(2));
    let mut rounded = vec![bf16::ZERO; m * k];
    narrow_bf16(xs, &mut rounded);
    let mut pairs = vec![0u32; k / 2 * m];
    for (p, column) in pairs.chunks_exact_mut(m).enumerate() {
        for (i, pair) in column.iter_mut().enumerate() {
            let (low, high) = (rounded[i * k + 2 * p].to_bits(), rounded[i * k + 2 * p + 1].to_bits());
            *pair = u32::from(low) | u32::from(high) << 16;
        }
    }
    pairs
}

/// `outs[j·m + i] += xs[i]·w[j]` for the m rows paired by [`pair_rows`] and each weight row
/// `w[j]` of `w` [rows, k], in f32 sums of exact bf16 products (as oneDNN's bf16 products).
/// Blocks of 32 weight rows run on the tiles; the last rows (fewer than 32, only at the end of
/// a matrix whose rows are not a multiple of 32) go to `rest(weights, outs)`.
pub(crate) fn rows_times_weights(
    proof: Amx,
    pairs: &[u32],
    (m, k): (usize, usize),
    w: &[bf16],
    outs: &mut [f32],
    rest: impl FnOnce(&[bf16], &mut [f32]),
) {
    let _ = proof;
    assert!(takes(m, k) && pairs.len() == k / 2 * m && w.len().is_multiple_of(k) && outs.len() == w.len() / k * m);
    let rows = w.len() / k;
    #[cfg(target_arch = "x86_64")]
    let tiled = rows / BLOCK * BLOCK;
    #[cfg(target_arch = "x86_64")]
    if tiled > 0 {
        let _tiles = Tiles::configure(&config(m));
        for j in (0..tiled).step_by(BLOCK) {
            // SAFETY: the tiles are configured for m; weight rows j..j + 32 ≤ rows and their
            // outputs lie within w and outs (sizes asserted above).
            unsafe { weight_rows_block(pairs.as_ptr(), w[j * k..].as_ptr(), outs[j * m..].as_mut_ptr(), (m, k)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let tiled = 0;
    rest(&w[tiled * k..], &mut outs[tiled * m..]);
}

/// Weight rows per block of the tiles: two A tiles of 16.
const BLOCK: usize = 32;

/// Up to 16 rows: tiles 0 and 1 the sums [16 weight rows, m], 2 and 3 the weights [16 rows, 32
/// values], 4 the input rows' pairs [16 pairs, m]. 17 to 32 rows, in two groups of columns (16
/// and m − 16): tiles 0–3 the sums (weight rows 0–15 of both groups, then 16–31), 4 and 5 the
/// weights, 6 and 7 the pairs of both groups.
#[cfg(target_arch = "x86_64")]
fn config(m: usize) -> TileConfig {
    let mut config = TileConfig::empty();
    if m <= 16 {
        let columns = (4 * m) as u16;
        config.bytes_per_row[..5].copy_from_slice(&[columns, columns, 64, 64, columns]);
        config.rows[..5].fill(16);
    } else {
        let second = (4 * (m - 16)) as u16;
        config.bytes_per_row[..8].copy_from_slice(&[64, second, 64, second, 64, 64, 64, second]);
        config.rows[..8].fill(16);
    }
    config
}

/// 32 weight rows from `w` times the paired rows, added to their outputs at `outs` ([32, m]):
/// per 32 values of k, the pairs' B tile (two for more than 16 rows) and one A tile per 16
/// weight rows; the next 32 weight rows are prefetched as the tiles work.
///
/// # Safety
/// The tiles must be configured by [`config`] for m; `pairs` must hold k / 2·m values, `w`
/// 32·k from where it points and `outs` 32·m; k a multiple of 32.
#[cfg(target_arch = "x86_64")]
unsafe fn weight_rows_block(pairs: *const u32, w: *const bf16, outs: *mut f32, (m, k): (usize, usize)) {
    // SAFETY: iteration c reads 16 rows of 64 bytes at byte 64·c of each weight row (stride
    // 2k bytes) and 16 pair rows (4m bytes each) from pair row 16·c; the sums are read and
    // written as 16 rows of 4m bytes at outs and outs + 16m values: all within the caller's
    // sizes (prefetches do not fault). Every tile it writes is declared.
    unsafe {
        if m <= 16 {
            asm!(
                "tileloadd tmm0, [{c0} + {c_stride}*1]",
                "tileloadd tmm1, [{c1} + {c_stride}*1]",
                "2:",
                "tileloadd tmm4, [{b} + {c_stride}*1]",
                "tileloadd tmm2, [{a0} + {a_stride}*1]",
                "tdpbf16ps tmm0, tmm2, tmm4",
                "tileloadd tmm3, [{a1} + {a_stride}*1]",
                "tdpbf16ps tmm1, tmm3, tmm4",
                ".rept 32",
                "prefetcht1 [{pf}]",
                "add {pf}, 64",
                ".endr",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, {b_step}",
                "dec {chunks}",
                "jnz 2b",
                "tilestored [{c0} + {c_stride}*1], tmm0",
                "tilestored [{c1} + {c_stride}*1], tmm1",
                c0 = in(reg) outs,
                c1 = in(reg) outs.add(16 * m),
                c_stride = in(reg) 4 * m,
                b = inout(reg) pairs => _,
                b_step = in(reg) 64 * m,
                a0 = inout(reg) w => _,
                a1 = inout(reg) w.add(16 * k) => _,
                pf = inout(reg) w.add(32 * k) => _,
                a_stride = in(reg) 2 * k,
                chunks = inout(reg) k / 32 => _,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _, out("tmm4") _,
                options(nostack),
            );
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {c_stride}*1]",
                "tileloadd tmm1, [{c0} + {c_stride}*1 + 64]",
                "tileloadd tmm2, [{c1} + {c_stride}*1]",
                "tileloadd tmm3, [{c1} + {c_stride}*1 + 64]",
                "2:",
                "tileloadd tmm6, [{b} + {c_stride}*1]",
                "tileloadd tmm7, [{b} + {c_stride}*1 + 64]",
                "tileloadd tmm4, [{a0} + {a_stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {a_stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                ".rept 32",
                "prefetcht1 [{pf}]",
                "add {pf}, 64",
                ".endr",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, {b_step}",
                "dec {chunks}",
                "jnz 2b",
                "tilestored [{c0} + {c_stride}*1], tmm0",
                "tilestored [{c0} + {c_stride}*1 + 64], tmm1",
                "tilestored [{c1} + {c_stride}*1], tmm2",
                "tilestored [{c1} + {c_stride}*1 + 64], tmm3",
                c0 = in(reg) outs,
                c1 = in(reg) outs.add(16 * m),
                c_stride = in(reg) 4 * m,
                b = inout(reg) pairs => _,
                b_step = in(reg) 64 * m,
                a0 = inout(reg) w => _,
                a1 = inout(reg) w.add(16 * k) => _,
                pf = inout(reg) w.add(32 * k) => _,
                a_stride = in(reg) 2 * k,
                chunks = inout(reg) k / 32 => _,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 sums of the same bf16 products, for every row count and a weight count with
    /// two blocks of 32 and a remainder.
    #[test]
    fn matches_exact_sums_of_the_bf16_products() {
        let Some(proof) = Amx::detect() else {
            eprintln!("no AMX tiles here: skipped");
            return;
        };
        let (k, rows) = (96, 64 + 21);
        let value = |i: usize| bf16::from_f32(((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5);
        let w: Vec<bf16> = (0..rows * k).map(|i| value(i + 3)).collect();
        for m in 1..=MAX_ROWS {
            let xs: Vec<f32> = (0..m * k).map(|i| value(i * 31 + 11).to_f32()).collect();
            let bias: Vec<f32> = (0..rows * m).map(|i| (i % 7) as f32 * 0.5).collect();
            let mut outs = bias.clone();
            let pairs = pair_rows(&xs, m, k);
            let mut rest_rows = None;
            rows_times_weights(proof, &pairs, (m, k), &w, &mut outs, |w, _| rest_rows = Some(w.len() / k));
            assert_eq!(rest_rows, Some(rows - 64));
            for j in 0..64 {
                for i in 0..m {
                    let exact: f64 = (0..k).map(|c| f64::from(xs[i * k + c]) * f64::from(w[j * k + c].to_f32())).sum();
                    let got = f64::from(outs[j * m + i]) - f64::from(bias[j * m + i]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "m {m}, row {j}, input {i}: {got} against {exact}"
                    );
                }
            }
            assert_eq!(outs[64 * m..], bias[64 * m..], "the rest is left to `rest`");
        }
    }
}
