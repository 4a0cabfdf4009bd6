//! `blip serve`'s HTTP app: BLIP captioning behind the Hugging Face Inference API's wire format
//! (`POST /models/{id}`, `POST /pipeline/image-to-text/{id}`), built on the `blip` library only.
//! The binary (`blip serve`) parses flags, loads the model, binds and serves [`app::router`].

pub mod app;
mod auth;
pub mod error;
pub mod hf;

pub use app::{router, Config, Served};
pub use error::ApiError;
