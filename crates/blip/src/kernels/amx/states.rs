//! The two products of the decoder's cross-attention to the encoder states (see
//! `attention::cross`) on AMX tiles, for a bf16 model: the queries' scores against a block of
//! states, and the states mixed by the block's probabilities. Both read one bf16 copy of the
//! states, paired state with state (the B-tile layout of the mixing), made once per batch:
//! half the bytes of the f32 states each decoding step reads in every layer.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;

use half::bf16;

use super::Amx;
#[cfg(target_arch = "x86_64")]
use super::{mix_64_columns, TileConfig, Tiles};
use crate::kernels::widen::narrow_bf16;

/// States per step of both products: 16 pairs, one tile's rows.
pub(crate) const STATE_CHUNK: usize = 32;

/// The most query rows (heads × queries of one image) one call takes.
pub(crate) const MAX_ROWS: usize = 16;

/// Whether the tiles take the cross-attention of `rows` query rows per image (heads × queries)
/// to states of `width` values (whole 64-value groups).
pub(crate) fn takes(rows: usize, width: usize) -> bool {
    (1..=MAX_ROWS).contains(&rows) && width > 0 && width.is_multiple_of(64)
}

/// Encoder states [batch, n, width] rounded to bf16 and paired state with state: per image
/// [n padded to 32 / 2, width] u32, each (E[2p][c], E[2p + 1][c]), the first in the low half,
/// the padding zero.
pub(crate) struct PairedStates {
    pairs: Vec<u32>,
    padded: usize,
    width: usize,
}

impl PairedStates {
    pub(crate) fn new(states: &[f32], (batch, n, width): (usize, usize, usize)) -> Self {
        assert!(states.len() == batch * n * width && takes(1, width));
        let padded = n.div_ceil(STATE_CHUNK) * STATE_CHUNK;
        let mut pairs = vec![0u32; batch * padded / 2 * width];
        let mut rounded = vec![bf16::ZERO; width];
        for (image, pairs) in pairs.chunks_exact_mut(padded / 2 * width).enumerate() {
            let image_states = &states[image * n * width..][..n * width];
            for (state, row) in image_states.chunks_exact(width).enumerate() {
                let (pair_row, shift) = (&mut pairs[state / 2 * width..][..width], 16 * (state % 2));
                narrow_bf16(row, &mut rounded);
                for (pair, x) in pair_row.iter_mut().zip(&rounded) {
                    *pair |= u32::from(x.to_bits()) << shift;
                }
            }
        }
        Self { pairs, padded, width }
    }

    /// One image's pairs from state `first` (a multiple of 32) on.
    fn image(&self, image: usize, first: usize) -> &[u32] {
        assert!(first.is_multiple_of(STATE_CHUNK) && first <= self.padded);
        &self.pairs[(image * self.padded + first) / 2 * self.width..(image + 1) * self.padded / 2 * self.width]
    }
}

/// Query rows [rows, width] (f32) as the B tiles of [`block_scores`]: [width, rows] u32 twice,
/// the value in the low half (even states), then in the high half (odd states).
pub(crate) struct PairedQueries {
    even: Vec<u32>,
    odd: Vec<u32>,
    rows: usize,
}

impl PairedQueries {
    pub(crate) fn new(queries: &[f32], rows: usize, width: usize) -> Self {
        assert!(queries.len() == rows * width && (1..=MAX_ROWS).contains(&rows));
        let mut rounded = vec![bf16::ZERO; rows * width];
        narrow_bf16(queries, &mut rounded);
        let mut even = vec![0u32; width * rows];
        for (c, column) in even.chunks_exact_mut(rows).enumerate() {
            for (row, even) in column.iter_mut().enumerate() {
                *even = u32::from(rounded[row * width + c].to_bits());
            }
        }
        let odd = even.iter().map(|&bits| bits << 16).collect();
        Self { even, odd, rows }
    }
}

