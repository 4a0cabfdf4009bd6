//! The library's errors as Python exceptions of the class a Python user expects.

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// `ValueError` for what the caller gave (options, images, texts, a checkpoint of the wrong
/// kind), `OSError` for a checkpoint that cannot be found or read (as transformers'
/// `from_pretrained` raises), `RuntimeError` for the rest (a bug or an exhausted resource).
/// Messages name options by transformers' keyword names. (Missing image files are told apart
/// before loading: [`missing_file`].)
pub fn to_py(err: blip::Error) -> PyErr {
    match &err {
        blip::Error::InvalidInput(invalid) => PyValueError::new_err(invalid.message(&|p| p.name().to_string())),
        blip::Error::Checkpoint { .. } | blip::Error::Config { .. } => PyOSError::new_err(err.to_string()),
        blip::Error::Candle(_) | blip::Error::Tokenizer(_) => PyRuntimeError::new_err(err.to_string()),
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// `FileNotFoundError` naming a path that does not exist.
pub fn missing_file(path: &std::path::Path) -> PyErr {
    PyFileNotFoundError::new_err(format!("{}: no such image file", path.display()))
}

/// For `?` on the library's results.
pub trait OrPyErr<T> {
    fn py(self) -> pyo3::PyResult<T>;
}

impl<T> OrPyErr<T> for blip::Result<T> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}

impl<T> OrPyErr<T> for candle_core::Result<T> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }
}
