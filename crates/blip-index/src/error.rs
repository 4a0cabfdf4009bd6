//! What can go wrong with an index: its file, its model, or the model's work.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is not a database this crate wrote (another SQLite database, another kind of
    /// file, or a damaged one).
    #[error("{}: not a blip index ({reason})", path.display())]
    NotAnIndex { path: PathBuf, reason: String },

    /// The index was built with another model (or dtype): embeddings would not be comparable.
    #[error(
        "{}: indexed with {recorded}; refusing to mix in embeddings of {given} (use another --db, or the same model and --dtype)",
        path.display()
    )]
    OtherModel { path: PathBuf, recorded: String, given: String },

    /// A query that cannot be answered (wrong width, an empty index, no ITM head to rerank with).
    #[error("{0}")]
    Query(String),

    /// SQLite failed (disk full, the file locked by another writer, ...).
    #[error("{}: {source}", path.display())]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// Loading a model, or a model's computation, failed.
    #[error(transparent)]
    Blip(#[from] blip::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(err: candle_core::Error) -> Self {
        Error::Blip(err.into())
    }
}
