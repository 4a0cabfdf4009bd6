//! Intel AMX: bf16 products into f32 tiles, for one head of the bf16 vision tower's attention
//! (q·kᵀ, softmax, probabilities·v) by blocks of 16 queries that never leave the core's caches.
//! Rust's AMX intrinsics are not stable, so the tile instructions are inline assembly; the tiles
//! are configured as 16 rows of 64 bytes (A: 16 × 32 bf16, B: 16 pairs × 16 columns × 2 bf16,
//! C: 16 × 16 f32).

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

use half::bf16;

use super::dispatch::{isa, Isa};
use super::elementwise::softmax_rows_to_bf16;
use super::widen::narrow_bf16;

/// The head size the kernel takes: q's row is two A tiles' 32 values.
pub(crate) const HEAD_DIM: usize = 64;

/// Proof that this CPU runs AMX's bf16 tiles, that Linux lets this process use them, and that
/// the AVX-512 kernels (the softmax between the products) are in use: only [`Amx::detect`]
/// makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Amx(());

impl Amx {
    /// The proof, where the CPU has AMX-TILE and AMX-BF16, the kernel grants the tile state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once per process) and the process's kernels
    /// are the AVX-512 ones (not `BLIP_KERNELS=portable`, nor a test's AVX2 path).
    pub(crate) fn detect() -> Option<Self> {
        let avx512 = matches!(isa(), Isa::Avx2Fma(proof) if proof.avx512().is_some());
        (avx512 && *GRANTED.get_or_init(request_tiles)).then_some(Self(()))
    }
}

static GRANTED: OnceLock<bool> = OnceLock::new();

/// Whether the CPU has AMX's bf16 tiles and Linux grants this process their state.
fn request_tiles() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for permission; it changes nothing but the process's allowed state.
        let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        granted == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// One thread's buffers for [`attend_head`], reused from head to head.
#[derive(Default)]
pub(crate) struct HeadScratch {
    /// q, [rows padded to 16, 64].
    queries: Vec<bf16>,
    /// k's, then v's rows rounded to bf16, [n, 64].
    rounded: Vec<bf16>,
    /// k's pairs of values as u32, transposed: [32 pairs, keys padded to 32] (B tiles of q·kᵀ).
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

/// The tile configuration: palette 1, tiles 0–7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// One head's q, k and v in the fused projection's f32 output: token t's values of part p (0 q,
/// 1 k, 2 v) are `qkv[t·row + columns[p]..][..64]`.
pub(crate) struct HeadInput<'a> {
    pub qkv: &'a [f32],
    pub row: usize,
    pub columns: [usize; 3],
}

