//! Images as Python hands them over: paths (or URLs), the bytes of an encoded file, or uint8
//! numpy arrays (H×W×3, or H×W gray). PIL images arrive as arrays: the package's Python side
//! converts them to RGB as transformers' processor does.

use blip::{ImageSource, RgbImage, UrlLimits};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use crate::errors::missing_file;

/// One image, read from Python but not decoded yet (decoding runs without the GIL).
pub enum Input {
    Source(ImageSource),
    Encoded(Vec<u8>),
    Pixels(RgbImage),
}

impl Input {
    /// Reads item `index` of the `images` argument.
    pub fn extract(item: &Bound<'_, PyAny>, index: usize) -> PyResult<Self> {
        if let Ok(text) = item.cast::<PyString>() {
            return Ok(Input::Source(ImageSource::parse(&text.to_cow()?)));
        }
        if let Ok(bytes) = item.cast::<PyBytes>() {
            return Ok(Input::Encoded(bytes.as_bytes().to_vec()));
        }
        if let Ok(bytes) = item.cast::<PyByteArray>() {
            return Ok(Input::Encoded(bytes.to_vec()));
        }
        if let Ok(array) = item.extract::<PyReadonlyArrayDyn<'_, u8>>() {
            return pixels(&array, index).map(Input::Pixels);
        }
        // os.PathLike
        if let Ok(path) = item.call_method0("__fspath__") {
            if let Ok(text) = path.cast::<PyString>() {
                return Ok(Input::Source(ImageSource::File(text.to_cow()?.into_owned().into())));
            }
        }
        let kind = item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        Err(PyValueError::new_err(format!(
            "images[{index}]: a {kind}; give a path, the bytes of an image file, a PIL image or a uint8 numpy array (H×W×3 or H×W)"
        )))
    }

    /// Fails early on a path that does not exist, as `FileNotFoundError`.
    pub fn check_exists(&self) -> PyResult<()> {
        match self {
            Input::Source(ImageSource::File(path)) if !path.exists() => Err(missing_file(path)),
            _ => Ok(()),
        }
    }

    /// The decoded image, as the CLI decodes files.
    pub fn decode(self, index: usize) -> blip::Result<RgbImage> {
        match self {
            Input::Source(source) => source.load(&UrlLimits::default()),
            Input::Encoded(bytes) => {
                blip::load_image_from_memory(&bytes, std::path::Path::new(&format!("images[{index}] (bytes)")))
            }
            Input::Pixels(image) => Ok(image),
        }
    }
}

/// A uint8 array H×W×3 (RGB) or H×W (gray, replicated as PIL's `convert("RGB")` does).
fn pixels(array: &PyReadonlyArrayDyn<'_, u8>, index: usize) -> PyResult<RgbImage> {
    let shape = array.shape().to_vec();
    let (height, width) = match shape.as_slice() {
        [h, w, 3] | [h, w] => (*h, *w),
        other => {
            return Err(PyValueError::new_err(format!(
                "images[{index}]: an array of shape {other:?}; give H×W×3 (RGB) or H×W (gray) uint8"
            )))
        }
    };
    if height == 0 || width == 0 {
        return Err(PyValueError::new_err(format!("images[{index}]: the image has no pixels ({width}x{height})")));
    }
    // The decoder's limit (PIL's decompression-bomb limit), before anything is allocated.
    if (height as u64).saturating_mul(width as u64) > blip::processor::image::MAX_PIXELS {
        return Err(PyValueError::new_err(format!(
            "images[{index}]: {width}x{height} pixels is over the {}-pixel limit",
            blip::processor::image::MAX_PIXELS
        )));
    }
    let view = array.as_array();
    let rgb: Vec<u8> = if shape.len() == 3 {
        // Row-major order whatever the array's strides (Fortran order, flipped, sliced views).
        match array.as_slice() {
            Ok(contiguous) if array.is_c_contiguous() => contiguous.to_vec(),
            _ => view.iter().copied().collect(),
        }
    } else {
        view.iter().flat_map(|&v| [v, v, v]).collect()
    };
    RgbImage::from_raw(width as u32, height as u32, rgb)
        .ok_or_else(|| PyValueError::new_err(format!("images[{index}]: the pixels do not fill {width}x{height}")))
}

/// The `images` argument: one image or a list (tuple) of them.
pub fn extract_all(images: &Bound<'_, PyAny>) -> PyResult<Vec<Input>> {
    let inputs = if images.is_instance_of::<pyo3::types::PyList>() || images.is_instance_of::<pyo3::types::PyTuple>() {
        images.try_iter()?.enumerate().map(|(i, item)| Input::extract(&item?, i)).collect::<PyResult<Vec<_>>>()?
    } else {
        vec![Input::extract(images, 0)?]
    };
    if inputs.is_empty() {
        return Err(PyValueError::new_err("images: an empty list; give at least one image"));
    }
    inputs.iter().try_for_each(Input::check_exists)?;
    Ok(inputs)
}

/// Decodes every input (without the GIL), naming the first that fails.
pub fn decode_all(inputs: Vec<Input>) -> blip::Result<Vec<RgbImage>> {
    inputs.into_iter().enumerate().map(|(i, input)| input.decode(i)).collect()
}
