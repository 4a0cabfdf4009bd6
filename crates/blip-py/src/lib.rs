//! `blip._blip`, the native half of the `blip` Python package: the library's tasks, computed
//! without the GIL. The Python half (`python/blip`) gives them their keyword arguments,
//! docstrings and result shapes; see docs/PYTHON.md.

mod errors;
mod images;

use std::num::NonZeroUsize;

use blip::{
    CaptionOptions, Captioner, ClassifyOptions, DType, Device, GeneratedText, GenerationOverrides, ImageTextMatcher,
    Prompt, QuestionAnswerer, RankOptions, ResizeBackend,
};
use numpy::{IntoPyArray, PyArray2, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use errors::{to_py, OrPyErr};
use images::{decode_all, extract_all};

/// How a model is loaded: dtype, resize and the threads its computations use.
struct Loading {
    dtype: DType,
    resize: ResizeBackend,
    /// Its own pool when `threads` is given, so that objects with different counts coexist
    /// (Ray actors, threads of one process); else the process's pool (all cores).
    pool: Option<rayon::ThreadPool>,
}

impl Loading {
    fn new(dtype: &str, threads: Option<usize>, resize: &str) -> PyResult<Self> {
        let dtype = match dtype {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => return Err(PyValueError::new_err(format!("dtype={other:?}: give \"f32\", \"bf16\" or \"f16\""))),
        };
        let resize = match resize {
            "torchvision" => ResizeBackend::Torchvision,
            "pil" => ResizeBackend::Pil,
            other => return Err(PyValueError::new_err(format!("resize={other:?}: give \"torchvision\" or \"pil\""))),
        };
        let pool = match threads {
            None => None,
            Some(0) => return Err(PyValueError::new_err("threads=0: give at least 1, or None for all cores")),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?,
            ),
        };
        Ok(Self { dtype, resize, pool })
    }

    /// Loads `model` as task `M` with these settings (`dtype`, `threads`, `resize`) at
    /// `image_size` (None: the checkpoint's), returning it with its settings.
    fn load<M: blip::TaskModel + Send>(
        py: Python<'_>,
        model: &str,
        (dtype, threads, resize): (&str, Option<usize>, &str),
        image_size: Option<usize>,
    ) -> PyResult<(blip::Task<M>, Self)> {
        let loading = Loading::new(dtype, threads, resize)?;
        let mut task = loading.run(py, || blip::Task::<M>::load_with_dtype(model, &Device::Cpu, loading.dtype))?;
        task.set_resize_backend(loading.resize);
        if let Some(size) = image_size {
            task.set_image_size(size).map_err(to_py)?;
        }
        Ok((task, loading))
    }

    /// `work` without the GIL, on this object's threads; a panic (a bug) becomes a
    /// `RuntimeError` instead of unwinding into Python.
    fn run<T: Send>(&self, py: Python<'_>, work: impl FnOnce() -> blip::Result<T> + Send) -> PyResult<T> {
        let caught = py.detach(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &self.pool {
                Some(pool) => pool.install(work),
                None => work(),
            }))
        });
        match caught {
            Ok(result) => result.map_err(to_py),
            Err(_) => {
                Err(pyo3::exceptions::PyRuntimeError::new_err("blip: internal error (a panic); please report it"))
            }
        }
    }
}

/// Generation keywords (transformers' names), JSON-encoded by the Python side.
fn overrides(generation: &str) -> PyResult<GenerationOverrides> {
    serde_json::from_str(generation).map_err(|e| PyValueError::new_err(format!("generation options: {e}")))
}

/// Generated texts of one input as dicts: `{key, "tokens", "score", "log_prob"}`, best first.
fn texts_to_py<'py>(py: Python<'py>, key: &str, texts: &[GeneratedText]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for text in texts {
        let dict = PyDict::new(py);
        dict.set_item(key, &text.text)?;
        dict.set_item("tokens", &text.tokens)?;
        dict.set_item("score", text.score)?;
        dict.set_item("log_prob", text.log_prob)?;
        list.append(dict)?;
    }
    Ok(list)
}

/// A `[n, d]` f32 tensor as a numpy array, without copying its values again.
fn matrix_to_py<'py>(py: Python<'py>, tensor: blip::Tensor) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (rows, cols) = tensor.dims2().py()?;
    let values: Vec<f32> = tensor.flatten_all().py()?.to_vec1().py()?;
    values.into_pyarray(py).reshape([rows, cols])
}

#[pyclass(module = "blip._blip", frozen)]
struct NativeCaptioner {
    task: Captioner,
    loading: Loading,
}

