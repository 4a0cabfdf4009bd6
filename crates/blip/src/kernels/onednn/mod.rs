//! Products with bf16 inputs and f32 accumulation through oneDNN's matmul primitive, which runs
//! them on AMX tiles or AVX512-BF16 dot products where the CPU has them (as PyTorch's and
//! OpenVINO's bf16 do). oneDNN is loaded at run time (see [`ffi`]); [`crate::kernels::dispatch`]
//! decides once per process whether bf16 models use it.

mod ffi;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use half::bf16;

use ffi::{check, Api, Desc, ExecArg, OwnedDesc};

/// oneDNN, loaded, with the primitives made so far.
pub(crate) struct OneDnn {
    api: Api,
    /// One primitive per product shape (made once: making one costs far more than running it).
    primitives: Mutex<HashMap<Key, Arc<Matmul>>>,
}

thread_local! {
    /// Each thread's scratch memory for the primitives it runs, reused.
    static SCRATCHPAD: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Primitives kept before the cache is emptied (texts of many lengths make many shapes).
const MAX_PRIMITIVES: usize = 256;

/// An operand of [`OneDnn::matmul`]: `[batch, rows, cols]` with strides in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct View {
    pub dims: [usize; 3],
    pub strides: [usize; 3],
}

impl View {
    /// A row-major [rows, cols] matrix whose rows are `row_stride` apart.
    pub(crate) fn matrix(rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { dims: [1, rows, cols], strides: [rows * row_stride, row_stride, 1] }
    }

    /// The transpose of a row-major [cols, rows] matrix (a weight [out, in] read as [in, out]).
    pub(crate) fn transposed(rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { dims: [1, rows, cols], strides: [cols * row_stride, 1, row_stride] }
    }

    /// One past the last element addressed.
    fn extent(&self) -> usize {
        1 + (0..3).map(|d| (self.dims[d].max(1) - 1) * self.strides[d]).sum::<usize>()
    }
}

/// What a product adds itself to.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// Nothing: `dst = a·b`.
    Zero,
    /// dst's values: `dst += a·b`.
    Dst,
    /// A row [n] added to every row: `dst = a·b + bias`.
    Bias(&'a [f32]),
}

impl Start<'_> {
    fn kind(&self) -> StartKind {
        match self {
            Start::Zero => StartKind::Zero,
            Start::Dst => StartKind::Dst,
            Start::Bias(_) => StartKind::Bias,
        }
    }
}

/// What a product's result goes through before it is written: transformers' activations that
/// oneDNN applies to each element in f32 (a post-op), sparing a pass over the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Activation {
    Identity,
    /// The GELU of erf (transformers' "gelu"), oneDNN's `gelu_erf`.
    Gelu,
}

/// A product's output element: f32, or bf16 rounded from the f32 result (to nearest, ties to
/// even, as [`crate::kernels::widen::narrow_bf16`] rounds) for a product that takes it next.
pub(crate) trait Element: Copy {
    const DTYPE: c_int;
}

impl Element for f32 {
    const DTYPE: c_int = ffi::F32;
}

