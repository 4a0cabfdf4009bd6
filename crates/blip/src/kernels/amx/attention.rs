//! One head of the bf16 vision tower's attention on AMX tiles (q·kᵀ, softmax,
//! probabilities·v) by blocks of 16 queries that never leave the core's caches; the tiles are
//! configured as 16 rows of 64 bytes (A: 16 × 32 bf16, B: 16 pairs × 16 columns × 2 bf16, C:
//! 16 × 16 f32).

#[cfg(target_arch = "x86_64")]
use std::arch::asm;

use half::bf16;

use super::Amx;
#[cfg(target_arch = "x86_64")]
use super::{mix_64_columns, TileConfig, Tiles};
use crate::kernels::elementwise::softmax_rows_to_bf16;
use crate::kernels::widen::RoundsToBf16;

/// The head size the kernel takes: q's row is two A tiles' 32 values.
pub(crate) const HEAD_DIM: usize = 64;

/// One thread's buffers for [`attend_head`], reused from head to head.
#[derive(Default)]
pub(crate) struct HeadScratch {
    /// q, [rows padded to 16, 64].
    queries: Vec<bf16>,
    /// k's, then v's rows rounded to bf16, [keys padded to 32, 64] (the padding zero).
    rounded: Vec<bf16>,
    /// k's pairs of values as u32, transposed and laid out tile by tile: per block of 16 keys,
    /// two B tiles of q·kᵀ (pairs 0–15, then 16–31), each [16 pairs, 16 keys], 1 KB contiguous.
    keys: Vec<u32>,
    /// v's rows paired: [keys padded to 32 / 2, 64] u32, each (v[2i][c], v[2i+1][c]) (B tiles of
    /// probabilities·v).
    values: Vec<u32>,
    /// A block's scores [16, keys padded], then its probabilities [16, keys padded] in bf16.
    scores: Vec<f32>,
    probabilities: Vec<bf16>,
    /// A block's context [16, 64].
    context: Vec<f32>,
}

/// One head's q, k and v in the fused projection's output (f32, or rounded to bf16 already):
/// token t's values of part p (0 q, 1 k, 2 v) are `qkv[t·row + columns[p]..][..64]`.
pub(crate) struct HeadInput<'a, Q> {
    pub qkv: &'a [Q],
    pub row: usize,
    pub columns: [usize; 3],
}

