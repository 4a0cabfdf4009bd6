//! The part of oneDNN's C API the bf16 products use, loaded at run time from `libdnnl.so.3`
//! (oneDNN 3.x) or `libdnnl.so.2` (2.x), so that the build and the binary never need oneDNN
//! (without it bf16 keeps f32 products).
//!
//! The two versions differ in how memory descriptors and the matmul's descriptor are made: 2.x
//! fills structs the caller owns (held here as opaque, aligned byte buffers larger than the
//! library's structs), 3.x returns handles. Everything else takes them by pointer either way.

use std::ffi::{c_char, c_int, c_uint, c_void};

use libloading::Library;

pub(super) type Status = c_int;
pub(super) const SUCCESS: Status = 0;

pub(super) type Engine = *mut c_void;
pub(super) type Stream = *mut c_void;
pub(super) type Memory = *mut c_void;
pub(super) type PrimitiveDesc = *mut c_void;
pub(super) type Primitive = *mut c_void;
pub(super) type Attr = *mut c_void;
pub(super) type PostOps = *mut c_void;

/// `dnnl_data_type_t`.
pub(super) const BF16: c_int = 2;
pub(super) const F32: c_int = 3;
/// `dnnl_eltwise_gelu_erf` of 2.x and of 3.x.
const GELU_ERF_V2: c_int = 0x30;
const GELU_ERF_V3: c_int = 0x31;
/// `dnnl_cpu`.
const CPU: c_int = 1;
/// `dnnl_stream_default_flags`.
const STREAM_DEFAULT_FLAGS: c_uint = 1;
/// `dnnl_query_impl_info_str`.
pub(super) const QUERY_IMPL_INFO: c_int = 8;
/// `DNNL_ARG_SRC`, `DNNL_ARG_WEIGHTS`, `DNNL_ARG_DST`.
pub(super) const ARG_SRC: c_int = 1;
pub(super) const ARG_WEIGHTS: c_int = 33;
pub(super) const ARG_DST: c_int = 17;
/// `DNNL_ARG_BIAS`.
pub(super) const ARG_BIAS: c_int = 41;
/// `DNNL_ARG_SCRATCHPAD`.
pub(super) const ARG_SCRATCHPAD: c_int = 80;
/// `dnnl_scratchpad_mode_user`: each call passes its own scratch memory, so that primitives
/// may run on several threads at once (the library's shared scratchpad is not safe for that).
pub(super) const SCRATCHPAD_MODE_USER: c_int = 1;
/// `dnnl_query_scratchpad_md`.
pub(super) const QUERY_SCRATCHPAD_MD: c_int = 136;

/// `dnnl_memory_desc_t` (696 bytes in oneDNN 2.6), opaque.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub(super) struct MemoryDesc(pub [u8; 1024]);

/// `dnnl_matmul_desc_t` (2,800 bytes in oneDNN 2.6), opaque.
#[repr(C, align(8))]
pub(super) struct MatmulDesc(pub [u8; 4096]);

impl MemoryDesc {
    pub(super) fn zeroed() -> Self {
        Self([0; 1024])
    }
}

impl MatmulDesc {
    pub(super) fn zeroed() -> Box<Self> {
        Box::new(Self([0; 4096]))
    }
}

/// `dnnl_exec_arg_t`.
#[repr(C)]
pub(super) struct ExecArg {
    pub arg: c_int,
    pub memory: Memory,
}

/// `dnnl_version_t`.
#[repr(C)]
pub(super) struct Version {
    pub major: c_int,
    pub minor: c_int,
    pub patch: c_int,
    pub hash: *const c_char,
    pub cpu_runtime: c_uint,
    pub gpu_runtime: c_uint,
}

