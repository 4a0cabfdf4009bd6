//! Intel AMX: bf16 products into f32 tiles. Rust's AMX intrinsics are not stable, so the tile
//! instructions are inline assembly. The proof that the tiles may be used ([`Amx`]) and their
//! configuration live here; each kernel in its own file: the bf16 vision tower's attention
//! ([`attention`]), decoding's products ([`rows`]) and its cross-attention ([`states`]).

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

mod attention;
pub(crate) mod rows;
pub(crate) mod states;

pub(crate) use attention::{attend_head, HeadInput, HeadScratch, HEAD_DIM};

use super::dispatch::{isa, Isa};
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
        #[cfg(test)]
        if test_hook::off() {
            return None;
        }
        let avx512 = matches!(isa(), Isa::Avx2Fma(proof) if proof.avx512().is_some());
        (avx512 && *GRANTED.get_or_init(request_tiles)).then_some(Self(()))
    }
}

/// Runs `f` without the tiles, as on a CPU without them (tests only: the oneDNN path they
/// replace stays tested on AMX machines). Calls are serialized.
#[cfg(test)]
pub(crate) fn without_amx<T>(f: impl FnOnce() -> T) -> T {
    test_hook::without(f)
}

/// Runs `f` where the CPU has the tiles, with them (tests only: no [`without_amx`] meanwhile).
#[cfg(test)]
pub(crate) fn with_amx<T>(f: impl FnOnce() -> T) -> T {
    test_hook::with(f)
}

#[cfg(test)]
mod test_hook {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, PoisonError};

    static OFF: AtomicBool = AtomicBool::new(false);
    static SERIAL: Mutex<()> = Mutex::new(());

    pub(super) fn off() -> bool {
        OFF.load(Ordering::SeqCst)
    }

    pub(super) fn with<T>(f: impl FnOnce() -> T) -> T {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        f()
    }

    pub(super) fn without<T>(f: impl FnOnce() -> T) -> T {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                OFF.store(false, Ordering::SeqCst);
            }
        }
        OFF.store(true, Ordering::SeqCst);
        let _reset = Reset;
        f()
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
        if granted != 0 {
            let why = std::io::Error::last_os_error();
            tracing::debug!("the CPU has AMX tiles, but Linux refused their state ({why}): oneDNN's products instead");
        }
        granted == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// A tile configuration (palette 1: tiles 0–7, each of up to 16 rows of up to 64 bytes).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    /// Tiles 0–7 of 16 rows × 64 bytes (the other entries must be 0).
    fn uniform() -> Self {
        let mut config = Self::empty();
        config.bytes_per_row[..8].fill(64);
        config.rows[..8].fill(16);
        config
    }

    /// No tile configured yet.
    fn empty() -> Self {
        Self { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] }
    }
}

/// The tile configuration of this thread while alive: loaded when made, released when dropped
/// (also on unwinding), so that no other code on the thread finds it.
#[cfg(target_arch = "x86_64")]
struct Tiles(());

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// Loads `config`, whose tiles have at most 16 rows of at most 64 bytes; only with
    /// [`Amx`]'s proof (the CPU has the tiles, the process their state).
    fn configure(config: &TileConfig) -> Self {
        assert!(config.palette == 1 && config.rows.iter().all(|&r| r <= 16));
        assert!(config.bytes_per_row.iter().all(|&b| b <= 64 && b % 4 == 0));
        // SAFETY: a valid palette-1 configuration (checked above), 64 bytes, readable; the
        // caller holds the proof that the CPU and the OS support the tiles.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config as *const TileConfig, options(nostack, readonly)) };
        Self(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the configuration this value loaded.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `mixed` [rows, 64 columns] += probabilities [rows, 32·chunks] (bf16) · pairs [16·chunks, 64
/// columns] (pairs of rows, the B-tile layout): the mixing step of both attentions. Tiles 0–3
/// the sums [rows, 16] (loaded from `mixed`, stored back), 4 the probabilities [rows, 32], 5–7
/// the pairs [16 pairs, 16 columns]: tiles 0–4 of `rows` rows and 5–7 of 16, all of 64 bytes.
///
/// # Safety
/// The tiles configured as above; `probabilities` rows of 32·chunks bf16 `stride`
/// apart, `pairs` 16·chunks rows of `width` u32 from its first column, `mixed` rows of `width`
/// f32 from its first.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn mix_64_columns(
    (probabilities, stride): (*const half::bf16, usize),
    pairs: *const u32,
    mixed: *mut f32,
    (width, chunks): (usize, usize),
) {
    // SAFETY: iteration c reads the probabilities' columns 32·c.. (rows × 64 bytes, stride
    // 2·stride) and pair rows 16·c.. (16 × 256 bytes from the group's column, stride 4·width);
    // the sums are read and written as rows × 256 bytes at mixed (stride 4·width): within the
    // caller's sizes. Every tile it writes is declared.
    unsafe {
        asm!(
            "tileloadd tmm0, [{c} + {stride}*1]",
            "tileloadd tmm1, [{c} + {stride}*1 + 64]",
            "tileloadd tmm2, [{c} + {stride}*1 + 128]",
            "tileloadd tmm3, [{c} + {stride}*1 + 192]",
            "2:",
            "tileloadd tmm4, [{a} + {a_stride}*1]",
            "tileloadd tmm5, [{b} + {stride}*1]",
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tileloadd tmm6, [{b} + {stride}*1 + 64]",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {stride}*1 + 128]",
            "tdpbf16ps tmm2, tmm4, tmm7",
            "tileloadd tmm5, [{b} + {stride}*1 + 192]",
            "tdpbf16ps tmm3, tmm4, tmm5",
            "add {a}, 64",
            "add {b}, {b_step}",
            "dec {chunks}",
            "jnz 2b",
            "tilestored [{c} + {stride}*1], tmm0",
            "tilestored [{c} + {stride}*1 + 64], tmm1",
            "tilestored [{c} + {stride}*1 + 128], tmm2",
            "tilestored [{c} + {stride}*1 + 192], tmm3",
            a = inout(reg) probabilities => _,
            a_stride = in(reg) 2 * stride,
            b = inout(reg) pairs => _,
            b_step = in(reg) 64 * width,
            c = in(reg) mixed,
            stride = in(reg) 4 * width,
            chunks = inout(reg) chunks => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}
