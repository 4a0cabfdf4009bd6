//! Which instruction set the hand-written kernels use, decided once per process.
//!
//! The CPU is probed on first use; `BLIP_KERNELS=portable` in the environment forces the
//! portable (baseline-target) code paths instead, so that they can be run and tested on any
//! machine. Any other value, or none, means auto-detect. OpenBLAS, the `gemm` crate and oneDNN
//! keep their own dispatch. Products with bf16 weights run on oneDNN's bf16 kernels where the
//! CPU has bf16 instructions and oneDNN is installed ([`bf16_products`]; `BLIP_BF16` forces
//! either path).

use std::sync::OnceLock;

use super::onednn::OneDnn;

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
/// It carries the proof of AVX-512 too where the CPU has it (and the kernels may use it), for
/// the kernels that have an AVX-512 version; the others run their AVX2 code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Avx2Fma(Option<Avx512>);

impl Avx2Fma {
    /// The proof, where the CPU has the three features (with AVX-512's where it has those).
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Some(Self(Avx512::detect()));
        }
        None
    }

    /// The AVX-512 proof, where the CPU has AVX-512 and the kernels use it.
    #[inline]
    pub(crate) fn avx512(self) -> Option<Avx512> {
        self.0
    }
}

/// Proof that this CPU has AVX-512 F and BW besides AVX2 and FMA: kernels holding one may call
/// their `#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]` code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Avx512(());

impl Avx512 {
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            return Some(Self(()));
        }
        None
    }
}

/// The fastest instruction set this CPU runs, ignoring the environment.
pub(crate) fn detected() -> Isa {
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

/// The environment variable that picks how products with bf16 weights run: `onednn` (oneDNN's
/// bf16 products wherever oneDNN makes them, emulated on CPUs without bf16 instructions; 2.x
/// makes none without AVX-512), `f32` (the weights widened, products in f32), unset or `auto`:
/// oneDNN where the CPU has bf16 instructions.
pub(crate) const BF16_ENV_VAR: &str = "BLIP_BF16";

/// How products with bf16 weights run.
#[derive(Clone, Copy)]
pub(crate) enum Bf16Products {
    /// bf16 inputs (activations rounded to bf16), f32 accumulation, through oneDNN (AMX or
    /// AVX512-BF16 where the CPU has them).
    OneDnn(&'static OneDnn),
    /// The weights widened to f32 and the products in f32 (the portable kernels or BLAS): faster
    /// than emulated bf16 on CPUs without bf16 instructions.
    Widened,
}

impl std::fmt::Debug for Bf16Products {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bf16Products::OneDnn(_) => "OneDnn",
            Bf16Products::Widened => "Widened",
        })
    }
}

/// Whether this CPU multiplies bf16 in hardware (AVX512-BF16; every AMX CPU has it too).
fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512bf16") {
        return true;
    }
    false
}

/// The process's choice for bf16 products, and why: made once (the first bf16 model's load).
pub(crate) fn bf16_products() -> Bf16Products {
    #[cfg(test)]
    if let Some(forced) = test_hook::forced_bf16() {
        return forced;
    }
    bf16_choice().0
}

/// [`bf16_products`] with a line saying which path runs and why (for `--version`).
pub(crate) fn bf16_choice() -> (Bf16Products, &'static str) {
    static CHOSEN: OnceLock<(Bf16Products, String)> = OnceLock::new();
    let (products, why) = CHOSEN.get_or_init(|| {
        let asked = std::env::var(BF16_ENV_VAR).unwrap_or_default().to_ascii_lowercase();
        if !["", "auto", "f32", "onednn"].contains(&asked.as_str()) {
            tracing::warn!("{BF16_ENV_VAR}={asked} is not onednn, f32 or auto: choosing from the CPU");
        }
        let widened = |why: String| (Bf16Products::Widened, format!("bf16 weights widened, f32 products ({why})"));
        match (asked.as_str(), OneDnn::load()) {
            ("f32", _) => widened(format!("{BF16_ENV_VAR}=f32")),
            ("onednn", Ok(onednn)) => (
                Bf16Products::OneDnn(onednn),
                format!("bf16 products on {} ({BF16_ENV_VAR}=onednn)", onednn.describe()),
            ),
            (_, Ok(onednn)) if cpu_has_bf16() => {
                (Bf16Products::OneDnn(onednn), format!("bf16 products on {}", onednn.describe()))
            }
            (_, Ok(_)) => widened("this CPU has no bf16 instructions".into()),
            (_, Err(why)) => widened(why.to_string()),
        }
    });
    (*products, why.as_str())
}

/// Every bf16 product path this machine can run, widened first (tests run both).
#[cfg(test)]
pub(crate) fn available_bf16() -> Vec<Bf16Products> {
    let mut paths = vec![Bf16Products::Widened];
    if let Ok(onednn) = OneDnn::load() {
        paths.push(Bf16Products::OneDnn(onednn));
    }
    paths
}

/// Runs `f` with bf16 products on the given path (tests only; serialized as [`with_isa`]).
#[cfg(test)]
pub(crate) fn with_bf16<T>(products: Bf16Products, f: impl FnOnce() -> T) -> T {
    test_hook::with_bf16(products, f)
}

/// Every instruction set this CPU can run, portable first: what tests run each kernel with.
#[cfg(test)]
pub(crate) fn available() -> Vec<Isa> {
    let mut isas = vec![Isa::Portable];
    if let Isa::Avx2Fma(proof) = detected() {
        isas.push(Isa::Avx2Fma(Avx2Fma(None)));
        if proof.avx512().is_some() {
            isas.push(Isa::Avx2Fma(proof));
        }
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

    use super::{Bf16Products, Isa};

    static FORCED: RwLock<Option<Isa>> = RwLock::new(None);
    static FORCED_BF16: RwLock<Option<Bf16Products>> = RwLock::new(None);
    static SERIAL: Mutex<()> = Mutex::new(());
    /// Taken before SERIAL where both are (with_bf16 around with_isa).
    static SERIAL_BF16: Mutex<()> = Mutex::new(());

    pub(super) fn forced_bf16() -> Option<Bf16Products> {
        *FORCED_BF16.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn with_bf16<T>(products: Bf16Products, f: impl FnOnce() -> T) -> T {
        with_override(&SERIAL_BF16, &FORCED_BF16, products, f)
    }

    pub(super) fn forced() -> Option<Isa> {
        *FORCED.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn with<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
        with_override(&SERIAL, &FORCED, isa, f)
    }

    /// Runs `f` with `slot` holding `value`, one such call at a time per `serial`; the slot is
    /// cleared even when `f` panics (a failing assertion).
    fn with_override<V, T>(serial: &Mutex<()>, slot: &'static RwLock<Option<V>>, value: V, f: impl FnOnce() -> T) -> T {
        let _serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
        struct Reset<V: 'static>(&'static RwLock<Option<V>>);
        impl<V> Drop for Reset<V> {
            fn drop(&mut self) {
                *self.0.write().unwrap_or_else(PoisonError::into_inner) = None;
            }
        }
        *slot.write().unwrap_or_else(PoisonError::into_inner) = Some(value);
        let _reset = Reset(slot);
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