/// The library and the entry points, resolved once.
pub(super) struct Api {
    pub version: unsafe extern "C" fn() -> *const Version,
    pub engine_create: unsafe extern "C" fn(*mut Engine, c_int, usize) -> Status,
    pub stream_create: unsafe extern "C" fn(*mut Stream, Engine, c_uint) -> Status,
    pub stream_wait: unsafe extern "C" fn(Stream) -> Status,
    pub stream_destroy: unsafe extern "C" fn(Stream) -> Status,
    pub memory_desc_get_size: unsafe extern "C" fn(Desc) -> usize,
    /// The calls that differ between the major versions.
    pub versioned: Versioned,
    pub primitive_attr_create: unsafe extern "C" fn(*mut Attr) -> Status,
    pub primitive_attr_destroy: unsafe extern "C" fn(Attr) -> Status,
    pub primitive_attr_set_post_ops: unsafe extern "C" fn(Attr, PostOps) -> Status,
    pub primitive_attr_set_scratchpad_mode: unsafe extern "C" fn(Attr, c_int) -> Status,
    pub post_ops_create: unsafe extern "C" fn(*mut PostOps) -> Status,
    pub post_ops_destroy: unsafe extern "C" fn(PostOps) -> Status,
    pub primitive_desc_query: unsafe extern "C" fn(PrimitiveDesc, c_int, c_int, *mut c_void) -> Status,
    pub primitive_desc_query_md: unsafe extern "C" fn(PrimitiveDesc, c_int, c_int) -> Desc,
    pub primitive_desc_destroy: unsafe extern "C" fn(PrimitiveDesc) -> Status,
    pub primitive_create: unsafe extern "C" fn(*mut Primitive, PrimitiveDesc) -> Status,
    pub primitive_destroy: unsafe extern "C" fn(Primitive) -> Status,
    pub primitive_execute: unsafe extern "C" fn(Primitive, Stream, c_int, *const ExecArg) -> Status,
    pub memory_create: unsafe extern "C" fn(*mut Memory, Desc, Engine, *mut c_void) -> Status,
    pub memory_destroy: unsafe extern "C" fn(Memory) -> Status,
    /// The OpenMP runtime's thread-count calls, where oneDNN runs on OpenMP (Debian's build
    /// does): none for its other threading runtimes.
    pub openmp: Option<OpenMp>,
    pub engine: Engine,
    _library: Library,
}

/// `omp_get_max_threads` and `omp_set_num_threads` of the OpenMP runtime oneDNN was linked with.
pub(super) struct OpenMp {
    get_max_threads: unsafe extern "C" fn() -> c_int,
    set_num_threads: unsafe extern "C" fn(c_int),
}

impl OpenMp {
    /// Sets the calling thread's OpenMP thread count until the guard drops (then restores it).
    pub(super) fn set_threads(&self, threads: usize) -> OpenMpThreads<'_> {
        // SAFETY: plain OpenMP calls about the calling thread's setting.
        let previous = unsafe { (self.get_max_threads)() };
        // SAFETY: as above.
        unsafe { (self.set_num_threads)(threads.min(c_int::MAX as usize) as c_int) };
        OpenMpThreads { openmp: self, previous }
    }
}

/// Restores the calling thread's OpenMP thread count when dropped.
pub(super) struct OpenMpThreads<'a> {
    openmp: &'a OpenMp,
    previous: c_int,
}

impl Drop for OpenMpThreads<'_> {
    fn drop(&mut self) {
        // SAFETY: as in OpenMp::set_threads.
        unsafe { (self.openmp.set_num_threads)(self.previous) };
    }
}

/// `DNNL_RUNTIME_OMP`, a `dnnl_version_t::cpu_runtime`.
const RUNTIME_OMP: c_uint = 2;

// SAFETY: the entry points are plain C functions and the engine is an immutable handle that
// oneDNN allows to be shared between threads (streams, which are not, are made per thread).
unsafe impl Send for Api {}
// SAFETY: as for Send.
unsafe impl Sync for Api {}

/// A memory descriptor as the calls take it: a pointer to 2.x's struct, or 3.x's handle.
pub(super) type Desc = *const c_void;

/// oneDNN 2.x's descriptor calls.
pub(super) struct V2 {
    pub memory_desc_init_by_strides:
        unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, *const i64) -> Status,
    pub matmul_desc_init: unsafe extern "C" fn(*mut MatmulDesc, Desc, Desc, Desc, Desc) -> Status,
    pub primitive_desc_create:
        unsafe extern "C" fn(*mut PrimitiveDesc, *const c_void, Attr, Engine, PrimitiveDesc) -> Status,
    pub post_ops_append_sum: unsafe extern "C" fn(PostOps, f32) -> Status,
    /// (post-ops, scale, algorithm, alpha, beta).
    pub post_ops_append_eltwise: unsafe extern "C" fn(PostOps, f32, c_int, f32, f32) -> Status,
}