impl Element for bf16 {
    const DTYPE: c_int = ffi::BF16;
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum StartKind {
    Zero,
    Dst,
    Bias,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    a: View,
    b: View,
    dst: View,
    dst_dtype: c_int,
    start: StartKind,
    activation: Activation,
}

/// A made primitive; destroyed with its descriptor when the cache drops it.
struct Matmul {
    primitive: ffi::Primitive,
    descriptor: ffi::PrimitiveDesc,
    /// Its operands' memory descriptors, in the order src, weights, dst, and the bias's.
    descs: Vec<OwnedDesc>,
    /// Its scratchpad's (owned by `descriptor`; null when it needs none).
    scratch_desc: Desc,
    /// Bytes of scratch memory a call needs.
    scratch_bytes: usize,
    api: &'static Api,
}

// SAFETY: oneDNN primitives are immutable once made and may run from several threads at once.
unsafe impl Send for Matmul {}
// SAFETY: as for Send.
unsafe impl Sync for Matmul {}

impl Matmul {
    /// The implementation oneDNN picked, e.g. `brg:avx512_core_amx_bf16` (2.6).
    fn implementation(&self) -> Result<String, String> {
        let mut info: *const c_char = std::ptr::null();
        // SAFETY: the query writes a pointer to a string the descriptor owns, read while it lives.
        unsafe {
            check(
                (self.api.primitive_desc_query)(
                    self.descriptor,
                    ffi::QUERY_IMPL_INFO,
                    0,
                    (&mut info as *mut *const c_char).cast(),
                ),
                "query",
            )?;
            Ok(CStr::from_ptr(info).to_string_lossy().into_owned())
        }
    }
}

impl Drop for Matmul {
    fn drop(&mut self) {
        // SAFETY: made by this module and dropped once, when no call holds it (Arc).
        unsafe {
            (self.api.primitive_destroy)(self.primitive);
            (self.api.primitive_desc_destroy)(self.descriptor);
        }
    }
}

impl OneDnn {
    /// oneDNN from `libdnnl.so.3` or `libdnnl.so.2`, where it makes bf16 products on this CPU,
    /// or why it cannot be used.
    pub(crate) fn load() -> Result<&'static OneDnn, String> {
        static LOADED: OnceLock<Result<OneDnn, String>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                let api = Api::load()?;
                api.check_bf16_products()?;
                Ok(OneDnn { api, primitives: Mutex::new(HashMap::new()) })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// "oneDNN 3.14.0".
    pub(crate) fn describe(&self) -> String {
        format!("oneDNN {}", self.api.version_string())
    }

    /// `dst = start + a · b` for every batch entry: a [batch, m, k] and b [batch, k, n] in bf16,
    /// dst [batch, m, n] in f32, on the calling thread alone.
    ///
    /// Errors when an operand's slice is shorter than its view addresses, or oneDNN fails.
    pub(crate) fn matmul(
        &'static self,
        (a, a_view): (&[bf16], View),
        (b, b_view): (&[bf16], View),
        (dst, dst_view): (&mut [f32], View),
        start: Start,
    ) -> Result<(), String> {
        if a.len() < a_view.extent() || b.len() < b_view.extent() || dst.len() < dst_view.extent() {
            return Err("oneDNN matmul: an operand is shorter than its view".into());
        }
        let (dst, activation) = ((dst.as_mut_ptr(), dst_view), Activation::Identity);
        // SAFETY: each view lies within its slice (checked above); dst is borrowed mutably, so it
        // overlaps neither operand.
        unsafe { self.matmul_at((a.as_ptr(), a_view), (b.as_ptr(), b_view), dst, start, activation) }
    }

    /// [`OneDnn::matmul`] over raw pointers, for destinations that parallel tasks share (each
    /// writing its own elements), into f32 or bf16, through `activation`.
    ///
    /// # Safety
    /// Every element a view addresses must lie within its buffer; no other thread may read or
    /// write the elements of dst's view meanwhile, and dst's view must not overlap a's or b's.
    pub(crate) unsafe fn matmul_at<T: Element>(
        &'static self,
        (a, a_view): (*const bf16, View),
        (b, b_view): (*const bf16, View),
        (dst, dst_view): (*mut T, View),
        start: Start,
        activation: Activation,
    ) -> Result<(), String> {
        let [batch, m, k] = a_view.dims;
        let ok = b_view.dims == [batch, k, dst_view.dims[2]] && dst_view.dims == [batch, m, b_view.dims[2]];
        if !ok {
            return Err(format!("oneDNN matmul: shapes {:?} · {:?} → {:?}", a_view.dims, b_view.dims, dst_view.dims));
        }
        let bias = match start {
            Start::Bias(bias) if bias.len() != dst_view.dims[2] => {
                return Err(format!("oneDNN matmul: a bias of {} for {} columns", bias.len(), dst_view.dims[2]))
            }
            Start::Bias(bias) => bias.as_ptr() as *mut c_void,
            _ => std::ptr::null_mut(),
        };
        // One thread: the callers split the work among rayon's threads themselves. oneDNN fixes
        // a primitive's thread count when it is made, from the calling thread's OpenMP setting,
        // so it is set first (and restored after).
        let _one_thread = self.api.openmp.as_ref().map(|omp| omp.set_threads(1));
        let key = Key { a: a_view, b: b_view, dst: dst_view, dst_dtype: T::DTYPE, start: start.kind(), activation };
        let matmul = self.primitive(key)?;
        SCRATCHPAD.with_borrow_mut(|scratch| {
            // oneDNN aligns each entry of the scratchpad itself within the size it asks for. The
            // buffer only grows: shrinking it between primitives would zero it again each time.
            let words = matmul.scratch_bytes.div_ceil(8);
            if scratch.len() < words {
                scratch.resize(words, 0);
            }
            let scratch = scratch.as_mut_ptr();
            let mut handles = vec![
                (ffi::ARG_SRC, a as *mut c_void),
                (ffi::ARG_WEIGHTS, b as *mut c_void),
                (ffi::ARG_DST, dst.cast()),
            ];
            if !bias.is_null() {
                handles.push((ffi::ARG_BIAS, bias));
            }
            handles.push((ffi::ARG_SCRATCHPAD, scratch.cast()));
            // SAFETY: the caller's contract, the bias's length (checked above), and a scratch
            // buffer of the size the primitive asks.
            unsafe { self.execute(&matmul, &handles) }
        })
    }

