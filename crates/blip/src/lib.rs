//! BLIP (Salesforce's Bootstrapping Language-Image Pre-training) in Rust, giving the same outputs
//! as Hugging Face transformers' `models/blip` on the public checkpoints.
//!
//! The modules follow the pipeline: [`config`] and [`checkpoint`] load a model as the Hub
//! publishes it, [`processor`] turns image files and text into model inputs, [`models`] holds the
//! networks, [`generation`] decodes, and [`tasks`] ties them into what users ask for.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
pub mod models;
pub mod processor;
pub mod tasks;

pub use candle_core::Device;
pub use checkpoint::{Checkpoint, DEFAULT_MODEL};
pub use error::{Error, Result};
pub use processor::image::load_image;
pub use tasks::caption::{Caption, CaptionOptions, Captioner};
pub use tasks::matching::{ClassifyOptions, ImageTextMatcher, LabelScore, MatchScore};
pub use tasks::vqa::{Answer, AnswerList, AnswerOptions, QuestionAnswerer, RankOptions, RankedAnswer};