/// oneDNN 3.x's descriptor calls.
pub(super) struct V3 {
    pub memory_desc_create_with_strides:
        unsafe extern "C" fn(*mut Desc, c_int, *const i64, c_int, *const i64) -> Status,
    pub memory_desc_destroy: unsafe extern "C" fn(Desc) -> Status,
    pub matmul_primitive_desc_create:
        unsafe extern "C" fn(*mut PrimitiveDesc, Engine, Desc, Desc, Desc, Desc, Attr) -> Status,
    pub post_ops_append_sum: unsafe extern "C" fn(PostOps, f32, i32, c_int) -> Status,
    /// (post-ops, algorithm, alpha, beta).
    pub post_ops_append_eltwise: unsafe extern "C" fn(PostOps, c_int, f32, f32) -> Status,
}

pub(super) enum Versioned {
    V2(V2),
    V3(V3),
}

/// A memory descriptor this module made: 2.x's struct, or 3.x's handle (destroyed on drop).
pub(super) enum OwnedDesc {
    V2(Box<MemoryDesc>),
    V3(Desc, unsafe extern "C" fn(Desc) -> Status),
}

impl OwnedDesc {
    pub(super) fn as_ptr(&self) -> Desc {
        match self {
            OwnedDesc::V2(desc) => (&**desc as *const MemoryDesc).cast(),
            OwnedDesc::V3(handle, _) => *handle,
        }
    }
}

impl Drop for OwnedDesc {
    fn drop(&mut self) {
        if let OwnedDesc::V3(handle, destroy) = self {
            // SAFETY: a handle made by memory_desc_create_with_strides, destroyed once.
            unsafe { destroy(*handle) };
        }
    }
}

/// The libraries tried, newest first (oneDNN's sonames).
pub(super) const LIBRARIES: [&str; 2] = ["libdnnl.so.3", "libdnnl.so.2"];

impl Api {
    /// Loads oneDNN (3.x, else 2.x) and its CPU engine, or says why not.
    pub(super) fn load() -> Result<Self, String> {
        let mut failures = Vec::new();
        for name in LIBRARIES {
            match Self::load_from(name) {
                Ok(api) => return Ok(api),
                Err(e) => failures.push(e),
            }
        }
        Err(failures.join("; "))
    }