    /// Runs `matmul` over memory at `handles`: src, weights, dst, the bias where the primitive
    /// takes one, then the scratchpad.
    ///
    /// # Safety
    /// As [`OneDnn::matmul_at`]'s, and the scratchpad must hold `matmul.scratch_bytes`.
    unsafe fn execute(&'static self, matmul: &Matmul, handles: &[(c_int, *mut c_void)]) -> Result<(), String> {
        let mut descs: Vec<Desc> = matmul.descs.iter().map(OwnedDesc::as_ptr).collect();
        descs.push(matmul.scratch_desc);
        if descs.len() != handles.len() {
            return Err("oneDNN matmul: a bias for a primitive without one, or none for one with".into());
        }
        let mut args: Vec<ExecArg> = Vec::with_capacity(handles.len());
        let result = (|| {
            for (&desc, &(arg, handle)) in descs.iter().zip(handles) {
                if desc.is_null() {
                    continue; // no scratchpad needed
                }
                let mut memory = std::ptr::null_mut();
                // SAFETY: a memory object over the caller's buffer, which holds every element the
                // descriptor addresses (the caller's contract); oneDNN only reads all but dst.
                check(unsafe { (self.api.memory_create)(&mut memory, desc, self.api.engine, handle) }, "memory")?;
                args.push(ExecArg { arg, memory });
            }
            let stream = self.stream()?;
            // SAFETY: the primitive, its arguments and this thread's stream are valid; the call
            // returns once the stream has finished (waited on below).
            unsafe {
                let count = args.len() as c_int;
                check((self.api.primitive_execute)(matmul.primitive, stream, count, args.as_ptr()), "execute")?;
                check((self.api.stream_wait)(stream), "wait")
            }
        })();
        for memory in args.iter().map(|arg| arg.memory) {
            // SAFETY: made above, used by nothing else.
            unsafe { (self.api.memory_destroy)(memory) };
        }
        result
    }

