//! Which instruction set the hand-written kernels use, decided once per process.
//!
//! The CPU is probed on first use; `BLIP_KERNELS=portable` in the environment forces the
//! portable (baseline-target) code paths instead, so that they can be run and tested on any
//! machine. Any other value, or none, means auto-detect. OpenBLAS and the `gemm` crate keep their
//! own dispatch.

use std::sync::OnceLock;

/// The environment variable that forces the portable kernels: value `portable` (in any case).
pub(crate) const ENV_VAR: &str = "BLIP_KERNELS";

/// The code path a kernel takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Isa {
    /// AVX2, FMA and F16C intrinsics (`#[target_feature]` functions); holds the proof that the
    /// CPU has them.
    Avx2Fma(Avx2Fma),
    /// Plain Rust written in independent lanes, which the compiler vectorizes for the baseline
    /// target.
    Portable,
}

/// Proof that this CPU has AVX2, FMA and F16C: only [`Avx2Fma::detect`] makes one, so a kernel
/// that matches [`Isa::Avx2Fma`] may call its `#[target_feature(enable = "avx2,fma,f16c")]` code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Avx2Fma(());

impl Avx2Fma {
    /// The proof, where the CPU has the three features.
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Some(Self(()));
        }
        None
    }
}

/// The fastest instruction set this CPU runs, ignoring the environment.
fn detected() -> Isa {
    Avx2Fma::detect().map_or(Isa::Portable, Isa::Avx2Fma)
}

/// The instruction set the kernels use: detected once, or [`Isa::Portable`] when
/// `BLIP_KERNELS=portable`. A load of a cached value, cheap enough for per-row calls.
#[inline]
pub(crate) fn isa() -> Isa {
    #[cfg(test)]
    if let Some(forced) = test_hook::forced() {
        return forced;
    }
    chosen()
}

/// The process's choice: the environment's, else [`detected`].
#[inline]
fn chosen() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| match std::env::var(ENV_VAR) {
        Ok(value) if value.eq_ignore_ascii_case("portable") => Isa::Portable,
        _ => detected(),
    })
}

/// Every instruction set this CPU can run, portable first: what tests run each kernel with.
#[cfg(test)]
pub(crate) fn available() -> Vec<Isa> {
    let mut isas = vec![Isa::Portable];
    if let Isa::Avx2Fma(proof) = detected() {
        isas.push(Isa::Avx2Fma(proof));
    }
    isas
}

/// Runs `f` with every kernel on the given instruction set (tests only). Calls are serialized;
/// kernels that other tests run meanwhile may take either path, both of which are valid here
/// (the choices come from [`available`]).
#[cfg(test)]
pub(crate) fn with_isa<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
    test_hook::with(isa, f)
}

#[cfg(test)]
mod test_hook {
    use std::sync::{Mutex, PoisonError, RwLock};

    use super::Isa;

    static FORCED: RwLock<Option<Isa>> = RwLock::new(None);
    static SERIAL: Mutex<()> = Mutex::new(());

    pub(super) fn forced() -> Option<Isa> {
        *FORCED.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn with<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        /// Clears the override even when `f` panics (a failing assertion).
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                *FORCED.write().unwrap_or_else(PoisonError::into_inner) = None;
            }
        }
        *FORCED.write().unwrap_or_else(PoisonError::into_inner) = Some(isa);
        let _reset = Reset;
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_override_applies_and_is_undone() {
        for isa in available() {
            with_isa(isa, || assert_eq!(super::isa(), isa));
        }
        assert!(available().contains(&isa()));
    }

    /// What `BLIP_KERNELS` asks for is what the process uses (run with and without it in CI).
    #[test]
    fn the_environment_decides() {
        match std::env::var(ENV_VAR) {
            Ok(value) if value.eq_ignore_ascii_case("portable") => assert_eq!(chosen(), Isa::Portable),
            _ => assert_eq!(chosen(), detected()),
        }
    }
}