/// `scores` [len padded to 32, rows] = the states `first..first + len` of `image` · each query
/// row (rounded to bf16), summed in f32: per 32 states and 16 values, one A tile of the states'
/// pairs, multiplied by the queries placed in the pairs' even and then odd halves (the other
/// half zero), which gives the even and the odd states' sums.
pub(crate) fn block_scores(
    proof: Amx,
    states: &PairedStates,
    (image, first, len): (usize, usize, usize),
    queries: &PairedQueries,
    scores: &mut [f32],
) {
    let _ = proof;
    let (rows, width) = (queries.rows, states.width);
    let chunks = len.div_ceil(STATE_CHUNK);
    let pairs = states.image(image, first);
    assert!(pairs.len() >= chunks * STATE_CHUNK / 2 * width && scores.len() >= chunks * STATE_CHUNK * rows);
    assert!(queries.even.len() == width * rows);
    #[cfg(target_arch = "x86_64")]
    {
        let mut config = TileConfig::empty();
        let columns = (4 * rows) as u16;
        config.bytes_per_row[..5].copy_from_slice(&[columns, columns, 64, columns, columns]);
        config.rows[..5].fill(16);
        let _tiles = Tiles::configure(&config);
        for chunk in 0..chunks {
            // SAFETY: the tiles are configured as block_chunk_scores needs; pairs holds the
            // chunk's 16 pair rows of width values, the queries width rows of `rows`, scores the
            // chunk's 32 rows of `rows` (asserted above).
            unsafe {
                chunk_scores(
                    pairs[chunk * STATE_CHUNK / 2 * width..].as_ptr(),
                    (queries.even.as_ptr(), queries.odd.as_ptr()),
                    scores[chunk * STATE_CHUNK * rows..].as_mut_ptr(),
                    (rows, width),
                )
            };
        }
    }
}

/// One chunk of 32 states: tiles 0 and 1 the even and odd states' sums [16, rows], 2 the
/// states' pairs [16 pairs, 16 values], 3 and 4 the queries' even and odd B tiles [16 values,
/// rows]. The sums are stored interleaved: even state 2p at row 2p of `scores`, odd at 2p + 1.
///
/// # Safety
/// The tiles configured as [`block_scores`] does; `pairs` 16 rows of `width` u32, the
/// queries `width` rows of `rows` u32 each, `scores` 32 rows of `rows` f32; width a multiple of 16.
#[cfg(target_arch = "x86_64")]
unsafe fn chunk_scores(
    pairs: *const u32,
    (even, odd): (*const u32, *const u32),
    scores: *mut f32,
    (rows, width): (usize, usize),
) {
    // SAFETY: iteration c reads 16 pair rows × 64 bytes at u32 column 16·c (stride 4·width) and
    // 16 query rows of 4·rows bytes from row 16·c; the stores write 16 rows of 4·rows bytes with
    // a stride of 8·rows from scores and scores + rows: all within the caller's sizes. Every
    // tile it writes is declared.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "2:",
            "tileloadd tmm2, [{a} + {a_stride}*1]",
            "tileloadd tmm3, [{even} + {b_stride}*1]",
            "tdpbf16ps tmm0, tmm2, tmm3",
            "tileloadd tmm4, [{odd} + {b_stride}*1]",
            "tdpbf16ps tmm1, tmm2, tmm4",
            "add {a}, 64",
            "add {even}, {b_step}",
            "add {odd}, {b_step}",
            "dec {chunks}",
            "jnz 2b",
            "tilestored [{c_even} + {c_stride}*1], tmm0",
            "tilestored [{c_odd} + {c_stride}*1], tmm1",
            a = inout(reg) pairs => _,
            a_stride = in(reg) 4 * width,
            even = inout(reg) even => _,
            odd = inout(reg) odd => _,
            b_stride = in(reg) 4 * rows,
            b_step = in(reg) 64 * rows,
            chunks = inout(reg) width / 16 => _,
            c_even = in(reg) scores,
            c_odd = in(reg) scores.add(rows),
            c_stride = in(reg) 8 * rows,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _, out("tmm4") _,
            options(nostack),
        );
    }
}