    /// The calling thread's stream (oneDNN streams are not shared between threads), destroyed
    /// when the thread ends.
    fn stream(&'static self) -> Result<ffi::Stream, String> {
        /// A thread's stream.
        struct ThreadStream(Cell<Option<(ffi::Stream, &'static Api)>>);
        impl Drop for ThreadStream {
            fn drop(&mut self) {
                if let Some((stream, api)) = self.0.get() {
                    // SAFETY: made by this thread, used by nothing else once it ends.
                    unsafe { (api.stream_destroy)(stream) };
                }
            }
        }
        thread_local! {
            static STREAM: ThreadStream = const { ThreadStream(Cell::new(None)) };
        }
        STREAM.with(|stream| match stream.0.get() {
            Some((stream, _)) => Ok(stream),
            None => {
                let made = self.api.new_stream()?;
                stream.0.set(Some((made, &self.api)));
                Ok(made)
            }
        })
    }

    fn primitive(&'static self, key: Key) -> Result<Arc<Matmul>, String> {
        let mut cache = self.primitives.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(matmul) = cache.get(&key) {
            return Ok(matmul.clone());
        }
        if cache.len() >= MAX_PRIMITIVES {
            cache.clear();
        }
        let matmul = Arc::new(self.make(key)?);
        cache.insert(key, matmul.clone());
        Ok(matmul)
    }

    fn make(&'static self, key: Key) -> Result<Matmul, String> {
        let api = &self.api;
        let mut views = vec![(key.a, ffi::BF16), (key.b, ffi::BF16), (key.dst, key.dst_dtype)];
        if key.start == StartKind::Bias {
            // one row of n, broadcast over the batch and the rows
            let n = key.dst.dims[2];
            views.push((View { dims: [1, 1, n], strides: [n, n, 1] }, ffi::F32));
        }
        let descs = views
            .into_iter()
            .map(|(view, dtype)| api.memory_desc(&view.dims.map(|d| d as i64), &view.strides.map(|s| s as i64), dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let bias_desc = descs.get(3).map_or(std::ptr::null(), OwnedDesc::as_ptr);
        let mut attr = std::ptr::null_mut();
        let mut post_ops = std::ptr::null_mut();
        let mut primitive = std::ptr::null_mut();
        // SAFETY: every descriptor and handle is made here and passed as dnnl.h declares; the
        // attribute and post-ops are destroyed once the primitive descriptor holds copies.
        let descriptor = unsafe {
            check((api.primitive_attr_create)(&mut attr), "attributes")?;
            let made = (|| {
                check((api.primitive_attr_set_scratchpad_mode)(attr, ffi::SCRATCHPAD_MODE_USER), "scratchpad mode")?;
                if key.start == StartKind::Dst || key.activation != Activation::Identity {
                    check((api.post_ops_create)(&mut post_ops), "post-ops")?;
                    if key.start == StartKind::Dst {
                        api.append_sum(post_ops)?;
                    }
                    if key.activation == Activation::Gelu {
                        api.append_gelu_erf(post_ops)?;
                    }
                    check((api.primitive_attr_set_post_ops)(attr, post_ops), "post-ops")?;
                }
                let descriptor =
                    api.matmul_desc(descs[0].as_ptr(), descs[1].as_ptr(), bias_desc, descs[2].as_ptr(), attr)?;
                if let Err(e) = check((api.primitive_create)(&mut primitive, descriptor), "matmul primitive") {
                    (api.primitive_desc_destroy)(descriptor);
                    return Err(e);
                }
                Ok(descriptor)
            })();
            if !post_ops.is_null() {
                (api.post_ops_destroy)(post_ops);
            }
            (api.primitive_attr_destroy)(attr);
            made?
        };
        // SAFETY: the descriptor is valid; the query returns a pointer into it, valid while it
        // lives (as long as the Matmul).
        let scratch_desc = unsafe { (api.primitive_desc_query_md)(descriptor, ffi::QUERY_SCRATCHPAD_MD, 0) };
        let scratch_bytes = match scratch_desc.is_null() {
            true => 0,
            // SAFETY: a valid memory descriptor.
            false => unsafe { (api.memory_desc_get_size)(scratch_desc) },
        };
        let matmul = Matmul { primitive, descriptor, descs, scratch_desc, scratch_bytes, api };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let implementation = matmul.implementation().unwrap_or_else(|e| e);
            let activation = key.activation;
            tracing::debug!(a = ?key.a, b = ?key.b, dst = ?key.dst, ?activation, implementation, "oneDNN matmul made");
        }
        Ok(matmul)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 product of the same bf16 values, as the reference.
    fn reference(a: &[bf16], b: &[bf16], (m, n, k): (usize, usize, usize), b_transposed: bool) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0f64;
                for p in 0..k {
                    let bv = if b_transposed { b[j * k + p] } else { b[p * n + j] };
                    sum += a[i * k + p].to_f64() * bv.to_f64();
                }
                out[i * n + j] = sum as f32;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<bf16> {
        (0..len).map(|i| bf16::from_f32(((i as u32 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)).collect()
    }

    #[test]
    fn bf16_products_match_the_exact_product_of_the_same_values() {
        let Ok(onednn) = OneDnn::load() else {
            eprintln!("oneDNN not installed: skipped");
            return;
        };
        let (m, n, k) = (37, 50, 70);
        let (a, w) = (values(m * k, 1), values(n * k, 7));
        let expected = reference(&a, &w, (m, n, k), true);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
        for start in [Start::Zero, Start::Dst, Start::Bias(&bias)] {
            let mut dst = vec![if matches!(start, Start::Dst) { 1.0 } else { f32::NAN }; m * n];
            onednn
                .matmul(
                    (&a, View::matrix(m, k, k)),
                    (&w, View::transposed(k, n, k)),
                    (&mut dst, View::matrix(m, n, n)),
                    start,
                )
                .unwrap();
            for (index, (ours, exact)) in dst.iter().zip(&expected).enumerate() {
                let offset = match start {
                    Start::Zero => 0.0,
                    Start::Dst => 1.0,
                    Start::Bias(bias) => bias[index % n],
                };
                assert!((ours - offset - exact).abs() < 1e-4, "{ours} vs {exact} + {offset}");
            }
        }
    }

    /// Outputs in bf16 are the f32 results rounded to nearest even; with the GELU post-op,
    /// within one bf16 step of our GELU of the exact product, rounded, or 1e-6 where GELU's
    /// value is near 0 (oneDNN 3.x's erf is exact to ~1e-7 absolute in the far negative tail).
    #[test]
    fn bf16_outputs_and_the_gelu_post_op() {
        let Ok(onednn) = OneDnn::load() else { return };
        let (m, n, k) = (37, 50, 70);
        let (a, w) = (values(m * k, 3), values(n * k, 5));
        let exact = reference(&a, &w, (m, n, k), true);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1 - 2.5).collect();
        let shapes = (View::matrix(m, k, k), View::transposed(k, n, k), View::matrix(m, n, n));
        let run = |activation| {
            let (mut f32_out, mut bf16_out) = (vec![f32::NAN; m * n], vec![bf16::NAN; m * n]);
            // SAFETY: every buffer holds its view's elements; the outputs are this thread's.
            unsafe {
                let (a, w) = ((a.as_ptr(), shapes.0), (w.as_ptr(), shapes.1));
                onednn.matmul_at(a, w, (f32_out.as_mut_ptr(), shapes.2), Start::Bias(&bias), activation).unwrap();
                onednn.matmul_at(a, w, (bf16_out.as_mut_ptr(), shapes.2), Start::Bias(&bias), activation).unwrap();
            }
            (f32_out, bf16_out)
        };
        let (f32_out, bf16_out) = run(Activation::Identity);
        for (index, (ours, rounded)) in f32_out.iter().zip(&bf16_out).enumerate() {
            assert!((ours - exact[index] - bias[index % n]).abs() < 1e-4);
            assert_eq!(rounded.to_bits(), bf16::from_f32(*ours).to_bits(), "{ours}");
        }
        let mut expected: Vec<f32> = exact.iter().enumerate().map(|(i, x)| x + bias[i % n]).collect();
        crate::kernels::elementwise::gelu(&mut expected);
        let (gelu_f32, gelu_bf16) = run(Activation::Gelu);
        for ((ours, rounded), expected) in gelu_f32.iter().zip(&gelu_bf16).zip(&expected) {
            assert!((ours - expected).abs() < 1e-4, "GELU {ours} vs {expected}");
            let step = (expected.abs() / 128.0).max(1e-6);
            assert!((rounded.to_f32() - expected).abs() <= step, "GELU rounded {rounded} vs {expected}");
        }
    }

    #[test]
    fn mismatched_shapes_and_short_buffers_are_errors() {
        let Ok(onednn) = OneDnn::load() else { return };
        let (a, w) = (values(6, 1), values(6, 2));
        let mut dst = vec![0f32; 4];
        let shapes = onednn.matmul(
            (&a, View::matrix(2, 3, 3)),
            (&w, View::transposed(2, 3, 2)),
            (&mut dst, View::matrix(2, 2, 2)),
            Start::Zero,
        );
        assert!(shapes.is_err());
        let short = onednn.matmul(
            (&a[..5], View::matrix(2, 3, 3)),
            (&w, View::transposed(3, 2, 3)),
            (&mut dst, View::matrix(2, 2, 2)),
            Start::Zero,
        );
        assert!(short.is_err());
        let bias = [1.0f32; 3];
        let wrong_bias = onednn.matmul(
            (&a, View::matrix(2, 3, 3)),
            (&w, View::transposed(3, 2, 3)),
            (&mut dst, View::matrix(2, 2, 2)),
            Start::Bias(&bias),
        );
        assert!(wrong_bias.is_err());
    }
}