#[pymethods]
impl NativeCaptioner {
    #[new]
    #[pyo3(signature = (model, dtype, threads, resize, image_size=None))]
    fn new(
        py: Python<'_>,
        model: &str,
        dtype: &str,
        threads: Option<usize>,
        resize: &str,
        image_size: Option<usize>,
    ) -> PyResult<Self> {
        let (task, loading) = Loading::load(py, model, (dtype, threads, resize), image_size)?;
        Ok(Self { task, loading })
    }

    /// Per image, its captions best first (dicts).
    fn caption<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        prompt: Option<String>,
        generation: &str,
    ) -> PyResult<Vec<Bound<'py, PyList>>> {
        let mut options: CaptionOptions = self.task.default_options();
        options.generation = overrides(generation)?.apply(&options.generation);
        options.prompt = Prompt::from(prompt);
        self.task.validate(&options).py()?;
        let inputs = extract_all(images)?;
        let captions =
            self.loading.run(py, || decode_all(inputs).and_then(|images| self.task.caption(&images, &options)))?;
        captions.iter().map(|c| texts_to_py(py, "caption", c)).collect()
    }
}

#[pyclass(module = "blip._blip", frozen)]
struct NativeQuestionAnswerer {
    task: QuestionAnswerer,
    loading: Loading,
}

#[pymethods]
impl NativeQuestionAnswerer {
    #[new]
    #[pyo3(signature = (model, dtype, threads, resize, image_size=None))]
    fn new(
        py: Python<'_>,
        model: &str,
        dtype: &str,
        threads: Option<usize>,
        resize: &str,
        image_size: Option<usize>,
    ) -> PyResult<Self> {
        let (task, loading) = Loading::load(py, model, (dtype, threads, resize), image_size)?;
        Ok(Self { task, loading })
    }

    /// Per image (one question each), its answers best first (dicts).
    fn answer<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        questions: Vec<String>,
        generation: &str,
    ) -> PyResult<Vec<Bound<'py, PyList>>> {
        let mut options = self.task.default_options();
        options.generation = overrides(generation)?.apply(&options.generation);
        self.task.validate(&options).py()?;
        let inputs = extract_all(images)?;
        let questions: Vec<&str> = questions.iter().map(String::as_str).collect();
        let answers = self
            .loading
            .run(py, || decode_all(inputs).and_then(|images| self.task.answer(&images, &questions, &options)))?;
        answers.iter().map(|a| texts_to_py(py, "answer", a)).collect()
    }

    /// Per image, the `top` best of `answers` with their log-likelihood (dicts).
    fn rank<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        questions: Vec<String>,
        answers: Vec<String>,
        top: usize,
        candidates: usize,
    ) -> PyResult<Vec<Bound<'py, PyList>>> {
        let options = RankOptions::new(candidates, top);
        options.validate().py()?;
        let list = self.task.answer_list(&answers).py()?;
        let inputs = extract_all(images)?;
        let questions: Vec<&str> = questions.iter().map(String::as_str).collect();
        let ranked = self
            .loading
            .run(py, || decode_all(inputs).and_then(|images| self.task.rank(&images, &questions, &list, &options)))?;
        ranked
            .iter()
            .map(|answers| {
                let list = PyList::empty(py);
                for a in answers {
                    let dict = PyDict::new(py);
                    dict.set_item("answer", &a.answer)?;
                    dict.set_item("score", a.score)?;
                    list.append(dict)?;
                }
                Ok(list)
            })
            .collect()
    }
}

#[pyclass(module = "blip._blip", frozen)]
struct NativeImageTextMatcher {
    task: ImageTextMatcher,
    loading: Loading,
}

#[pymethods]
impl NativeImageTextMatcher {
    #[new]
    #[pyo3(signature = (model, dtype, threads, resize, image_size=None))]
    fn new(
        py: Python<'_>,
        model: &str,
        dtype: &str,
        threads: Option<usize>,
        resize: &str,
        image_size: Option<usize>,
    ) -> PyResult<Self> {
        let (task, loading) = Loading::load(py, model, (dtype, threads, resize), image_size)?;
        Ok(Self { task, loading })
    }

    #[getter]
    fn has_itm_head(&self) -> bool {
        self.task.has_itm_head()
    }

    #[getter]
    fn embedding_dim(&self) -> usize {
        self.task.embedding_dim()
    }