/// softmax(scale·q·kᵀ)·v for one head of n tokens: q, k and v rounded to bf16 as they are
/// packed for the tiles, the probabilities rounded to bf16 after the softmax (in f32) divided by
/// its sum, as the oneDNN path does; each context row (f32) handed to `write(row, values)`.
pub(crate) fn attend_head(
    proof: Amx,
    input: HeadInput,
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
        narrow_bf16(part(0, t), &mut queries[t * d..(t + 1) * d]);
    }
    queries[n * d..].fill(bf16::ZERO);
    // k's rows rounded, then their pairs of values transposed
    rounded.resize(n * d, bf16::ZERO);
    for t in 0..n {
        narrow_bf16(part(1, t), &mut rounded[t * d..(t + 1) * d]);
    }
    let bits = |x: bf16| x.to_bits() as u32;
    key_pairs.clear();
    key_pairs.resize(32 * keys, 0);
    for (j, key) in rounded.chunks_exact(d).enumerate() {
        for (p, pair) in key.chunks_exact(2).enumerate() {
            key_pairs[p * keys + j] = bits(pair[0]) | bits(pair[1]) << 16;
        }
    }
    // v's rows rounded, then paired row with row (the last with a zero row when n is odd)
    for t in 0..n {
        narrow_bf16(part(2, t), &mut rounded[t * d..(t + 1) * d]);
    }
    values.clear();
    values.resize(keys / 2 * d, 0);
    for (i, pair) in values.chunks_exact_mut(d).take(n.div_ceil(2)).enumerate() {
        let first = &rounded[2 * i * d..(2 * i + 1) * d];
        let second = rounded.get((2 * i + 1) * d..(2 * i + 2) * d);
        for (c, value) in pair.iter_mut().enumerate() {
            *value = bits(first[c]) | second.map_or(0, |s| bits(s[c]) << 16);
        }
    }
    scores.resize(16 * keys, 0.0);
    // padded keys' probabilities stay 0 (their values are 0 too): set once per head
    probabilities.clear();
    probabilities.resize(16 * keys, bf16::ZERO);
    context.resize(16 * d, 0.0);

    #[cfg(target_arch = "x86_64")]
    // SAFETY: the proof shows the CPU has the tiles and the process their state; every tile
    // load and store below stays within the buffers sized above (see each block's comment).
    unsafe {
        // palette 1 has 8 tiles: the other entries must be 0
        let mut config =
            TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        config.bytes_per_row[..8].fill(64);
        config.rows[..8].fill(16);
        asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        for block in 0..rows / 16 {
            // q·kᵀ: tmm4, tmm5 = the block's queries, values 0–31 and 32–63 (16 rows of 128
            // bytes from row 16·block of `queries`, [rows, 64]); per two 16-key blocks j, j+1,
            // B tiles of pairs 0–15 and 16–31 (16 rows of `keys` u32 from column 16·j of
            // `key_pairs`, [32, keys]), scores stored at column 16·j of `scores` [16, keys].
            let q_block = queries.as_ptr().add(block * 16 * d);
            asm!(
                "tileloadd tmm4, [{q} + {stride}*1]",
                "tileloadd tmm5, [{q_hi} + {stride}*1]",
                q = in(reg) q_block, q_hi = in(reg) q_block.add(32), stride = in(reg) 2 * d,
                options(nostack, readonly),
            );
            let key_stride = 4 * keys;
            for j in (0..keys / 16).step_by(2) {
                let b = key_pairs.as_ptr().add(16 * j);
                let out = scores.as_mut_ptr().add(16 * j);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tileloadd tmm6, [{b0} + {stride}*1]",
                    "tileloadd tmm2, [{b1} + {stride}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm2",
                    "tileloadd tmm7, [{b0_hi} + {stride}*1]",
                    "tileloadd tmm3, [{b1_hi} + {stride}*1]",
                    "tdpbf16ps tmm0, tmm5, tmm7",
                    "tdpbf16ps tmm1, tmm5, tmm3",
                    "tilestored [{c0} + {stride}*1], tmm0",
                    "tilestored [{c1} + {stride}*1], tmm1",
                    b0 = in(reg) b,
                    b1 = in(reg) b.add(16),
                    b0_hi = in(reg) b.add(16 * keys),
                    b1_hi = in(reg) b.add(16 * keys + 16),
                    c0 = in(reg) out,
                    c1 = in(reg) out.add(16),
                    stride = in(reg) key_stride,
                    options(nostack),
                );
            }
            let valid = (n - block * 16).min(16);
            for r in 0..valid {
                softmax_rows_to_bf16(
                    &mut scores[r * keys..r * keys + n],
                    n,
                    scale,
                    &mut probabilities[r * keys..r * keys + n],
                );
            }
            // probabilities·v: per 32 keys c, the A tile of the block's probabilities (16 rows
            // of `keys` bf16 from column 32·c of `probabilities`, [16, keys]) and four B tiles of
            // 16 value columns each (16 rows of 64 u32 from row 16·c, column 16·t of `values`,
            // [keys / 2, 64]); the context [16, 64] accumulated in tmm0–tmm3.
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for c in 0..keys / 32 {
                let b = values.as_ptr().add(16 * c * d);
                asm!(
                    "tileloadd tmm4, [{a} + {a_stride}*1]",
                    "tileloadd tmm5, [{b0} + {stride}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tileloadd tmm6, [{b1} + {stride}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tileloadd tmm7, [{b2} + {stride}*1]",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm5, [{b3} + {stride}*1]",
                    "tdpbf16ps tmm3, tmm4, tmm5",
                    a = in(reg) probabilities.as_ptr().add(32 * c),
                    a_stride = in(reg) 2 * keys,
                    b0 = in(reg) b,
                    b1 = in(reg) b.add(16),
                    b2 = in(reg) b.add(32),
                    b3 = in(reg) b.add(48),
                    stride = in(reg) 4 * d,
                    options(nostack, readonly),
                );
            }
            let out = context.as_mut_ptr();
            asm!(
                "tilestored [{c0} + {stride}*1], tmm0",
                "tilestored [{c1} + {stride}*1], tmm1",
                "tilestored [{c2} + {stride}*1], tmm2",
                "tilestored [{c3} + {stride}*1], tmm3",
                c0 = in(reg) out, c1 = in(reg) out.add(16), c2 = in(reg) out.add(32), c3 = in(reg) out.add(48),
                stride = in(reg) 4 * d,
                options(nostack),
            );
            for r in 0..valid {
                write(block * 16 + r, &context[r * d..(r + 1) * d]);
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}
