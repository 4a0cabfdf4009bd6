//! `blip serve`'s HTTP app, built on the `blip` library only: every task of the served BLIP
//! checkpoints behind the Hugging Face Inference API's wire format (`/models/{id}`,
//! `/pipeline/{task}/{id}`) and OpenAI's chat completions (`/v1/chat/completions`), with
//! batching across requests ([`scheduler`]), bounded queues, metrics and an OpenAPI document.
//! The binary (`blip serve`) parses flags, binds, serves [`app::router`] and loads the models.

pub mod app;
mod auth;
pub mod error;
pub mod hf;
pub mod images;
pub mod metrics;
pub mod models;
pub mod openai;
mod openapi;
pub mod scheduler;
mod tasks;

pub use app::{router, AppState, Config, Shared};
pub use error::ApiError;