/// softmax(scale·q·kᵀ)·v for one head of n tokens: q, k and v rounded to bf16 as they are
/// packed for the tiles, the probabilities rounded to bf16 after the softmax (in f32) divided by
/// its sum, as the oneDNN path does; each context row (f32) handed to `write(row, values)`.
pub(crate) fn attend_head<Q: RoundsToBf16>(
    proof: Amx,
    input: HeadInput<Q>,
    n: usize,
    scale: f32,
    scratch: &mut HeadScratch,
    mut write: impl FnMut(usize, &[f32]),
) {
    let _ = proof;
    let d = HEAD_DIM;
    let HeadInput { qkv, row, columns } = input;
    assert!(
        n == 0 || columns.iter().all(|&c| (n - 1) * row + c + d <= qkv.len()),
        "AMX attention: {n} tokens of q, k, v past the projection's {} values",
        qkv.len()
    );
    if n == 0 {
        return;
    }
    let (rows, keys) = (n.div_ceil(16) * 16, n.div_ceil(32) * 32);
    let HeadScratch { queries, rounded, keys: key_pairs, values, scores, probabilities, context } = scratch;
    let part = |p: usize, t: usize| &qkv[t * row + columns[p]..][..d];
    queries.resize(rows * d, bf16::ZERO);
    for t in 0..n {
        Q::round_into(part(0, t), &mut queries[t * d..(t + 1) * d]);
    }
    queries[n * d..].fill(bf16::ZERO);
    // k's rows rounded (zero rows up to `keys`), then their pairs of values transposed tile by
    // tile; v's the same, then paired row with row
    rounded.resize(keys * d, bf16::ZERO);
    for t in 0..n {
        Q::round_into(part(1, t), &mut rounded[t * d..(t + 1) * d]);
    }
    rounded[n * d..].fill(bf16::ZERO);
    key_pairs.resize(32 * keys, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `proof` shows AVX-512 F and BW; rounded holds keys rows of 64, key_pairs 32·keys.
    unsafe {
        pack_keys(rounded, keys, key_pairs)
    };
    for t in 0..n {
        Q::round_into(part(2, t), &mut rounded[t * d..(t + 1) * d]);
    }
    values.resize(keys / 2 * d, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as for pack_keys; values holds keys / 2 rows of 64 (an odd last key is paired
    // with a zero row).
    unsafe {
        pack_values(rounded, keys, values)
    };
    scores.resize(16 * keys, 0.0);
    // padded keys' probabilities stay 0 (their values are 0 too): set once per head
    probabilities.clear();
    probabilities.resize(16 * keys, bf16::ZERO);
    context.resize(16 * d, 0.0);

    #[cfg(target_arch = "x86_64")]
    {
        let _tiles = Tiles::configure(&TileConfig::uniform());
        for block in 0..rows / 16 {
            // SAFETY: the tiles are configured (16 rows × 64 bytes); the operands' bounds are
            // those of `scores_block`'s.
            unsafe { scores_block(queries.as_ptr().add(block * 16 * d), key_pairs, keys, scores) };
            let valid = (n - block * 16).min(16);
            for r in 0..valid {
                let (row, out) = (&mut scores[r * keys..r * keys + n], &mut probabilities[r * keys..r * keys + n]);
                softmax_rows_to_bf16(row, n, scale, out);
            }
            context.fill(0.0);
            // SAFETY: the tiles are configured (16 rows of 64 bytes each); probabilities holds
            // 16 rows of `keys` (keys / 32 chunks), values keys / 2 rows of 64, context 16 rows
            // of 64.
            unsafe {
                mix_64_columns(
                    (probabilities.as_ptr(), keys),
                    values.as_ptr(),
                    context.as_mut_ptr(),
                    (HEAD_DIM, keys / 32),
                )
            };
            for r in 0..valid {
                write(block * 16 + r, &context[r * d..(r + 1) * d]);
            }
        }
    }
}

/// k's rows [keys, 64] (bf16) as the B tiles of q·kᵀ: per block of 16 keys, pairs 0–15 then
/// 16–31, each tile [16 pairs, 16 keys] of u32 (a pair's two values, the first in the low half):
/// one gather of a pair's 16 keys per tile row.
///
/// # Safety
/// The CPU must have AVX-512 F; `rounded` must hold keys·64 values and `key_pairs` 32·keys,
/// keys a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_keys(rounded: &[bf16], keys: usize, key_pairs: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(keys.is_multiple_of(16) && rounded.len() >= keys * HEAD_DIM && key_pairs.len() >= 32 * keys);
    let rows = _mm512_setr_epi32(0, 128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1408, 1536, 1664, 1792, 1920);
    for block in 0..keys / 16 {
        let base = rounded[block * 16 * HEAD_DIM..].as_ptr().cast::<u8>();
        let tiles = &mut key_pairs[block * 512..][..512];
        for p in 0..32 {
            // SAFETY: the 16 rows of 128 bytes from `base` lie within rounded (asserted above);
            // the store writes 16 values within this block's tiles.
            unsafe {
                let pair = _mm512_i32gather_epi32::<1>(rows, base.add(4 * p).cast());
                _mm512_storeu_si512(tiles[p / 16 * 256 + p % 16 * 16..].as_mut_ptr().cast(), pair);
            }
        }
    }
}

/// v's rows [keys, 64] (bf16) as the B tiles of probabilities·v: [keys / 2, 64] of u32, each
/// (v[2i][c], v[2i + 1][c]), interleaved two rows at a time.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `rounded` must hold keys·64 values and `values`
/// keys / 2·64, keys even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_values(rounded: &[bf16], keys: usize, values: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(keys.is_multiple_of(2) && rounded.len() >= keys * HEAD_DIM && values.len() >= keys / 2 * HEAD_DIM);
    // lanes 2c and 2c + 1 of the output: lane c of the first row, lane c of the second (32 + c),
    // for c in the low 16 lanes of the two sources, then in the high 16
    let low: [u16; 32] = std::array::from_fn(|l| (l / 2 + l % 2 * 32) as u16);
    let high: [u16; 32] = std::array::from_fn(|l| (16 + l / 2 + l % 2 * 32) as u16);
    // SAFETY: plain loads of the two index arrays (64 bytes each).
    let (low, high) = unsafe { (_mm512_loadu_si512(low.as_ptr().cast()), _mm512_loadu_si512(high.as_ptr().cast())) };
    for i in 0..keys / 2 {
        let pair = &rounded[2 * i * HEAD_DIM..(2 * i + 2) * HEAD_DIM];
        let out = &mut values[i * HEAD_DIM..(i + 1) * HEAD_DIM];
        // SAFETY: loads of the two rows' 128 bytes each and stores of the output row's 256
        // bytes, within the slices just taken.
        unsafe {
            let first = |half: usize| _mm512_loadu_si512(pair[32 * half..].as_ptr().cast());
            let second = |half: usize| _mm512_loadu_si512(pair[HEAD_DIM + 32 * half..].as_ptr().cast());
            for half in 0..2 {
                let (a, b) = (first(half), second(half));
                let dst = out[32 * half..].as_mut_ptr();
                _mm512_storeu_si512(dst.cast(), _mm512_permutex2var_epi16(a, low, b));
                _mm512_storeu_si512(dst.add(16).cast(), _mm512_permutex2var_epi16(a, high, b));
            }
        }
    }
}

/// One block of 16 queries' scores against every key: `scores` [16, keys] (f32) = q·kᵀ, q the 16
/// rows of 64 bf16 at `q` (values 0–31, then 32–63: two A tiles), k as `key_pairs` (per 16 keys
/// two contiguous B tiles: pairs 0–15, then 16–31). Two 16-key blocks per iteration.
///
/// # Safety
/// The tiles must be configured ([`Tiles`]); `q` must address 16 readable rows of 64 bf16;
/// `key_pairs` and `scores` must hold 32·keys and 16·keys values, keys a multiple of 32.
#[cfg(target_arch = "x86_64")]
unsafe fn scores_block(q: *const bf16, key_pairs: &[u32], keys: usize, scores: &mut [f32]) {
    assert!(keys % 32 == 0 && key_pairs.len() >= 32 * keys && scores.len() >= 16 * keys);
    // SAFETY: iteration j reads four tiles of 1 KB at bytes 4096·j.. of key_pairs and writes
    // 16 rows of 64 bytes at
    // columns 16·j, 16·j + 16 of scores (stride 4·keys): j + 1 < keys / 16, all within the
    // lengths asserted above; q by the caller's contract. Every tile it writes is declared.
    unsafe {
        asm!(
            "tileloadd tmm4, [{q} + {q_stride}*1]",
            "tileloadd tmm5, [{q} + {q_stride}*1 + 64]",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tileloadd tmm6, [{b} + {tile_stride}*1]",
            "tileloadd tmm2, [{b} + {tile_stride}*1 + 2048]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm2",
            "tileloadd tmm7, [{b} + {tile_stride}*1 + 1024]",
            "tileloadd tmm3, [{b} + {tile_stride}*1 + 3072]",
            "tdpbf16ps tmm0, tmm5, tmm7",
            "tdpbf16ps tmm1, tmm5, tmm3",
            "tilestored [{c} + {stride}*1], tmm0",
            "tilestored [{c} + {stride}*1 + 64], tmm1",
            "add {b}, 4096",
            "add {c}, 128",
            "dec {pairs}",
            "jnz 2b",
            q = in(reg) q,
            q_stride = in(reg) 128usize,
            b = inout(reg) key_pairs.as_ptr() => _,
            tile_stride = in(reg) 64usize,
            c = inout(reg) scores.as_mut_ptr() => _,
            stride = in(reg) 4 * keys,
            pairs = inout(reg) keys / 32 => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}