    fn load_from(name: &str) -> Result<Self, String> {
        // SAFETY: loading a shared library runs its initializers; oneDNN's only set up its own
        // state. The symbols below are taken with the signatures of dnnl.h of the major version
        // the library reports, which is checked before any other call.
        unsafe {
            let library = Library::new(name).map_err(|e| format!("{name} not loaded ({e})"))?;
            macro_rules! symbol {
                ($name:literal) => {
                    *library.get(concat!($name, "\0").as_bytes()).map_err(|e| format!("{name}: no {} ({e})", $name))?
                };
            }
            let version: unsafe extern "C" fn() -> *const Version = symbol!("dnnl_version");
            let found = &*version();
            let versioned = match found.major {
                2 => Versioned::V2(V2 {
                    memory_desc_init_by_strides: symbol!("dnnl_memory_desc_init_by_strides"),
                    matmul_desc_init: symbol!("dnnl_matmul_desc_init"),
                    primitive_desc_create: symbol!("dnnl_primitive_desc_create"),
                    post_ops_append_sum: symbol!("dnnl_post_ops_append_sum"),
                    post_ops_append_eltwise: symbol!("dnnl_post_ops_append_eltwise"),
                }),
                3 => Versioned::V3(V3 {
                    memory_desc_create_with_strides: symbol!("dnnl_memory_desc_create_with_strides"),
                    memory_desc_destroy: symbol!("dnnl_memory_desc_destroy"),
                    matmul_primitive_desc_create: symbol!("dnnl_matmul_primitive_desc_create"),
                    post_ops_append_sum: symbol!("dnnl_post_ops_append_sum"),
                    post_ops_append_eltwise: symbol!("dnnl_post_ops_append_eltwise"),
                }),
                major => return Err(format!("{name} is oneDNN {major}.{}, not 2.x or 3.x", found.minor)),
            };
            // looked up through oneDNN's handle, which searches the libraries it was linked with
            let openmp =
                match (found.cpu_runtime, library.get(b"omp_get_max_threads\0"), library.get(b"omp_set_num_threads\0"))
                {
                    (RUNTIME_OMP, Ok(get), Ok(set)) => Some(OpenMp { get_max_threads: *get, set_num_threads: *set }),
                    _ => None,
                };
            let mut api = Api {
                version,
                engine_create: symbol!("dnnl_engine_create"),
                stream_create: symbol!("dnnl_stream_create"),
                stream_wait: symbol!("dnnl_stream_wait"),
                stream_destroy: symbol!("dnnl_stream_destroy"),
                memory_desc_get_size: symbol!("dnnl_memory_desc_get_size"),
                versioned,
                primitive_attr_create: symbol!("dnnl_primitive_attr_create"),
                primitive_attr_destroy: symbol!("dnnl_primitive_attr_destroy"),
                primitive_attr_set_post_ops: symbol!("dnnl_primitive_attr_set_post_ops"),
                primitive_attr_set_scratchpad_mode: symbol!("dnnl_primitive_attr_set_scratchpad_mode"),
                post_ops_create: symbol!("dnnl_post_ops_create"),
                post_ops_destroy: symbol!("dnnl_post_ops_destroy"),
                primitive_desc_query: symbol!("dnnl_primitive_desc_query"),
                primitive_desc_query_md: symbol!("dnnl_primitive_desc_query_md"),
                primitive_desc_destroy: symbol!("dnnl_primitive_desc_destroy"),
                primitive_create: symbol!("dnnl_primitive_create"),
                primitive_destroy: symbol!("dnnl_primitive_destroy"),
                primitive_execute: symbol!("dnnl_primitive_execute"),
                memory_create: symbol!("dnnl_memory_create"),
                memory_destroy: symbol!("dnnl_memory_destroy"),
                openmp,
                engine: std::ptr::null_mut(),
                _library: library,
            };
            check((api.engine_create)(&mut api.engine, CPU, 0), "engine")?;
            Ok(api)
        }
    }

    /// A strided memory descriptor of `dtype` over `dims`.
    pub(super) fn memory_desc(&self, dims: &[i64], strides: &[i64], dtype: c_int) -> Result<OwnedDesc, String> {
        let ndims = dims.len() as c_int;
        // SAFETY: dims and strides hold ndims values each; the descriptor is written by oneDNN.
        unsafe {
            match &self.versioned {
                Versioned::V2(v2) => {
                    let mut desc = Box::new(MemoryDesc::zeroed());
                    let status =
                        (v2.memory_desc_init_by_strides)(&mut *desc, ndims, dims.as_ptr(), dtype, strides.as_ptr());
                    check(status, "memory descriptor").map(|()| OwnedDesc::V2(desc))
                }
                Versioned::V3(v3) => {
                    let mut handle = std::ptr::null();
                    let status = (v3.memory_desc_create_with_strides)(
                        &mut handle,
                        ndims,
                        dims.as_ptr(),
                        dtype,
                        strides.as_ptr(),
                    );
                    check(status, "memory descriptor").map(|()| OwnedDesc::V3(handle, v3.memory_desc_destroy))
                }
            }
        }
    }

    /// Appends `dst += 1.0 · previous dst` (the sum post-op) to `post_ops`.
    ///
    /// # Safety
    /// `post_ops` must be a live post-ops handle.
    pub(super) unsafe fn append_sum(&self, post_ops: PostOps) -> Result<(), String> {
        // SAFETY: by the caller's contract; `0` for 3.x's data type is `dnnl_data_type_undef`
        // (dst's own type), and its zero point 0 is no shift.
        let status = unsafe {
            match &self.versioned {
                Versioned::V2(v2) => (v2.post_ops_append_sum)(post_ops, 1.0),
                Versioned::V3(v3) => (v3.post_ops_append_sum)(post_ops, 1.0, 0, 0),
            }
        };
        check(status, "sum post-op")
    }