/// `mixed` [rows, width] += probabilities [rows, len padded to 32] (bf16, the padding zero;
/// rows `stride` apart) · the states `first..` of `image`: per 64 values, four sums [rows, 16]
/// over the chunks of 32 states, one A tile of probabilities and four B tiles of pairs each.
pub(crate) fn block_mix(
    proof: Amx,
    states: &PairedStates,
    (image, first, len): (usize, usize, usize),
    (probabilities, stride): (&[bf16], usize),
    rows: usize,
    mixed: &mut [f32],
) {
    let _ = proof;
    let width = states.width;
    let chunks = len.div_ceil(STATE_CHUNK);
    let pairs = states.image(image, first);
    assert!((1..=MAX_ROWS).contains(&rows) && stride >= chunks * STATE_CHUNK);
    assert!(pairs.len() >= chunks * STATE_CHUNK / 2 * width && mixed.len() >= rows * width);
    assert!(probabilities.len() >= (rows - 1) * stride + chunks * STATE_CHUNK);
    #[cfg(target_arch = "x86_64")]
    {
        let mut config = TileConfig::empty();
        config.bytes_per_row[..8].fill(64);
        config.rows[..5].fill(rows as u8);
        config.rows[5..8].fill(16);
        let _tiles = Tiles::configure(&config);
        for group in (0..width).step_by(64) {
            // SAFETY: the tiles are configured as mix_64_columns needs; the probabilities hold
            // rows rows of `chunks` chunks, the pairs the chunks' pair rows from column `group`,
            // mixed `rows` rows of width from column `group` (asserted above).
            unsafe {
                mix_64_columns(
                    (probabilities.as_ptr(), stride),
                    pairs[group..].as_ptr(),
                    mixed[group..].as_mut_ptr(),
                    (width, chunks),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize) -> f32 {
        bf16::from_f32(((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5).to_f32()
    }

    /// Scores and mixing against f64 sums of the same bf16 values, for a block that starts past
    /// the first chunk and ends inside a padded one, every row count.
    #[test]
    fn scores_and_mixing_match_exact_sums() {
        let Some(proof) = Amx::detect() else {
            eprintln!("no AMX tiles here: skipped");
            return;
        };
        let (batch, n, width) = (2, 77, 128);
        let states: Vec<f32> = (0..batch * n * width).map(|i| value(i + 5)).collect();
        let paired = PairedStates::new(&states, (batch, n, width));
        let state = |image: usize, s: usize, c: usize| f64::from(states[(image * n + s) * width + c]);
        let (image, first, len) = (1, 32, n - 32);
        for rows in 1..=MAX_ROWS {
            let queries: Vec<f32> = (0..rows * width).map(|i| value(i * 13 + 1)).collect();
            let mut scores = vec![f32::NAN; 64 * rows];
            block_scores(proof, &paired, (image, first, len), &PairedQueries::new(&queries, rows, width), &mut scores);
            for s in 0..len {
                for r in 0..rows {
                    let exact: f64 =
                        (0..width).map(|c| f64::from(queries[r * width + c]) * state(image, first + s, c)).sum();
                    let got = f64::from(scores[s * rows + r]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "rows {rows}: score {s}, {r}: {got} against {exact}"
                    );
                }
            }
            let stride = 72;
            let probabilities: Vec<bf16> = (0..rows * stride)
                .map(|i| if i % stride < len { bf16::from_f32(value(i * 3 + 7).abs()) } else { bf16::ZERO })
                .collect();
            let start: Vec<f32> = (0..rows * width).map(|i| (i % 5) as f32).collect();
            let mut mixed = start.clone();
            block_mix(proof, &paired, (image, first, len), (&probabilities, stride), rows, &mut mixed);
            for r in 0..rows {
                for c in 0..width {
                    let exact: f64 = (0..len)
                        .map(|s| f64::from(probabilities[r * stride + s].to_f32()) * state(image, first + s, c))
                        .sum::<f64>()
                        + f64::from(start[r * width + c]);
                    let got = f64::from(mixed[r * width + c]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "rows {rows}: mixed {r}, {c}: {got} against {exact}"
                    );
                }
            }
        }
    }
}