    /// scores[image][text] as dicts `{"itm", "itc"}` (itm None without an ITM head).
    fn match_texts<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        texts: Vec<String>,
    ) -> PyResult<Vec<Bound<'py, PyList>>> {
        let inputs = extract_all(images)?;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let scores =
            self.loading.run(py, || decode_all(inputs).and_then(|images| self.task.match_texts(&images, &texts)))?;
        scores
            .iter()
            .map(|row| {
                let list = PyList::empty(py);
                for (text, score) in texts.iter().zip(row) {
                    let dict = PyDict::new(py);
                    dict.set_item("text", text)?;
                    dict.set_item("itm", score.itm)?;
                    dict.set_item("itc", score.itc)?;
                    list.append(dict)?;
                }
                Ok(list)
            })
            .collect()
    }

    /// Grad-CAM maps: per image, per text a dict `{"text", "map": float32 [rows, cols],
    /// "tokens": [(token, float32 [rows, cols])], "itm"}`.
    fn gradcam<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        texts: Vec<String>,
        layer: usize,
    ) -> PyResult<Vec<Bound<'py, PyList>>> {
        let inputs = extract_all(images)?;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let cams =
            self.loading.run(py, || decode_all(inputs).and_then(|images| self.task.gradcam(&images, &texts, layer)))?;
        let grid =
            |values: &[f32], (rows, cols): (usize, usize)| values.to_vec().into_pyarray(py).reshape([rows, cols]);
        cams.iter()
            .map(|row| {
                let list = PyList::empty(py);
                for cam in row {
                    let dict = PyDict::new(py);
                    dict.set_item("text", &cam.text)?;
                    dict.set_item("map", grid(&cam.map, cam.grid)?)?;
                    let tokens = PyList::empty(py);
                    for (token, values) in &cam.tokens {
                        tokens.append((token, grid(values, cam.grid)?))?;
                    }
                    dict.set_item("tokens", tokens)?;
                    dict.set_item("itm", cam.itm)?;
                    list.append(dict)?;
                }
                Ok(list)
            })
            .collect()
    }

    /// Unit-norm image embeddings, a float32 array [n, dim].
    fn embed_images<'py>(&self, py: Python<'py>, images: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let inputs = extract_all(images)?;
        let embeddings =
            self.loading.run(py, || decode_all(inputs).and_then(|images| self.task.embed_images(&images)))?;
        matrix_to_py(py, embeddings)
    }

    /// Unit-norm text embeddings, a float32 array [n, dim].
    fn embed_texts<'py>(&self, py: Python<'py>, texts: Vec<String>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embeddings = self.loading.run(py, || self.task.embed_texts(&texts))?;
        matrix_to_py(py, embeddings)
    }

    /// Per image, the labels best first as dicts `{"label", "probability", "itc", ["itm"]}`.
    fn classify<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        labels: Vec<String>,
        template: String,
        rerank: Option<usize>,
    ) -> PyResult<Vec<Bound<'py, PyList>>> {
        let mut options = ClassifyOptions::default();
        options.template = template;
        options.rerank = match rerank {
            None => None,
            Some(k) => Some(NonZeroUsize::new(k).ok_or_else(|| PyValueError::new_err("rerank=0: give at least 1"))?),
        };
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.task.validate_classify(&labels, &options).map_err(to_py)?;
        let inputs = extract_all(images)?;
        let scores = self
            .loading
            .run(py, || decode_all(inputs).and_then(|images| self.task.classify(&images, &labels, &options)))?;
        scores
            .iter()
            .map(|row| {
                let list = PyList::empty(py);
                for s in row {
                    let dict = PyDict::new(py);
                    dict.set_item("label", &s.label)?;
                    dict.set_item("probability", s.probability)?;
                    dict.set_item("itc", s.itc)?;
                    if let Some(itm) = s.itm {
                        dict.set_item("itm", itm)?;
                    }
                    list.append(dict)?;
                }
                Ok(list)
            })
            .collect()
    }
}

/// As the `blip` program does (see its main.rs): glibc would hand every large freed tensor back
/// to the system, and the next layer's would be fresh pages to fault in and zero; kept in the
/// heap instead, the same sizes are reused layer after layer (peak memory does not grow).
/// `BLIP_KEEP_FREED_MEMORY=0` leaves the process's allocator settings alone.
fn keep_freed_memory() {
    if std::env::var_os("BLIP_KEEP_FREED_MEMORY").is_some_and(|v| v == "0") {
        return;
    }
    // SAFETY: mallopt only changes allocator thresholds; glibc takes them at any time.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[pymodule]
fn _blip(module: &Bound<'_, PyModule>) -> PyResult<()> {
    keep_freed_memory();
    module.add_class::<NativeCaptioner>()?;
    module.add_class::<NativeQuestionAnswerer>()?;
    module.add_class::<NativeImageTextMatcher>()?;
    module.add("DEFAULT_CAPTION_MODEL", Captioner::DEFAULT_MODEL)?;
    module.add("DEFAULT_VQA_MODEL", QuestionAnswerer::DEFAULT_MODEL)?;
    module.add("DEFAULT_MATCHING_MODEL", ImageTextMatcher::DEFAULT_MODEL)?;
    module.add("DEFAULT_TEMPLATE", ClassifyOptions::DEFAULT_TEMPLATE)?;
    module.add("DEFAULT_RANK_TOP", RankOptions::default().top)?;
    module.add("DEFAULT_RANK_CANDIDATES", RankOptions::default().candidates)?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