    /// Appends the GELU of erf (`dnnl_eltwise_gelu_erf`, transformers' "gelu") to `post_ops`.
    ///
    /// # Safety
    /// `post_ops` must be a live post-ops handle.
    pub(super) unsafe fn append_gelu_erf(&self, post_ops: PostOps) -> Result<(), String> {
        // SAFETY: by the caller's contract; the algorithm's number is each version's own
        // (dnnl_types.h: 0x30 in 2.x, 0x31 in 3.x), alpha and beta unused by it.
        let status = unsafe {
            match &self.versioned {
                Versioned::V2(v2) => (v2.post_ops_append_eltwise)(post_ops, 1.0, GELU_ERF_V2, 0.0, 0.0),
                Versioned::V3(v3) => (v3.post_ops_append_eltwise)(post_ops, GELU_ERF_V3, 0.0, 0.0),
            }
        };
        check(status, "GELU post-op")
    }

    /// A matmul primitive descriptor `dst = src · weights (+ bias)` with `attr` (`bias` null for
    /// none).
    ///
    /// # Safety
    /// The descriptors and `attr` must be live.
    pub(super) unsafe fn matmul_desc(
        &self,
        src: Desc,
        weights: Desc,
        bias: Desc,
        dst: Desc,
        attr: Attr,
    ) -> Result<PrimitiveDesc, String> {
        let mut descriptor = std::ptr::null_mut();
        // SAFETY: by the caller's contract; 2.x's operation descriptor lives on the heap until
        // the primitive descriptor, which copies it, is made.
        let status = unsafe {
            match &self.versioned {
                Versioned::V2(v2) => {
                    let mut op = MatmulDesc::zeroed();
                    check((v2.matmul_desc_init)(&mut *op, src, weights, bias, dst), "matmul descriptor")?;
                    (v2.primitive_desc_create)(
                        &mut descriptor,
                        (&*op as *const MatmulDesc).cast(),
                        attr,
                        self.engine,
                        std::ptr::null_mut(),
                    )
                }
                Versioned::V3(v3) => {
                    (v3.matmul_primitive_desc_create)(&mut descriptor, self.engine, src, weights, bias, dst, attr)
                }
            }
        };
        check(status, "matmul primitive descriptor").map(|()| descriptor)
    }

    /// Whether this oneDNN makes bf16 products on this CPU (2.x has none without AVX-512): a
    /// small one is described, then dropped.
    pub(super) fn check_bf16_products(&self) -> Result<(), String> {
        let (dims, strides) = ([1, 16, 16], [256, 16, 1]);
        let src = self.memory_desc(&dims, &strides, BF16)?;
        let weights = self.memory_desc(&dims, &strides, BF16)?;
        let dst = self.memory_desc(&dims, &strides, F32)?;
        // SAFETY: live descriptors, no attributes (null is oneDNN's default), and the
        // primitive descriptor made is destroyed at once.
        unsafe {
            let descriptor = self
                .matmul_desc(src.as_ptr(), weights.as_ptr(), std::ptr::null(), dst.as_ptr(), std::ptr::null_mut())
                .map_err(|_| format!("oneDNN {} has no bf16 products on this CPU", self.version_string()))?;
            (self.primitive_desc_destroy)(descriptor);
        }
        Ok(())
    }

    /// "2.6.3".
    pub(super) fn version_string(&self) -> String {
        // SAFETY: dnnl_version returns a pointer to a static struct.
        let v = unsafe { &*(self.version)() };
        format!("{}.{}.{}", v.major, v.minor, v.patch)
    }

    /// A stream on the CPU engine, for the calling thread.
    pub(super) fn new_stream(&self) -> Result<Stream, String> {
        let mut stream = std::ptr::null_mut();
        // SAFETY: the engine is valid for the library's lifetime.
        check(unsafe { (self.stream_create)(&mut stream, self.engine, STREAM_DEFAULT_FLAGS) }, "stream")?;
        Ok(stream)
    }
}

/// A status as a result naming the call.
pub(super) fn check(status: Status, what: &str) -> Result<(), String> {
    if status == SUCCESS {
        Ok(())
    } else {
        Err(format!("oneDNN: {what} failed (status {status})"))
    }
}
