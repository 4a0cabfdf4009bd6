//! BLIP (Salesforce's Bootstrapping Language-Image Pre-training) in Rust, giving the same outputs
//! as Hugging Face transformers' `models/blip` on the public checkpoints.
//!
//! The modules follow the pipeline: [`config`] and [`checkpoint`] load a model as the Hub
//! publishes it, [`processor`] turns image files and text into model inputs, [`models`] holds the
//! networks, [`generation`] decodes, and [`tasks`] ties them into what users ask for.
//!
//! ```no_run
//! use blip::{load_image, AnswerOptions, CaptionOptions, Captioner, ClassifyOptions, Device, ImageTextMatcher, QuestionAnswerer};
//!
//! # fn main() -> blip::Result<()> {
//! let images = vec![load_image(std::path::Path::new("cat.jpg"))?];
//! let captions = Captioner::load("Salesforce/blip-image-captioning-base", &Device::Cpu)?
//!     .caption(&images, &CaptionOptions::default())?; // per image: captions best first
//! let answers = QuestionAnswerer::load("Salesforce/blip-vqa-base", &Device::Cpu)?
//!     .answer(&images, &["how many cats are there?"], &AnswerOptions::default())?; // per image: answers
//! let matcher = ImageTextMatcher::load("Salesforce/blip-itm-base-coco", &Device::Cpu)?;
//! let scores = matcher.match_images(&images, &["a cat on a sofa", "a rocket"])?; // [image][text]: itm, itc
//! let image_embeds = matcher.embed_images(&images)?; // [n, 256], unit norm
//! let labels = matcher.classify(&images, &["cat", "dog"], &ClassifyOptions::default())?;
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
mod kernels;
pub mod models;
mod ops;
pub mod processor;
pub mod tasks;

pub use candle_core::{DType, Device};
pub use checkpoint::{Checkpoint, DEFAULT_MODEL};
pub use error::{Error, Result};
pub use processor::image::load_image;
pub use tasks::caption::{Caption, CaptionOptions, Captioner};
pub use tasks::matching::{ClassifyOptions, ImageTextMatcher, LabelScore, MatchScore};
pub use tasks::vqa::{Answer, AnswerList, AnswerOptions, QuestionAnswerer, RankOptions, RankedAnswer};
pub use tasks::{GeneratedText, Task, TaskModel};
