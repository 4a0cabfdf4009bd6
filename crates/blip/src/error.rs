//! The library's error type: every failure names the input it concerns and, where there is one,
//! the fix.

use std::path::PathBuf;

/// Everything that can go wrong between a checkpoint or image on disk and a caption.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image file could not be opened or decoded.
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },

    /// A checkpoint is missing, unreadable, or not the kind of model asked for.
    #[error("{location}: {reason}")]
    Checkpoint { location: String, reason: String },

    /// A configuration file does not parse or holds impossible values.
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },

    /// A request the model cannot serve (prompt too long, bad option, ...).
    #[error("{0}")]
    InvalidInput(String),

    /// Tokenizer failures (loading tokenizer.json, encoding, decoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Tensor-library errors: a bug or an exhausted resource, not a user mistake.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn image(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Image { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn checkpoint(location: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Error::Checkpoint { location: location.to_string(), reason: reason.to_string() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), reason: reason.to_string() }
    }
}
